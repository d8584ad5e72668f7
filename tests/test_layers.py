"""The package's layers: every module of shmd imports only the layers below its own.

Read from the source (AST), every import statement counted, those inside
functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "shmd"

#: Each layer and the layers (besides its own) whose modules it may import.
#: ``shmd`` is the package's __init__ (the re-exported names).
ALLOWED: dict[str, set[str]] = {
    "shmd.errors": set(),
    "shmd._sys": {"shmd.errors"},
    "shmd.bus": {"shmd.errors", "shmd._sys"},
    "shmd.control": {"shmd.errors", "shmd._sys"},
    "shmd.client": {"shmd.errors", "shmd._sys", "shmd.bus", "shmd.control"},
    "shmd.config": {"shmd.errors", "shmd._sys", "shmd.bus", "shmd.control"},
    "shmd.daemons": {
        "shmd.errors",
        "shmd._sys",
        "shmd.bus",
        "shmd.control",
        "shmd.client",
        "shmd.config",
    },
    "shmd.cli": {
        "shmd.errors",
        "shmd._sys",
        "shmd.bus",
        "shmd.control",
        "shmd.client",
        "shmd.config",
        "shmd.daemons",
        "shmd",
    },
    "shmd": {"shmd.errors", "shmd.bus", "shmd.client"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The layer a module belongs to: the longest key of ALLOWED it is in."""
    found = [layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")]
    assert found, f"{module} belongs to no layer: add it to ALLOWED"
    return max(found, key=len)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every shmd module that path imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative imports are not used"
            assert node.module is not None
            if node.module == "shmd":
                # `from shmd import x`: the submodule shmd.x if there is one,
                # else a name re-exported by the package's __init__.
                for alias in node.names:
                    sub = PACKAGE / alias.name
                    is_module = sub.is_dir() or sub.with_suffix(".py").is_file()
                    found.append((node.lineno, f"shmd.{alias.name}" if is_module else "shmd"))
            else:
                found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name == "shmd" or name.startswith("shmd.")]


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_module_imports_only_its_own_layer_and_those_below(path: Path) -> None:
    """No import of a module reaches a layer above (or beside) its own."""
    own = layer_of(module_name(path))
    bad = [
        f"{module_name(path)}:{line} imports {name}"
        for line, name in imports(path)
        if (target := layer_of(name)) != own and target not in ALLOWED[own]
    ]
    assert bad == []


def test_every_layer_has_modules() -> None:
    """Each layer in ALLOWED names a module or package that exists (no stale rule)."""
    names = {module_name(p) for p in MODULES}
    assert all(any(n == layer or n.startswith(layer + ".") for n in names) for layer in ALLOWED)


def test_config_never_exits_or_logs() -> None:
    """The configuration layer raises ConfigError; exiting and logging are the daemons'."""
    for path in sorted((PACKAGE / "config").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Name | ast.Attribute):
                name = node.id if isinstance(node, ast.Name) else node.attr
                assert name not in ("SystemExit", "exit", "_exit"), (
                    f"{path}:{node.lineno} exits the process"
                )
        assert not [name for _, name in imports(path) if name.startswith("shmd.daemons")]
        assert "structlog" not in path.read_text(), f"{path} logs"


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    """An import of a daemon module from the bus is reported (the check can fail)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from shmd.daemons import logs\n    return logs\n")
    [(line, name)] = imports(probe)
    assert (line, layer_of(name)) == (2, "shmd.daemons")
    assert layer_of(name) not in ALLOWED["shmd.bus"]
