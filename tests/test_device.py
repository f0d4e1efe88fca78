from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from moe_course.device import describe_environment, get_device, seed_everything


def test_get_device_falls_back_to_the_cpu_here():
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert get_device().type == expected


def test_get_device_honours_an_explicit_choice(monkeypatch):
    monkeypatch.setenv("MOE_COURSE_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    assert get_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_get_device_refuses_missing_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        get_device("cuda")


def test_seed_everything_repeats_every_generator():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3)

    seed_everything(7)
    a = draw()
    seed_everything(7)
    b = draw()
    seed_everything(8)
    c = draw()
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert a[0] != c[0] and not torch.equal(a[2], c[2])


def test_seed_everything_returns_its_own_generator():
    g = seed_everything(3)
    assert torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("bad", [1.5, "0", None, True])
def test_seed_everything_rejects_non_integers(bad):
    with pytest.raises(ValueError, match="seed must be an int"):
        seed_everything(bad)


def test_describe_environment_names_versions_and_device():
    info = describe_environment()
    assert info["torch"] == torch.__version__ and info["device"] == str(get_device())
