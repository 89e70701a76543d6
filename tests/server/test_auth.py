"""Who may call: TLS, mTLS, the bearer token (every RPC and reflection; health stays open), the
shut_down loopback rule, the start-up warning for exposed servers, bad security flags, and render-grpc's
client flags. Certificates come from tests/data/tls (tools/make_test_certs.sh); no openssl at run time."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import CAM, HEIGHT, decode, rgb_request, rpc_error
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from nurec_jax._proto import common_pb2, sensorsim_pb2_grpc
from nurec_jax.render import RenderOptions
from nurec_jax.renderer import Renderer
from nurec_jax.server import auth
from nurec_jax.server.app import SERVICE_NAME, create_server
from nurec_jax.server.options import ServerOptions

pytestmark = pytest.mark.xdist_group("grpc")

TLS = pathlib.Path(__file__).resolve().parent.parent / "data" / "tls"
SID = "thin-street"
TOKEN = "t0ken-for-tests.only"
E = common_pb2.Empty()
GOOD = (("authorization", f"Bearer {TOKEN}"),)


def _pem(name: str) -> bytes:
    return (TLS / name).read_bytes()


def _tls_channel(port: int, cert: str | None = None, key: str | None = None):
    creds = grpc.ssl_channel_credentials(_pem("ca.pem"), key and _pem(key), cert and _pem(cert))
    channel = grpc.secure_channel(f"127.0.0.1:{port}", creds)
    return channel, sensorsim_pb2_grpc.SensorsimServiceStub(channel)


@pytest.fixture(scope="module")
def renderer():
    return Renderer(RenderOptions(pair_capacity=1 << 16))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


def _secure_server(thin_scene, renderer, token_file, tmp_path_factory, **kw):
    opts = ServerOptions(
        artifact_glob=thin_scene,
        port=0,
        download_cache_dir=str(tmp_path_factory.mktemp("dl")),
        tls_cert_file=str(TLS / "server.pem"),
        tls_key_file=str(TLS / "server.key"),
        auth_token_file=token_file,
        **kw,
    )
    srv, port = create_server("127.0.0.1:0", opts, renderer=renderer)
    assert srv.serving.wait(30)
    return srv, port


@pytest.fixture(scope="module")
def tls_server(thin_scene, renderer, token_file, tmp_path_factory):
    """TLS + bearer token."""
    srv, port = _secure_server(thin_scene, renderer, token_file, tmp_path_factory)
    channel, stub = _tls_channel(port)
    yield srv, port, stub, channel
    channel.close()
    srv.stop(1)


@pytest.fixture(scope="module")
def mtls_server(thin_scene, renderer, token_file, tmp_path_factory):
    """TLS + client certificates signed by the test CA + bearer token."""
    srv, port = _secure_server(
        thin_scene, renderer, token_file, tmp_path_factory, tls_client_ca_file=str(TLS / "ca.pem")
    )
    yield srv, port
    srv.stop(1)


def test_tls_with_token_renders_and_bad_tokens_are_unauthenticated(tls_server, thin_scene):
    _, _, stub, _ = tls_server
    image = decode(stub.render_rgb(rgb_request(thin_scene, SID), metadata=GOOD, timeout=120).image_bytes)
    assert image.shape == (HEIGHT, 64, 3)
    for md in (
        (),
        (("authorization", "Bearer not-the-token"),),
        (("authorization", TOKEN),),
        (("authorization", "Basic " + TOKEN),),
    ):
        code, details = rpc_error(stub.get_version, E, metadata=md, timeout=10)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization" in details, (md, details)
        assert TOKEN not in details
        # The rejection comes before the handler: a render is refused the same way, and the server goes on.
        assert (
            rpc_error(stub.render_rgb, rgb_request(thin_scene, SID), metadata=md, timeout=10)[0]
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert stub.get_available_scenes(E, metadata=GOOD, timeout=10).scene_ids == [SID]
    # The scheme is case-insensitive (RFC 6750).
    assert stub.get_version(E, metadata=(("authorization", f"bearer {TOKEN}"),), timeout=10).version_id


def test_health_is_open_and_reflection_needs_the_token(tls_server):
    _, _, _, channel = tls_server
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    rs = reflection_pb2_grpc.ServerReflectionStub(channel)
    ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
    with pytest.raises(grpc.RpcError) as info:
        next(rs.ServerReflectionInfo(iter(ask), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = next(rs.ServerReflectionInfo(iter(ask), metadata=GOOD, timeout=10))
    assert SERVICE_NAME in {s.name for s in reply.list_services_response.service}


def test_plaintext_client_cannot_talk_to_a_tls_port(tls_server):
    _, port, stub, _ = tls_server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
        plain_stub = sensorsim_pb2_grpc.SensorsimServiceStub(plain)
        assert rpc_error(plain_stub.get_version, E, metadata=GOOD, timeout=5)[0] == grpc.StatusCode.UNAVAILABLE
    assert stub.get_version(E, metadata=GOOD, timeout=10).version_id  # still serving TLS clients


def test_mtls_refuses_clients_without_a_certificate_from_its_ca(mtls_server):
    _, port = mtls_server
    for cert, key in ((None, None), ("other-client.pem", "other-client.key")):
        channel, stub = _tls_channel(port, cert, key)
        with channel:
            assert rpc_error(stub.get_version, E, metadata=GOOD, timeout=5)[0] == grpc.StatusCode.UNAVAILABLE, cert
    channel, stub = _tls_channel(port, "client.pem", "client.key")
    with channel:
        assert stub.get_version(E, metadata=GOOD, timeout=10).version_id
        # mTLS does not replace the token when both are configured.
        assert rpc_error(stub.get_version, E, timeout=10)[0] == grpc.StatusCode.UNAUTHENTICATED


def test_shut_down_from_loopback_stops_a_server(tmp_path):
    srv, port = create_server("127.0.0.1:0", ServerOptions(port=0, download_cache_dir=str(tmp_path)))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        sensorsim_pb2_grpc.SensorsimServiceStub(channel).shut_down(E, timeout=10)
    assert srv.wait_for_termination(30)


@pytest.mark.parametrize(
    "peer,local",
    [
        ("ipv4:127.0.0.1:5555", True),
        ("ipv4:127.1.2.3:1", True),
        ("ipv6:[::1]:5", True),
        ("ipv6:[::ffff:127.0.0.1]:80", True),
        ("unix:/tmp/x", True),
        ("unix-abstract:nre", True),
        ("ipv4:10.1.2.3:5555", False),
        ("ipv4:128.0.0.1:5", False),
        ("ipv6:[2001:db8::1]:5", False),
        ("ipv6:[::ffff:10.0.0.1]:5", False),
        ("ipv6:[fe80::1%eth0]:5", False),
        ("", False),
        (None, False),
        ("ipv4:localhost:5", False),
        ("dns:127.0.0.1", False),
    ],
)
def test_loopback_peers(peer, local):
    assert auth.is_loopback_peer(peer) is local


class _Aborted(Exception):
    pass


class _Context:
    """The bits of a grpc.aio servicer context the shut_down handler uses."""

    def __init__(self, peer):
        self._peer, self.code, self.details = peer, None, None

    def peer(self):
        return self._peer

    async def abort(self, code, details):
        self.code, self.details = code, details
        raise _Aborted

    def time_remaining(self):
        return None

    def add_done_callback(self, callback):
        pass

    def invocation_metadata(self):
        return ()


@pytest.mark.parametrize("allow", [False, True])
def test_shut_down_from_a_remote_peer_needs_allow_remote_shutdown(tmp_path, allow):
    srv, _ = create_server(
        "127.0.0.1:0", ServerOptions(port=0, download_cache_dir=str(tmp_path), allow_remote_shutdown=allow)
    )
    assert srv.serving.wait(30)
    calls = []
    srv.servicer.on_shut_down = lambda: calls.append(1)
    ctx = _Context("ipv4:10.1.2.3:5555")
    try:
        if allow:
            assert asyncio.run(srv.servicer.shut_down(E, ctx)) == E and calls == [1]
        else:
            with pytest.raises(_Aborted):
                asyncio.run(srv.servicer.shut_down(E, ctx))
            assert ctx.code == grpc.StatusCode.PERMISSION_DENIED and "--allow-remote-shutdown" in ctx.details
            assert calls == [] and srv.servicer.stats.status["PERMISSION_DENIED"] == 1
    finally:
        srv.stop(0)


def test_exposed_server_logs_one_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="nurec_jax.server.app")
    srv, _ = create_server("0.0.0.0:0", ServerOptions(port=0, download_cache_dir=str(tmp_path)))
    assert srv.serving.wait(30)  # stopped before its warm-up reports SERVING, the server takes 30 s to stop
    srv.stop(0)
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "reachable from other machines" in r.getMessage()
    ]
    assert len(warnings) == 1 and "no TLS" in warnings[0] and "no authentication" in warnings[0]
    assert auth.exposure_warning("localhost:8080", False, False, False) is None
    assert auth.exposure_warning("[::1]:8080", False, False, False) is None
    assert auth.exposure_warning("unix:/tmp/nre.sock", False, False, False) is None
    assert auth.exposure_warning("0.0.0.0:8080", True, True, False) is None
    assert auth.exposure_warning("0.0.0.0:8080", True, False, True) is None
    assert "no authentication" in auth.exposure_warning("[::]:8080", True, False, False)
    assert "no TLS" in auth.exposure_warning("10.0.0.5:8080", False, True, False)


@pytest.mark.parametrize(
    "kw,flag",
    [
        (dict(tls_key_file="server.key"), "--tls-key-file needs --tls-cert-file"),
        (dict(tls_cert_file="server.pem"), "--tls-cert-file needs --tls-key-file"),
        (dict(tls_client_ca_file="ca.pem"), "--tls-client-ca-file needs --tls-cert-file"),
        (dict(tls_cert_file="missing.pem", tls_key_file="server.key"), "--tls-cert-file: cannot read"),
        (dict(tls_cert_file="server.pem", tls_key_file="client.key"), "--tls-key-file: .* is not the private key"),
        (dict(tls_cert_file="server.key", tls_key_file="server.key"), "--tls-cert-file: .* holds no PEM certificate"),
        (
            dict(tls_cert_file="server.pem", tls_key_file="server.key", tls_client_ca_file="server.key"),
            "--tls-client-ca-file: .* holds no usable PEM certificate",
        ),
        (dict(auth_token_file="missing-token"), "--auth-token-file: cannot read"),
        (dict(auth_token_file="EMPTY"), "--auth-token-file: .* is empty"),
        (dict(auth_token_file="SPACED"), "--auth-token-file: .* without spaces"),
    ],
)
def test_bad_security_flags_fail_at_start_with_one_line(tmp_path, kw, flag):
    (tmp_path / "EMPTY").write_text("\n  \n")
    (tmp_path / "SPACED").write_text("two words\n")
    kw = {k: str(tmp_path / v) if v in ("EMPTY", "SPACED", "missing-token") else str(TLS / v) for k, v in kw.items()}
    with pytest.raises(ValueError, match=flag) as info:
        ServerOptions(**kw).validate()
    assert "\n" not in str(info.value)


def test_render_grpc_with_tls_client_certificate_and_token(mtls_server, thin_scene, token_file, tmp_path):
    _, port = mtls_server
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    base = [
        sys.executable,
        "-m",
        "nurec_jax.cli.render_grpc",
        f"--artifact-path={thin_scene}",
        f"--output-dir={out}",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--tls-ca-file={TLS / 'ca.pem'}",
        "--tls-server-name=localhost",
        f"--auth-token-file={token_file}",
    ]
    proc = subprocess.run(
        base
        + [
            f"--tls-cert-file={TLS / 'client.pem'}",
            f"--tls-key-file={TLS / 'client.key'}",
            f"--height={HEIGHT}",
            f"--camera-id={CAM}",
            "--max-frames=1",
            "--image-format=png",
            "--video-format=none",
            "--no-progress",
            "--timeout-s=120",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((out / CAM).iterdir())
    assert len(files) == 1
    with Image.open(files[0]) as im:
        assert im.size == (64, HEIGHT)
    # A client key without its certificate: one line, no traceback, before any call.
    bad = subprocess.run(
        base + [f"--tls-key-file={TLS / 'client.key'}"], capture_output=True, text=True, timeout=120, env=env
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "render-grpc: --tls-cert-file and --tls-key-file go together (the client certificate and its key)"
    ], bad.stderr
