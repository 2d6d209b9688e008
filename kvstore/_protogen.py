"""Protobuf code generation shared by scripts/gen-proto and the staleness test.

Generated modules land flat in one package directory with imports rewritten to be relative, so
`kvstore._proto` works without touching sys.path.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

PROTO_FILES = ("kv.proto", "internal.proto", "admin.proto")


def generate(proto_root: Path, out_dir: Path) -> list[Path]:
    """Run protoc on proto_root/kvstore/v1/*.proto and write the Python modules into out_dir."""
    from grpc_tools import protoc  # dev dependency, imported lazily
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
        ] + [str(proto_root / "kvstore" / "v1" / name) for name in PROTO_FILES]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed: " + " ".join(args))
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / "kvstore" / "v1").iterdir()):
            text = src.read_text()
            text = re.sub(r"^from kvstore\.v1 import (\w+)", r"from . import \1", text, flags=re.M)
            dest = out_dir / src.name
            dest.write_text(text)
            written.append(dest)
        init = out_dir / "__init__.py"
        init.write_text('"""Generated protobuf and gRPC modules. Do not edit: run scripts/gen-proto."""\n')
        written.append(init)
        return written
