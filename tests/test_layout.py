"""The package's shape: small modules and functions, imports that flow one way, a CLI that starts fast."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "gradaccum"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100
# The core knows no job: it never imports these (DESIGN.md: cli -> jobs -> setup -> core).
CORE = ("accumulate", "precision", "losses", "distributed", "data", "records", "models", "packing", "checkpoint",
        "async_save", "layer_checkpointing")
JOBS = ("cli", "config_file", "train", "saving", "reporting", "audit", "check", "hf", "setup", "run_folder",
        "plots")


def _modules() -> dict[str, Path]:
    """Dotted name below gradaccum ('audit.report', 'cli') -> file."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"] = path
    return names


def _imports(name: str, path: Path) -> set[str]:
    """The gradaccum modules `name` imports, at any depth of its code (lazy imports included)."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1] if node.level > 1 else package
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found |= {f"{target}.{alias.name}".strip(".") for alias in node.names} | {target}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradaccum"):
            found.add(node.module.removeprefix("gradaccum").strip("."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("gradaccum").strip(".") for a in node.names if a.name.startswith("gradaccum")}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {target for target in _imports(name, path) if target in modules and target != name}
            for name, path in modules.items()}


def test_modules_and_functions_are_small():
    too_long = []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long


def test_no_import_cycle_and_the_core_imports_no_job():
    graph = _graph()
    for name, targets in graph.items():
        if name.split(".")[0] in CORE:
            assert not {t for t in targets if t.split(".")[0] in JOBS}, (name, targets)
    assert not [name for name, targets in graph.items() if "cli" in targets and name != "__main__"]

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for target in graph.get(node, ()):
                if target == start:
                    return trail + [start]
                if target not in trail:
                    stack.append((target, trail + [target]))
        return None

    cycles = [cycle for name in graph if (cycle := cycle_from(name))]
    assert not cycles, cycles[0]


def test_the_layout_check_can_fail(tmp_path, monkeypatch):
    """A module over the limit and a cycle are seen: the checks above are not vacuous."""
    package = tmp_path / "gradaccum"
    package.mkdir()
    (package / "a.py").write_text("from . import b\n" + "x = 1\n" * (MAX_MODULE_LINES + 1))
    (package / "b.py").write_text("def f():\n    from .a import x\n    return x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert _graph() == {"a": {"b"}, "b": {"a"}}
    with pytest.raises(AssertionError, match="a: 502 lines"):
        test_modules_and_functions_are_small()
    with pytest.raises(AssertionError):
        test_no_import_cycle_and_the_core_imports_no_job()


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["audit", "--help"], ["check", "--help"]])
def test_help_imports_no_torch(argv):
    """`gradaccum --help` reads only config.py: torch (2-3 s to import) is not loaded."""
    code = (f"import sys\nfrom gradaccum.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules)\n"
            "print('imported:', ' '.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert "train" in out.stdout or "--model" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "imported:", out.stdout[-300:]
