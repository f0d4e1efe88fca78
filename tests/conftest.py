"""Fixtures shared by the package tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests use tiny models, which run fastest on one thread (several threads crawl on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def course_style():
    """The course's figure style for one test, and every figure closed after it."""
    import matplotlib.pyplot as plt

    from moe_course.figures.plots import use_course_style

    use_course_style()
    yield
    plt.close("all")
