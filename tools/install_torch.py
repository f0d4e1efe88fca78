"""Install PyTorch into the course's environment, choosing the right build for this machine.

    python tools/install_torch.py                  # what `make lab` and `make test` run
    python tools/install_torch.py --plan           # only print what it would do, and why
    TORCH_VARIANT=cuda python tools/install_torch.py          # a CUDA build on an NVIDIA machine
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 python tools/install_torch.py

Why a script: on Linux x86_64, PyPI's ``torch`` is the CUDA build (about 16 ``nvidia-*``
packages, several GB), even on a laptop without an NVIDIA GPU. The course runs on a CPU,
so on such a machine we want PyTorch's CPU wheel, which lives on PyTorch's own index
(https://download.pytorch.org/whl/cpu). Some machines (company mirrors, CI boxes) reach
only their configured package registry; if that registry already serves a CPU build we
take it from there, and if PyTorch's index cannot be reached we fall back to the
configured registry with a warning rather than hanging.

The decision is a pure function, ``choose``, tested in tests/test_install_torch.py.
This file uses only the standard library: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field

DEFAULT_SPEC = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
VARIANTS = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Machine:
    """What the choice depends on."""

    system: str  # platform.system(): "Linux", "Darwin", "Windows"
    machine: str  # platform.machine(): "x86_64", "aarch64", "arm64", "AMD64"
    has_nvidia_gpu: bool  # an NVIDIA driver answers (nvidia-smi or /proc/driver/nvidia)


@dataclass(frozen=True)
class Plan:
    """What to run, and why (printed before it runs)."""

    pip_args: list[str] = field(default_factory=list)  # arguments after `python -m pip install`; empty: nothing to do
    reason: str = ""
    warning: str = ""  # printed loudly, e.g. when a CUDA build will be installed on a machine without a GPU


def wants_cpu(machine: Machine, variant: str) -> bool:
    """Whether this machine should get a CPU-only build of PyTorch."""
    if variant not in VARIANTS:
        raise ValueError(f"TORCH_VARIANT must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if variant != "auto":
        return variant == "cpu"
    return not machine.has_nvidia_gpu


def cuda_is_the_default(machine: Machine) -> bool:
    """Whether PyPI's plain wheel is a CUDA build here: Linux on x86_64 (and recent aarch64 wheels)."""
    return machine.system == "Linux" and machine.machine in ("x86_64", "AMD64", "aarch64", "arm64")


def choose(
    machine: Machine,
    spec: str,
    *,
    variant: str = "auto",
    index_url: str | None = None,
    configured_is_cpu: bool | None = None,
    cpu_index_reachable: bool | None = None,
) -> Plan:
    """Decide how to install ``spec`` (e.g. "torch==2.13.0").

    configured_is_cpu: whether the configured registry's best match for ``spec`` is a CPU
    build (None: unknown). cpu_index_reachable: whether PyTorch's CPU index answers (None:
    not probed). Both are only consulted on Linux when a CPU build is wanted.
    """
    if index_url:
        return Plan(["--index-url", index_url, spec], f"TORCH_INDEX_URL is set: installing {spec} from {index_url}")
    cpu = wants_cpu(machine, variant)
    if not cuda_is_the_default(machine):
        return Plan(
            [spec],
            f"{machine.system} {machine.machine}: the plain wheel of {spec} is already the right build (CPU{', MPS' if machine.system == 'Darwin' else ''})",
        )
    if not cpu:
        why = "TORCH_VARIANT=cuda" if variant == "cuda" else "an NVIDIA GPU was found"
        return Plan([spec], f"{why}: installing the CUDA build of {spec} from the configured registry")
    if configured_is_cpu:
        return Plan([spec], f"the configured package registry already serves a CPU build of {spec}: installing it from there")
    if cpu_index_reachable:
        return Plan(
            ["--extra-index-url", CPU_INDEX, spec],
            f"no NVIDIA GPU here: installing the CPU build of {spec} from PyTorch's index {CPU_INDEX}",
        )
    return Plan(
        [spec],
        f"no NVIDIA GPU here, but PyTorch's CPU index ({CPU_INDEX}) cannot be reached: falling back to the configured registry",
        warning="this may install the CUDA build (several GB). To choose another build, set TORCH_INDEX_URL "
        "(e.g. a mirror of PyTorch's CPU index) or install torch yourself first; the course then keeps it.",
    )


