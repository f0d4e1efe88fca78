"""The architecture holds: the model core reads alone, the folders keep their roles, arrows run one way."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from moe_course.moe import MoELayer

PACKAGE = Path(__file__).resolve().parents[1] / "moe_course"
# The model core: the flat files the lessons show, in reading order (and the device, the accounting, show_source).
CORE = [
    "device",
    "experts",
    "gating",
    "mixture",
    "routing",
    "losses",
    "dispatch",
    "moe",
    "models",
    "attention",
    "transformer",
    "flops",
    "show",
]
# Top-level files that are entry points, not model code: `python -m moe_course` and `python -m moe_course.train`.
ENTRIES = ["__init__", "__main__", "train"]
MAX_TOP_LEVEL_MODULES = 15  # besides __init__.py
# Every folder and what it may import besides itself ("core" = the CORE files). Arrows run one way:
# figures / experiments → analysis → training → data → core → fast.
ROLES = {
    "fast": set(),
    "data": {"core"},
    "training": {"core", "data"},
    "analysis": {"core", "data", "training"},
    "experiments": {"core", "data", "training", "analysis", "variants"},
    "figures": {"core", "data", "training", "analysis", "experiments"},
    "bench": {"core", "fast", "training", "data"},  # data: the LM benchmark trains on the corpus
    "variants": {"core", "data"},
    "distributed": {"core", "data", "training", "variants"},
    # course tooling: the hidden tests use what the lessons use; the learner's command and the exercise builder share files
    "checks": {"core", "data", "training", "analysis", "experiments", "variants", "distributed"},
    "course": {"exercises"},
    "exercises": {"course"},
}
# What the core must never import: figures and widgets, experiments, training, benchmarks, course tooling (and the rest).
NOT_FOR_THE_CORE = set(ROLES) - {"fast"}


def _imports(path: Path) -> set[str]:
    """What a file imports from the package, one name per import: a folder ("training") or a top-level module ("moe")."""
    package = list(path.relative_to(PACKAGE).parts[:-1])  # the folders of the file, [] at the top level
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            targets = [base + node.module.split(".")] if node.module else [base + [a.name] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moe_course."):
            targets = [node.module.split(".")[1:]]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".")[1:] for a in node.names if a.name.startswith("moe_course.")]
        else:
            continue
        names.update(t[0] for t in targets if t)
    return names


def _role(name: str) -> str:
    """A first name below the package → its role: a folder's name, or "core" for a top-level module."""
    return name if (PACKAGE / name).is_dir() else "core"


def test_the_package_has_at_most_15_top_level_modules_each_core_or_an_entry_point():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(modules) - 1 <= MAX_TOP_LEVEL_MODULES, f"{len(modules) - 1} top-level modules besides __init__.py: {modules}"
    unknown = set(modules) - set(CORE) - set(ENTRIES)
    assert not unknown, (
        f"moe_course/{sorted(unknown)} is neither core nor an entry point: put it in a role folder, or name it in CORE"
    )


def test_every_folder_is_a_known_role_folder():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__" and not p.name.startswith(".")}
    assert folders <= set(ROLES), f"moe_course/{sorted(folders - set(ROLES))}/ is not a role folder ({sorted(ROLES)})"
    for folder in folders:
        assert (PACKAGE / folder / "__init__.py").exists(), f"moe_course/{folder}/ has no __init__.py"


@pytest.mark.parametrize("module", CORE)
def test_the_core_never_imports_figures_experiments_training_benchmarks_or_course_tooling(module):
    wrong = {name for name in _imports(PACKAGE / f"{module}.py") if _role(name) in NOT_FOR_THE_CORE}
    assert not wrong, f"moe_course/{module}.py imports {sorted(wrong)}"


@pytest.mark.parametrize("folder", sorted(ROLES))
def test_each_folder_imports_only_what_lies_below_it(folder):
    wrong = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        wrong += [
            f"{path.relative_to(PACKAGE)} imports {name}"
            for name in sorted(_imports(path))
            if _role(name) != folder and _role(name) not in ROLES[folder]
        ]
    assert not wrong, "; ".join(wrong)


def test_the_layering_test_sees_imports_of_every_kind():
    """The parser behind these tests finds relative, absolute and from-package imports (else the tests above pass on nothing)."""
    assert _imports(PACKAGE / "experiments" / "approaches.py") >= {"data", "training", "analysis", "mixture"}
    assert _imports(PACKAGE / "dispatch.py") >= {"fast", "experts"}
    assert "training" in _imports(PACKAGE / "train.py") and _role("training") == "training" and _role("moe") == "core"


@pytest.mark.parametrize("module", CORE)
def test_the_core_holds_no_autograd_function_thread_pool_or_private_torch_api(module):
    source = (PACKAGE / f"{module}.py").read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b) for b in node.bases}
            assert not bases & {"torch.autograd.Function", "Function", "autograd.Function"}, (
                f"{module}.{node.name} is an autograd Function"
            )
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = (
                [a.name for a in node.names] + [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
            )
            assert not any(n.split(".")[0] in ("threading", "concurrent") for n in names), f"{module} imports threads: {names}"
            assert not any(part.startswith("_") and part != "__future__" for n in names for part in n.split(".")), (
                f"{module} imports a private API: {names}"
            )
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            assert not owner.startswith("torch"), f"{module} uses a private torch API: {owner}.{node.attr}"


def test_every_console_script_names_a_function_that_exists():
    import tomllib
    from importlib.metadata import EntryPoint

    scripts = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"moe-course", "moe-train", "moe-bench"} <= set(scripts)
    for name, target in scripts.items():
        assert callable(EntryPoint(name, target, "console_scripts").load()), f"{name} = {target!r} is not a function"


def test_the_moe_layer_forward_reads_in_at_most_50_lines():
    lines = inspect.getsource(MoELayer.forward).splitlines()
    assert len(lines) <= 50, f"MoELayer.forward has {len(lines)} lines"
