"""Generates ``dspex_bridge/_proto`` from ``native/dspex_grpc/proto`` with
grpcio-tools. Run at install time (setup.py) and by the test suite, so the
stubs always match the proto the server was built from; they are not
committed."""
from __future__ import annotations

import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "native", "dspex_grpc", "proto"))
OUT = os.path.join(HERE, "_proto")


def generate(proto_dir: str = PROTO_DIR, out: str = OUT) -> None:
    from grpc_tools import protoc
    import grpc_tools

    src = os.path.join(proto_dir, "bridge_service.proto")
    os.makedirs(out, exist_ok=True)
    target = os.path.join(out, "bridge_service_pb2.py")
    if os.path.exists(target) and os.path.getmtime(target) >= os.path.getmtime(src):
        return
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    code = protoc.main(
        ["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}",
         f"--grpc_python_out={out}", src]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed ({code}) on {src}")
    # The generated service module imports its messages as a top-level module.
    grpc_file = os.path.join(out, "bridge_service_pb2_grpc.py")
    with open(grpc_file) as f:
        text = f.read()
    text = re.sub(r"^import bridge_service_pb2", "from . import bridge_service_pb2", text, flags=re.M)
    with open(grpc_file, "w") as f:
        f.write(text)
    open(os.path.join(out, "__init__.py"), "a").close()


if __name__ == "__main__":
    generate()
