"""Lower layers never import higher ones: kernels import nothing of the package, ops import only kernels."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIGHER = {"models", "batched", "reference", "runner", "federation", "train", "attack", "reproduce", "privacy",
          "config", "data", "partition", "checkpoint"}


def package_imports(path: Path) -> set[str]:
    """First component below the package of every relative or hyperfl_fast import in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level >= 2 or module.startswith("hyperfl_fast"):  # leaves the module's own folder
                parts = module.split(".")[1:] if module.startswith("hyperfl_fast") else module.split(".")
                found.update([parts[0]] if parts and parts[0] else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("hyperfl_fast."))
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "hyperfl_fast" / "ops").glob("*.py")), ids=lambda p: p.name)
def test_ops_do_not_import_the_model_layer(path):
    assert not package_imports(path) & HIGHER, f"{path.name} imports {package_imports(path) & HIGHER}"


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_nothing_above_them(path):
    assert not package_imports(path), f"{path.name} imports {package_imports(path)}"


def test_the_check_sees_a_layer_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ..models import LEAKY_SLOPE\nimport hyperfl_fast.runner\n")
    assert package_imports(bad) == {"models", "runner"}
