"""The house plan: each floor of the package imports only from its own floor and those below it.

model files -> hub records and metrics -> data -> training -> tasks -> scripts. The model files (what
`save_pretrained` copies beside a checkpoint for `trust_remote_code`) import only torch, transformers, the standard
library and each other.
"""

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_FILES = (
    "configuration_pvt",
    "modeling_pvt",
    "image_processing_pvt",
    "cpu_acceleration",
    "configuration_pvt_heads",
    "modeling_pvt_heads",
)
FLOORS = {
    "model": 0,
    "runtime": 1,
    "hub": 1,
    "metrics": 1,
    "data": 2,
    "training": 3,
    "tasks": 4,
    "scripts": 5,
}


def floor_of(module: str) -> str:
    """The floor of a `modeling_pvt.*` module name."""
    parts = module.split(".")
    package = REPO / "modeling_pvt"
    is_module = len(parts) > 1 and (
        parts[1] in FLOORS or (package / parts[1]).is_dir() or (package / f"{parts[1]}.py").is_file()
    )
    if not is_module or parts[1] in MODEL_FILES:  # the root package, or a name it exports
        return "model"
    return parts[1]


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = list(relative.parts)
    if parts[0] == "scripts":
        parts = ["modeling_pvt", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, source: str | None = None) -> list[tuple[str, int]]:
    """Every module `path` (or `source`, as if it were at `path`) imports, relative imports resolved, with the line."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` names modules of the package as well as attributes
                names = [f"{target}.{alias.name}" for alias in node.names] if node.module is None else [target]
                found += [(name, node.lineno) for name in names]
            else:
                found.append((node.module, node.lineno))
    return found


def package_files() -> list[Path]:
    return sorted([*(REPO / "modeling_pvt").rglob("*.py"), *(REPO / "scripts").glob("*.py")])


def test_floors_are_known_and_the_sketch_matches_the_tree():
    floors = {floor_of(module_name(path)) for path in package_files()}
    assert floors <= set(FLOORS), floors - set(FLOORS)
    assert {"model", "hub", "data", "training", "tasks", "scripts"} <= floors


@pytest.mark.parametrize("path", package_files(), ids=lambda path: str(path.relative_to(REPO)))
def test_no_import_reaches_a_higher_floor(path: Path):
    own = floor_of(module_name(path))
    upward = [
        f"line {line}: {name} ({floor_of(name)})"
        for name, line in imported_modules(path)
        if name.split(".")[0] == "modeling_pvt" and FLOORS[floor_of(name)] > FLOORS[own]
    ]
    assert not upward, f"{path.relative_to(REPO)} ({own}) imports from above: {upward}"


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_files_import_only_torch_transformers_the_standard_library_and_each_other(name: str):
    allowed = {"torch", "transformers", "numpy", "modeling_pvt"} | set(sys.stdlib_module_names)
    path = REPO / "modeling_pvt" / f"{name}.py"
    others = [
        f"line {line}: {module}" for module, line in imported_modules(path) if module.split(".")[0] not in allowed
    ]
    assert not others, others
    local = [module for module, _ in imported_modules(path) if module.startswith("modeling_pvt")]
    assert all(module.split(".")[1] in MODEL_FILES for module in local), local


def test_the_checker_resolves_relative_imports_to_their_floor():
    """A data module that imported the training floor would be caught: relative imports resolve to their floor."""
    probe = REPO / "modeling_pvt" / "data" / "probe.py"
    source = "from ..training import loop\nfrom .sampling import EpochSeededDataset\nfrom .. import PvtConfig\n"
    resolved = [(name, floor_of(name)) for name, _ in imported_modules(probe, source)]
    assert resolved == [
        ("modeling_pvt.training", "training"),
        ("modeling_pvt.data.sampling", "data"),
        ("modeling_pvt.PvtConfig", "model"),
    ]
