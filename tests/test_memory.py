from __future__ import annotations

import torch

from moe_course.bench.memory import MemoryRecorder, peak_bytes


def test_peak_counts_tensors_alive_together_not_their_sum():
    a = torch.randn(100, 100)  # exists before: not counted

    def two_at_once():
        b = a @ a  # 40 kB
        c = b + 1  # 40 kB, both alive
        return c.sum()

    def one_at_a_time():
        for _ in range(5):
            (a @ a).sum()  # each 40 kB product dies before the next

    assert 80_000 <= peak_bytes(two_at_once) < 81_000
    assert 40_000 <= peak_bytes(one_at_a_time) < 41_000


def test_views_are_not_counted_twice_and_freed_tensors_are_released():
    with MemoryRecorder() as rec:
        x = torch.zeros(1000)
        v = x[10:20] * 1  # a new 40-byte tensor
        view = x.view(10, 100)
        del x, v, view
    assert rec.peak == 4000 + 40 and rec.live == 0


def test_autograd_saved_tensors_count_until_backward():
    w = torch.randn(64, 64, requires_grad=True)

    def forward_backward():
        h = torch.relu(torch.randn(256, 64) @ w)  # h is saved for the backward
        (h @ w).sum().backward()

    assert peak_bytes(forward_backward) >= 2 * 256 * 64 * 4
