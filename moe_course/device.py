"""Where the course runs, and how it makes runs repeatable.

Every lesson starts with::

    device = get_device()   # CUDA, then Apple MPS, then the CPU
    seed_everything(0)      # Python, NumPy and PyTorch generators
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["get_device", "seed_everything", "describe_environment"]


def get_device(prefer: str | None = None) -> torch.device:
    """Pick the best device available: CUDA, then Apple MPS, then the CPU.

    ``prefer`` (or the environment variable ``MOE_COURSE_DEVICE``) forces a
    choice, e.g. ``"cpu"`` to reproduce the course's CPU numbers on a GPU box.
    """
    choice = prefer or os.environ.get("MOE_COURSE_DEVICE")
    if choice:
        device = torch.device(choice)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {choice!r} requested but CUDA is not available")
        if device.type == "mps" and not _mps_available():
            raise ValueError(f"device {choice!r} requested but Apple MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) random generators.

    Returns a fresh ``torch.Generator`` seeded with ``seed`` for code that
    wants its own stream (data sampling) independent of model initialisation.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


def describe_environment() -> dict[str, str]:
    """Versions and device, as shown by lesson 00's environment check."""
    import platform

    import matplotlib
    import seaborn

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "matplotlib": matplotlib.__version__,
        "seaborn": seaborn.__version__,
        "device": str(get_device()),
        "cpu threads": str(torch.get_num_threads()),
    }
