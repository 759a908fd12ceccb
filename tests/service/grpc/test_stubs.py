"""The checked-in gRPC message stubs are exactly what the pinned grpcio-tools writes from the .proto.

Why checked in (and not built at install): the runtime then needs only grpcio + protobuf, the
container build and `pip install` need no code generation step, and a reviewer sees the generated
API change in the diff. This test keeps them honest: it regenerates into a temporary tree with the
dev extra's exact grpcio-tools and compares byte for byte (`make grpc-stubs` rewrites them).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PROTO = Path("service/grpc/proto/grpc_predict_v2.proto")
GENERATED = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi")


def test_checked_in_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the stubs")
    (tmp_path / PROTO.parent).mkdir(parents=True)
    shutil.copy(REPO / PROTO, tmp_path / PROTO)
    out = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.", str(PROTO)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for name in GENERATED:
        fresh = (tmp_path / PROTO.parent / name).read_bytes()
        kept = (REPO / PROTO.parent / name).read_bytes()
        assert fresh == kept, f"{PROTO.parent / name} differs from a fresh generation: run `make grpc-stubs`"


def test_the_service_path_is_the_protocols() -> None:
    """Our message package avoids a descriptor clash; the path clients call must still be KServe's."""
    from service.grpc.server import SERVICE_NAME

    assert SERVICE_NAME == "inference.GRPCInferenceService"
    assert "package boostserve.oip.v2;" in (REPO / PROTO).read_text()
