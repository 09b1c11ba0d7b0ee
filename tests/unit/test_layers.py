"""The package's layers point down: every module may import only its own layer and those below.

    leaf helpers      errors, log, metrics (no razorfs imports)
    storage           razorfs/storage: byte formats, files, WAL segments, checkpoint files
    state             razorfs/state: the tree state machine, the redo schema, recovery
    offline tools     fsck, datadir, restore: storage and state, never the actors
    actors            razorfs/actors: mailbox, messages, the four actors
    fuse              razorfs/fuse: the pyfuse3 adapter, the data path, the error edge
    daemon and cli    daemon, cli, control, prometheus, mount_helper: anything

A new module must be given its layer here: the test fails for a module it cannot place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import razorfs

PACKAGE = Path(razorfs.__file__).parent

LAYERS = {
    "leaf": ["razorfs.errors", "razorfs.log", "razorfs.metrics"],
    "storage": ["razorfs.storage"],
    "state": ["razorfs.state"],
    "offline tools": ["razorfs.fsck", "razorfs.datadir", "razorfs.restore"],
    "actors": ["razorfs.actors"],
    "fuse": ["razorfs.fuse"],
    "daemon and cli": ["razorfs.daemon", "razorfs.cli", "razorfs.control", "razorfs.prometheus",
                       "razorfs.mount_helper", "razorfs.kernel_mount", "razorfs.__main__",
                       "razorfs"],
}
MAY_IMPORT = {
    "leaf": {"leaf"},
    "storage": {"leaf", "storage"},
    "state": {"leaf", "storage", "state"},
    "offline tools": {"leaf", "storage", "state", "offline tools"},
    "actors": {"leaf", "storage", "state", "actors"},
    "fuse": {"leaf", "storage", "state", "actors", "fuse"},
    "daemon and cli": set(LAYERS),
}


def layer_of(module: str) -> str | None:
    best = None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (layer, prefix)
    return best[0] if best else None


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def razorfs_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every razorfs import in the file, in functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from razorfs.state import redo" imports the module razorfs.state.redo
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "razorfs"]


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_imports_point_down(path: Path) -> None:
    module = module_name(path)
    layer = layer_of(module)
    assert layer is not None, f"{module} has no layer: place it in LAYERS"
    upward = [f"line {line}: {name} ({layer_of(name)})"
              for line, name in razorfs_imports(path)
              if layer_of(name) not in MAY_IMPORT[layer]]
    assert not upward, f"{module} ({layer}) imports upward: {upward}"


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from razorfs.actors import messages\n")
    assert razorfs_imports(source) == [(2, "razorfs.actors.messages")]
    assert layer_of("razorfs.actors.messages") not in MAY_IMPORT[layer_of("razorfs.state.tree")]
