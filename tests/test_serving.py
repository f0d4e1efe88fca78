"""Tests for moe_course.bench.serving: memory and tokens per second by batch size."""

from __future__ import annotations

import pytest
import torch

from moe_course.bench.serving import serving_table, weight_bytes
from moe_course.experts import FeedForward
from moe_course.flops import count_parameters
from moe_course.moe import MoEConfig, MoELayer


def test_weight_bytes_counts_parameters_and_buffers():
    dense = FeedForward(8, 16)
    assert weight_bytes(dense) == 4 * count_parameters(dense)
    moe = MoELayer(MoEConfig(8, 16, 4, router="sigmoid", top_k=2))
    assert weight_bytes(moe) == 4 * (count_parameters(moe) + 4)  # the selection bias is a buffer that must be served too
    assert weight_bytes(FeedForward(8, 16).to(torch.bfloat16)) == 2 * count_parameters(dense)


def test_serving_table_has_a_row_per_layer_and_batch_and_the_baseline_ratio_is_one():
    layers = {"dense": FeedForward(8, 16), "switch": MoELayer(MoEConfig(8, 16, 4, capacity_factor=None))}
    table = serving_table(layers, [1, 8], repeats=2, tokens_per_round=8)
    assert list(table.columns) == ["tokens", "layer", "tokens_per_second", "ratio"]
    assert len(table) == 4 and (table["tokens_per_second"] > 0).all()
    assert (table[table["layer"] == "dense"]["ratio"] == 1.0).all()


def test_serving_table_names_bad_inputs():
    with pytest.raises(ValueError, match="same width"):
        serving_table({"a": FeedForward(8, 16), "b": FeedForward(4, 16)}, [1])
    with pytest.raises(ValueError, match="baseline 'c'"):
        serving_table({"a": FeedForward(8, 16)}, [1], baseline="c")
    with pytest.raises(ValueError, match="positive ints"):
        serving_table({"a": FeedForward(8, 16)}, [0])
