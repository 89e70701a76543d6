"""Generates the Python gRPC modules (with .pyi stubs) from protos/ into nurec_jax/_proto/.

    python tools/gen_protos.py            # regenerate (commit the result)
    python tools/gen_protos.py --check    # exit 1 if the committed modules are stale

The generated files are committed, so running the package needs no protoc; the test suite runs
`--check`. protoc comes from the pinned grpcio-tools (test extra).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_DIR = os.path.join(ROOT, "protos")
OUT_DIR = os.path.join(ROOT, "nurec_jax", "_proto")
PACKAGE = "nurec_jax._proto"
_INIT = '"""Generated gRPC modules (tools/gen_protos.py); do not edit."""\n'


def generate(out_dir: str) -> list[str]:
    from grpc_tools import protoc

    import grpc_tools

    protos = sorted(f for f in os.listdir(PROTO_DIR) if f.endswith(".proto"))
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}"] + protos
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    stems = [p[:-6] for p in protos]
    # protoc writes `import common_pb2`; make the imports package-relative.
    pattern = re.compile(r"^import (%s)_pb2 as " % "|".join(map(re.escape, stems)), re.M)
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        with open(path) as f:
            text = f.read()
        text = pattern.sub(lambda m: f"from {PACKAGE} import {m.group(1)}_pb2 as ", text)
        text = re.sub(r"^import (%s)_pb2$" % "|".join(map(re.escape, stems)),
                      lambda m: f"from {PACKAGE} import {m.group(1)}_pb2", text, flags=re.M)
        with open(path, "w") as f:
            f.write(text)
    with open(os.path.join(out_dir, "__init__.py"), "w") as f:
        f.write(_INIT)
    return sorted(os.listdir(out_dir))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(tmp)
        if args.check:
            stale = [f for f in files if not os.path.exists(os.path.join(OUT_DIR, f))
                     or not filecmp.cmp(os.path.join(tmp, f), os.path.join(OUT_DIR, f), shallow=False)]
            extra = sorted(set(os.listdir(OUT_DIR)) - set(files) - {"__pycache__"}) if os.path.isdir(OUT_DIR) else []
            if stale or extra:
                print(f"stale generated modules: {stale + extra}; run python tools/gen_protos.py", file=sys.stderr)
                return 1
            print("generated modules are up to date")
            return 0
        os.makedirs(OUT_DIR, exist_ok=True)
        for f in files:
            shutil.copyfile(os.path.join(tmp, f), os.path.join(OUT_DIR, f))
        print(f"wrote {len(files)} files to {os.path.relpath(OUT_DIR, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