# --- probes of the real machine ---------------------------------------------------------


def detect_machine() -> Machine:
    nvidia = shutil.which("nvidia-smi") is not None or os.path.exists("/proc/driver/nvidia/version")
    return Machine(platform.system(), platform.machine(), nvidia)


def build_from_report(report: dict, name: str = "torch") -> str | None:
    """The version pip's ``--report`` would install for ``name`` (e.g. "2.13.0+cpu"), or None."""
    for item in report.get("install", []):
        meta = item.get("metadata", {})
        if meta.get("name", "").lower() == name:
            return meta.get("version")
    return None


def is_cpu_version(version: str | None) -> bool:
    """Whether a version string names a CPU-only build: "2.13.0+cpu" yes, "2.13.0" (PyPI's CUDA build) no."""
    return bool(version) and "+" in version and version.split("+", 1)[1].startswith("cpu")


def configured_build(python: str, spec: str, timeout: float = 120) -> str | None:
    """Ask pip (without installing or downloading wheels) which torch the configured registry would give."""
    cmd = [python, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--no-deps", "--report", "-", spec]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout
        return build_from_report(json.loads(out))
    except (subprocess.SubprocessError, json.JSONDecodeError, OSError):
        return None


def reachable(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def torch_installed(python: str) -> str | None:
    probe = "import torch; print(torch.__version__)"
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--spec",
        default=os.environ.get("TORCH_SPEC") or DEFAULT_SPEC,
        help=f"the requirement (default {DEFAULT_SPEC}; env TORCH_SPEC)",
    )
    parser.add_argument(
        "--variant",
        default=os.environ.get("TORCH_VARIANT") or "auto",
        choices=VARIANTS,
        help="auto (CPU unless an NVIDIA GPU is found), cpu or cuda (env TORCH_VARIANT)",
    )
    parser.add_argument(
        "--index-url", default=os.environ.get("TORCH_INDEX_URL") or None, help="install from this index (env TORCH_INDEX_URL)"
    )
    parser.add_argument("--python", default=sys.executable, help="the environment's interpreter")
    parser.add_argument("--plan", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)

    have = torch_installed(args.python)
    if have and not args.plan:
        print(f"torch {have} is already installed: keeping it.")
        return 0
    machine = detect_machine()
    configured = index_ok = None
    if not args.index_url and cuda_is_the_default(machine) and wants_cpu(machine, args.variant):
        version = configured_build(args.python, args.spec)
        configured = is_cpu_version(version)
        if not configured:
            index_ok = reachable(CPU_INDEX + "/torch/")
    plan = choose(
        machine,
        args.spec,
        variant=args.variant,
        index_url=args.index_url,
        configured_is_cpu=configured,
        cpu_index_reachable=index_ok,
    )
    print(f"PyTorch: {plan.reason}.")
    if plan.warning:
        print(f"WARNING: {plan.warning}", file=sys.stderr)
    cmd = [args.python, "-m", "pip", "install", *plan.pip_args]
    print("  " + " ".join(cmd), flush=True)
    if args.plan:
        return 0
    code = subprocess.call(cmd)
    if code == 0:
        check = "import torch; print(f'installed torch {torch.__version__}, CUDA: {torch.version.cuda or \"none (CPU build)\"}')"
        subprocess.call([args.python, "-c", check])
    return code


if __name__ == "__main__":
    sys.exit(main())
