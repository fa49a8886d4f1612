"""The family registry: every family folder is registered and installed, declares a
template we have, and builds only on what ``mlc_edge/models/`` shares, never on a
sibling family."""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

import mlc_edge.models as models
from mlc_edge.bundle.conv_templates import TEMPLATE_NAMES
from mlc_edge.models import FAMILIES, family_by_model_type

MODELS_DIR = Path(models.__file__).parent
FAMILY_DIRS = sorted(p.parent.name for p in MODELS_DIR.glob("*/__init__.py"))


def test_every_family_folder_is_registered():
    assert FAMILY_DIRS == sorted(f.model_type for f in FAMILIES)
    for name in FAMILY_DIRS:
        family = importlib.import_module(f"mlc_edge.models.{name}").FAMILY
        assert family in FAMILIES
        assert family_by_model_type(name) is family


def test_every_family_package_is_installed():
    pyproject = tomllib.loads((MODELS_DIR.parents[1] / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]
    missing = [n for n in FAMILY_DIRS if f"mlc_edge.models.{n}" not in packages]
    assert not missing, f"add to pyproject.toml's packages: {missing}"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_family_declares_a_known_conv_template(family):
    assert family.conv_template in TEMPLATE_NAMES


def _imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of the modules ``path`` (in ``package``) imports from."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # ``from .. import llama`` names the sibling as an alias.
            names.update([module, *(f"{module}.{alias.name}" for alias in node.names)])
    return names


@pytest.mark.parametrize("family", FAMILY_DIRS)
def test_no_family_imports_a_sibling(family):
    siblings = {f"mlc_edge.models.{name}" for name in FAMILY_DIRS if name != family}
    for path in (MODELS_DIR / family).glob("*.py"):
        for module in _imported_modules(path, f"mlc_edge.models.{family}"):
            borrowed = [s for s in siblings if module == s or module.startswith(s + ".")]
            assert not borrowed, f"{path.name} imports {module}"
