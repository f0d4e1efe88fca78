"""The architecture holds: the model core reads alone, and the fast path stays out of it."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from moe_course.moe import MoELayer

PACKAGE = Path(__file__).resolve().parents[1] / "moe_course"
# The model core: the files the lessons show (and the accounting, the device and the clinic MoE).
CORE = ["experts", "gating", "mixture", "routed", "routing", "losses", "dispatch", "moe", "models", "attention", "transformer", "flops", "device"]
# What the core must never import: figures and widgets, experiments, training, benchmarks, course tooling.
NOT_FOR_THE_CORE = {
    "plots", "lm_plots", "widgets",
    "approaches", "ensembles", "specialists", "balance", "playground", "lm_runs", "specialisation", "lm_routing", "metrics",
    "training", "train", "lm",
    "bench", "timing", "memory",
    "checks", "exercises", "check", "show",
}


def _imports(path: Path) -> set[str]:
    """The moe_course modules a file imports, as first names below the package (``from .x.y import z`` → x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                names.add(node.module.split(".")[0])
            elif node.level == 1:
                names.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("moe_course."):
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("moe_course."))
    return names


@pytest.mark.parametrize("module", CORE)
def test_the_core_never_imports_figures_experiments_training_benchmarks_or_course_tooling(module):
    wrong = _imports(PACKAGE / f"{module}.py") & NOT_FOR_THE_CORE
    assert not wrong, f"moe_course/{module}.py imports {sorted(wrong)}"


def test_the_fast_path_imports_nothing_of_the_core():
    for path in sorted((PACKAGE / "fast").glob("*.py")):
        wrong = {name for name in _imports(path) if (PACKAGE / f"{name}.py").exists()}  # package modules, not fast/'s own
        assert not wrong, f"moe_course/fast/{path.name} imports {sorted(wrong)}"


@pytest.mark.parametrize("module", CORE)
def test_the_core_holds_no_autograd_function_thread_pool_or_private_torch_api(module):
    source = (PACKAGE / f"{module}.py").read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b) for b in node.bases}
            assert not bases & {"torch.autograd.Function", "Function", "autograd.Function"}, f"{module}.{node.name} is an autograd Function"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            assert not any(n.split(".")[0] in ("threading", "concurrent") for n in names), f"{module} imports threads: {names}"
            assert not any(part.startswith("_") and part != "__future__" for n in names for part in n.split(".")), f"{module} imports a private API: {names}"
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            assert not owner.startswith("torch"), f"{module} uses a private torch API: {owner}.{node.attr}"


def test_the_moe_layer_forward_reads_in_at_most_50_lines():
    lines = inspect.getsource(MoELayer.forward).splitlines()
    assert len(lines) <= 50, f"MoELayer.forward has {len(lines)} lines"
