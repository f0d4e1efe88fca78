"""tools/install_torch.py: which PyTorch build the set-up installs on which machine."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from notebook_tools import ROOT

_spec = importlib.util.spec_from_file_location("install_torch", ROOT / "tools" / "install_torch.py")
install_torch = importlib.util.module_from_spec(_spec)
sys.modules["install_torch"] = install_torch
_spec.loader.exec_module(install_torch)

Machine, choose, CPU_INDEX = install_torch.Machine, install_torch.choose, install_torch.CPU_INDEX
LAPTOP = Machine("Linux", "x86_64", has_nvidia_gpu=False)
GPU_BOX = Machine("Linux", "x86_64", has_nvidia_gpu=True)
MAC = Machine("Darwin", "arm64", has_nvidia_gpu=False)
SPEC = "torch==2.13.0"


def test_linux_laptop_without_gpu_gets_the_cpu_index():
    plan = choose(LAPTOP, SPEC, configured_is_cpu=False, cpu_index_reachable=True)
    assert plan.pip_args == ["--extra-index-url", CPU_INDEX, SPEC]
    assert "CPU build" in plan.reason and not plan.warning


def test_registry_that_already_serves_a_cpu_build_is_used_without_the_cpu_index():
    # the course's build machines: they reach only their registry, which holds torch 2.13.0+cpu
    plan = choose(LAPTOP, SPEC, configured_is_cpu=True, cpu_index_reachable=False)
    assert plan.pip_args == [SPEC]
    assert "already serves a CPU build" in plan.reason and not plan.warning


def test_unreachable_cpu_index_falls_back_to_the_registry_with_a_warning():
    plan = choose(LAPTOP, SPEC, configured_is_cpu=False, cpu_index_reachable=False)
    assert plan.pip_args == [SPEC]
    assert "cannot be reached" in plan.reason
    assert "CUDA" in plan.warning and "TORCH_INDEX_URL" in plan.warning


def test_nvidia_machine_gets_the_plain_cuda_wheel():
    plan = choose(GPU_BOX, SPEC)
    assert plan.pip_args == [SPEC] and "NVIDIA GPU was found" in plan.reason


@pytest.mark.parametrize("machine", [LAPTOP, GPU_BOX])
def test_variant_overrides_the_detection(machine):
    assert choose(machine, SPEC, variant="cuda").pip_args == [SPEC]
    cpu = choose(machine, SPEC, variant="cpu", configured_is_cpu=False, cpu_index_reachable=True)
    assert cpu.pip_args == ["--extra-index-url", CPU_INDEX, SPEC]


def test_an_index_url_wins_over_everything():
    url = "https://download.pytorch.org/whl/cu128"
    assert choose(LAPTOP, SPEC, index_url=url).pip_args == ["--index-url", url, SPEC]


def test_macos_takes_the_plain_wheel():
    plan = choose(MAC, SPEC, configured_is_cpu=False, cpu_index_reachable=False)
    assert plan.pip_args == [SPEC] and "MPS" in plan.reason and not plan.warning


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="TORCH_VARIANT must be one of auto, cpu, cuda, got 'rocm'"):
        choose(LAPTOP, SPEC, variant="rocm")


@pytest.mark.parametrize(
    ("version", "cpu"),
    [
        ("2.13.0+cpu", True),
        ("2.13.0+cpu.cxx11.abi", True),
        ("2.13.0", False),
        ("2.13.0+cu128", False),
        (None, False),
        ("", False),
    ],
)
def test_cpu_builds_are_recognised_by_their_version(version, cpu):
    assert install_torch.is_cpu_version(version) is cpu


def test_pips_report_is_read_for_torch_only():
    report = {
        "install": [
            {"metadata": {"name": "filelock", "version": "3.0"}},
            {"metadata": {"name": "torch", "version": "2.13.0+cpu"}},
        ]
    }
    assert install_torch.build_from_report(report) == "2.13.0+cpu"
    assert install_torch.build_from_report({"install": []}) is None


def test_plan_runs_on_this_machine_and_never_installs(tmp_path):
    """`--plan` prints a decision (here: whichever this machine calls for) and changes nothing."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "install_torch.py"), "--plan"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("PyTorch: ") and "-m pip install" in result.stdout
