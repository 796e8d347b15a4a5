"""The structure the docs promise (docs/ARCHITECTURE.md): no private name crosses a
package boundary, files stay small, importing lowbit stays cheap, and every config
type has a stage. (The layers themselves are checked by import-linter in CI.)"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lowbit.stages  # noqa: F401  (registers the stages)
from lowbit.config import CONFIG_TYPES
from lowbit.stages.base import handler_for

SRC = Path(__file__).resolve().parents[1] / "src" / "lowbit"
MAX_LINES = 400


def _package(module: str) -> str:
    """The package a module belongs to: lowbit.backends.onnx.plan -> lowbit.backends.onnx."""
    parts = module.split(".")
    return ".".join(parts[:-1]) if len(parts) > 1 else module


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.append("__init__")
    return ".".join(parts)


def test_no_private_name_is_imported_from_another_package():
    offences = []
    for path in SRC.rglob("*.py"):
        importer = _package(_module_name(path))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowbit"):
                source_package = node.module if (SRC.parent / node.module.replace(".", "/")).is_dir() \
                    else _package(node.module)
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__") \
                            and source_package != importer:
                        offences.append(f"{path.relative_to(SRC)}: {node.module}.{alias.name}")
    assert offences == []


def test_no_source_file_is_over_the_size_limit():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_every_config_type_has_a_registered_stage():
    for kind, config_type in CONFIG_TYPES.items():
        assert handler_for(config_type()) is not None, kind


def test_importing_lowbit_does_not_import_torch_or_onnxruntime():
    code = ("import sys, lowbit; lowbit.__version__; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
