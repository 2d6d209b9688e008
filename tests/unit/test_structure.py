"""Repository rules: the pure core does no I/O, and generated protobuf code is fresh."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"trio", "grpc", "socket", "os", "time", "sqlite3", "asyncio", "threading",
             "subprocess", "kvstore.node", "kvstore.storage", "kvstore.client", "pathlib", "io", "shutil"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "kvstore" / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_no_io(path: Path) -> None:
    bad = {n for n in _imports(path) if n in FORBIDDEN or n.split(".")[0] in FORBIDDEN
           or any(n.startswith(f + ".") for f in FORBIDDEN)}
    assert not bad, f"{path.name} imports I/O modules: {sorted(bad)}"
    # randomness arrives as a random.Random argument: the type may be named, the global never used
    global_random = [node.attr for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                     and node.value.id == "random" and node.attr != "Random"]
    assert not global_random, f"{path.name} uses the global random generator: {global_random}"


def test_generated_protobuf_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    from kvstore._protogen import generate

    generate(ROOT / "proto", tmp_path)
    committed = ROOT / "kvstore" / "_proto"
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir()}
    current = {p.name: p.read_text() for p in committed.iterdir() if p.suffix in (".py", ".pyi")}
    stale = sorted(n for n in fresh.keys() | current.keys() if fresh.get(n) != current.get(n))
    assert not stale, f"kvstore/_proto is stale ({', '.join(stale)}): run scripts/gen-proto"


def test_every_module_says_what_belongs_in_it() -> None:
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "kvstore").rglob("*.py"))
               if "_proto" not in p.parts and p.stat().st_size > 0 and ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not missing, f"modules without a docstring: {missing}"
