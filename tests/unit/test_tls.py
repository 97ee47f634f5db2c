"""TLS and mutual TLS from certificate files the test makes, with a fake engine."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.config import ServiceConfig
from service.server import EmbeddingServer
from tests.fakes import FakeEngine, factory
from tests.servers import free_port

Key = ec.EllipticCurvePrivateKey


def _cert(
    name: str, key: Key, issuer: tuple[x509.Certificate, Key] | None, is_ca: bool
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, None, is_ca=True)
    files: dict[str, bytes] = {"ca.pem": _pem(ca)}
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{name}.pem"] = _pem(_cert(name, key, (ca, ca_key), is_ca=False))
        files[f"{name}.key"] = _key_pem(key)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return {name: out / name for name in files}


# RPC and HTTP deadlines: only a hang reaches them, however loaded the machine; refusals
# (plaintext against TLS, no client certificate) come back at once whatever they are.
PATIENCE_S = 120.0


async def _start(**settings: object) -> EmbeddingServer:
    config = ServiceConfig(port=0, grace_s=0.5, http_port=free_port(), metrics_port=0, **settings)  # type: ignore[arg-type]
    server = EmbeddingServer(config, factory(FakeEngine()))  # type: ignore[arg-type]
    await server.start()
    return server


async def _embed(port: int, credentials: grpc.ChannelCredentials | None) -> str:
    target = f"localhost:{port}"
    channel = (
        grpc.aio.secure_channel(target, credentials)
        if credentials
        else grpc.aio.insecure_channel(target)
    )
    async with channel:
        try:
            reply = await pb_grpc.EmbeddingServiceStub(channel).Embed(
                pb.EmbedRequest(inputs=["hello"]), timeout=PATIENCE_S
            )
        except grpc.aio.AioRpcError as err:
            return err.code().name
    assert len(reply.embeddings) == 1
    return "OK"


async def _http_embed(
    port: int, ca: Path | None, client_cert: tuple[Path, Path] | None = None
) -> str:
    """POST /v1/embeddings over https (ca given) or plain http; the outcome's name."""
    verify: ssl.SSLContext | bool = False
    if ca is not None:
        verify = ssl.create_default_context(cafile=str(ca))
        if client_cert is not None:
            verify.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    scheme = "https" if ca is not None else "http"
    async with httpx.AsyncClient(verify=verify, timeout=PATIENCE_S) as http:
        try:
            reply = await http.post(
                f"{scheme}://localhost:{port}/v1/embeddings", json={"input": "hello"}
            )
        except httpx.HTTPError as err:
            return type(err).__name__
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["data"]) == 1
    return "OK"


@pytest.fixture
async def servers() -> AsyncIterator[list[EmbeddingServer]]:
    started: list[EmbeddingServer] = []
    yield started
    for server in started:
        await server.stop(grace_s=0)


async def test_tls(pki: dict[str, Path], servers: list[EmbeddingServer]) -> None:
    server = await _start(
        tls_cert_file=str(pki["server.pem"]), tls_key_file=str(pki["server.key"]), health_port=0
    )
    servers.append(server)
    trusted = grpc.ssl_channel_credentials(root_certificates=pki["ca.pem"].read_bytes())
    assert await _embed(server.port, trusted) == "OK"
    assert await _embed(server.port, None) == "UNAVAILABLE"  # plaintext against TLS
    # The HTTP face shares the certificate.
    assert await _http_embed(server.http_port, pki["ca.pem"]) == "OK"
    assert await _http_embed(server.http_port, None) != "OK"


async def test_mutual_tls_and_plaintext_health_port(
    pki: dict[str, Path], servers: list[EmbeddingServer]
) -> None:
    server = await _start(
        tls_cert_file=str(pki["server.pem"]),
        tls_key_file=str(pki["server.key"]),
        tls_client_ca_file=str(pki["ca.pem"]),
        health_port=free_port(),
    )
    servers.append(server)
    ca = pki["ca.pem"].read_bytes()
    anonymous = grpc.ssl_channel_credentials(root_certificates=ca)
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=pki["client.key"].read_bytes(),
        certificate_chain=pki["client.pem"].read_bytes(),
    )
    assert await _embed(server.port, anonymous) == "UNAVAILABLE"
    assert await _embed(server.port, with_cert) == "OK"
    client = (pki["client.pem"], pki["client.key"])
    assert await _http_embed(server.http_port, pki["ca.pem"]) != "OK"
    assert await _http_embed(server.http_port, pki["ca.pem"], client) == "OK"
    # Kubelet probes: plaintext, no client certificate.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="embedding.v1.EmbeddingService"),
            timeout=PATIENCE_S,
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
