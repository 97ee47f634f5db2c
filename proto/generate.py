"""Generate the Python stubs in client/ from proto/, and lint the protos with buf.

    python proto/generate.py            # write stubs into client/
    python proto/generate.py --check    # fail if the committed stubs differ from a fresh build
    python proto/generate.py --lint     # buf lint (STANDARD rules) against buf.yaml

The stubs import each other package-absolutely (`from embedding.v1 import ...`) because
protoc is run with proto/ as the include root.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import google.rpc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
STUB_ROOT = ROOT / "client"
PROTO_FILES = ["embedding/v1/embedding.proto"]
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
# google/rpc/status.proto ships inside googleapis-common-protos.
GOOGLEAPIS_ROOT = Path(next(iter(google.rpc.__path__))).parent.parent
BIN = Path(sys.executable).parent


def _protoc(*args: str) -> None:
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{GOOGLEAPIS_ROOT}"]
    subprocess.run([*cmd, *args, *(str(PROTO_ROOT / f) for f in PROTO_FILES)], check=True)


def generate(out_dir: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2_grpc.py and their mypy-protobuf .pyi files under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _protoc(
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
    )
    return sorted(
        p.relative_to(out_dir) for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES)
    )


def check() -> list[str]:
    """Names of generated files that differ from (or are missing in) client/."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        return [
            str(rel)
            for rel in generate(fresh)
            if not (STUB_ROOT / rel).exists()
            or not filecmp.cmp(fresh / rel, STUB_ROOT / rel, shallow=False)
        ]


def lint() -> None:
    """buf lint on an image built by protoc, so the googleapis import resolves offline."""
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image.binpb"
        _protoc("--include_imports", "--include_source_info", f"--descriptor_set_out={image}")
        paths = [arg for f in PROTO_FILES for arg in ("--path", f)]
        buf = shutil.which("buf", path=str(BIN)) or "buf"
        subprocess.run(
            [buf, "lint", str(image), "--config", str(ROOT / "buf.yaml"), *paths], check=True
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="compare with the committed stubs")
    group.add_argument("--lint", action="store_true", help="run buf lint")
    args = parser.parse_args()
    if args.lint:
        lint()
    elif args.check:
        stale = check()
        if stale:
            print("stale generated stubs: " + ", ".join(stale), file=sys.stderr)
            return 1
    else:
        for rel in generate(STUB_ROOT):
            print(f"wrote client/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
