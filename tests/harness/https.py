"""A real HTTPS server on 127.0.0.1 with a throwaway CA, standing in for Amazon SNS's
certificate and SubscribeURL endpoints (a thread; stdlib http.server + ssl).

`sns_https` (session-scoped) serves an SNS signing certificate made here (an RSA key whose
certificate the test CA issued) and records every request, e.g. SubscribeURL visits.
`SnsSigner` signs SNS messages the way SNS documents it; its string to sign is written here,
independently of `worker/providers/sns.py`, and the tests cross-check it with `openssl`.
Point the adapter at it with `SNS_CERT_HOSTS=server.host_pattern`, `SNS_CA_FILE=server.ca_file`.
"""

from __future__ import annotations

import atexit
import base64
import datetime as dt
import ipaddress
import secrets
import shutil
import ssl
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST = "127.0.0.1"


# --- a test CA -----------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class TestCa:
    """A throwaway certificate authority; `ca_file` is its PEM bundle for clients."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "https harness test CA") -> None:
        self.name = name
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = dt.datetime.now(dt.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = str(directory / "ca.pem")
        Path(self.ca_file).write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        subject: str,
        key: rsa.RSAPrivateKey,
        *,
        server: bool = False,
        valid_from: dt.datetime | None = None,
        valid_until: dt.datetime | None = None,
        issuer_key: CertificateIssuerPrivateKeyTypes | None = None,
    ) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(_name(self.name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from or now - dt.timedelta(minutes=5))
            .not_valid_after(valid_until or now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        return builder.sign(issuer_key or self.key, hashes.SHA256())


def pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --- the server ------------------------------------------------------------------------------


@dataclass
class _Routes:
    """What the server answers, and what it was asked (shared with the handler threads)."""

    files: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    prefixes: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    routes: _Routes  # set on the subclass made per server

    def do_GET(self) -> None:
        # Recorded before answering, so a client that has its answer sees its hit.
        with self.routes.lock:
            self.routes.hits.append(self.path)
            answer = self.routes.files.get(self.path)
            if answer is None:
                answer = next(
                    (v for k, v in self.routes.prefixes.items() if self.path.startswith(k)),
                    (404, b"not found"),
                )
        status, body = answer
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        return


class HttpsTestServer:
    """HTTPS on 127.0.0.1:<port> with a certificate from `ca`, in a daemon thread."""

    def __init__(self, ca: TestCa) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        directory = Path(tempfile.mkdtemp(prefix="https-harness-"))
        atexit.register(shutil.rmtree, directory, True)
        (directory / "cert.pem").write_bytes(pem(ca.issue("localhost", key, server=True)))
        (directory / "key.pem").write_bytes(private_pem(key))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(directory / "cert.pem"), str(directory / "key.pem"))
        self.ca = ca
        self.routes = _Routes()
        handler = type("Handler", (_Handler,), {"routes": self.routes})
        self._server = ThreadingHTTPServer((HOST, 0), handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host_pattern(self) -> str:
        return f"{HOST}:{self.port}"

    def url(self, path: str) -> str:
        return f"https://{HOST}:{self.port}{path}"

    def serve(self, path: str, body: bytes, status: int = 200) -> str:
        with self.routes.lock:
            self.routes.files[path] = (status, body)
        return self.url(path)

    def serve_prefix(self, prefix: str, body: bytes, status: int = 200) -> None:
        with self.routes.lock:
            self.routes.prefixes[prefix] = (status, body)

    def served(self, path: str) -> bytes:
        """What `serve` put at `path`."""
        with self.routes.lock:
            return self.routes.files[path][1]

    def hits(self, prefix: str = "/") -> list[str]:
        """The request targets (path and query) asked for so far that start with `prefix`."""
        with self.routes.lock:
            return [hit for hit in self.routes.hits if hit.startswith(prefix)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- SNS signing (the test's own implementation of the documented scheme) --------------------

# https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html
_NOTIFICATION_KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_CONFIRMATION_KEYS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)


def sns_string_to_sign(message: Mapping[str, str]) -> bytes:
    keys = _NOTIFICATION_KEYS if message["Type"] == "Notification" else _CONFIRMATION_KEYS
    lines: list[str] = []
    for key in keys:
        if key in message:
            lines += [key, message[key]]
    return ("\n".join(lines) + "\n").encode()


def sns_cert_path() -> str:
    """A fresh certificate path of the form SNS uses (the only one the verifier fetches)."""
    return f"/SimpleNotificationService-{secrets.token_hex(16)}.pem"


@dataclass
class SnsSigner:
    """An SNS signing identity: an RSA key and the URL of its certificate."""

    key: rsa.RSAPrivateKey
    cert_url: str

    @property
    def cert_path(self) -> str:
        return urlsplit(self.cert_url).path

    def sign(self, message: Mapping[str, str], version: str = "2") -> dict[str, str]:
        algorithm: hashes.HashAlgorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = self.key.sign(sns_string_to_sign(message), padding.PKCS1v15(), algorithm)
        return {
            **message,
            "SignatureVersion": version,
            "Signature": base64.b64encode(signature).decode(),
            "SigningCertURL": self.cert_url,
        }


@dataclass
class SnsTestServer:
    """`server` serves `signer`'s certificate; `ca_file` makes clients trust it."""

    server: HttpsTestServer
    signer: SnsSigner
    directory: Path

    @property
    def ca_file(self) -> str:
        return self.server.ca.ca_file

    @property
    def host_pattern(self) -> str:
        return self.server.host_pattern

    def settings(self, topic_arns: str) -> dict[str, str]:
        return {
            "SNS_TOPIC_ARNS": topic_arns,
            "SNS_CERT_HOSTS": self.host_pattern,
            "SNS_CA_FILE": self.ca_file,
        }

    def new_signer(
        self,
        path: str | None = None,
        *,
        valid_from: dt.datetime | None = None,
        valid_until: dt.datetime | None = None,
    ) -> SnsSigner:
        """Another key, its certificate served at `path` (by default a fresh one of SNS's
        form, `signer.cert_path`), issued by the same test CA."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        certificate = self.server.ca.issue(
            "sns.amazonaws.com", key, valid_from=valid_from, valid_until=valid_until
        )
        return SnsSigner(key, self.server.serve(path or sns_cert_path(), pem(certificate)))


@pytest.fixture(scope="session")
def sns_https() -> Iterator[SnsTestServer]:
    directory = Path(tempfile.mkdtemp(prefix="sns-harness-"))
    try:
        server = HttpsTestServer(TestCa(directory))
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        certificate = server.ca.issue("sns.amazonaws.com", key)
        signer = SnsSigner(key, server.serve(sns_cert_path(), pem(certificate)))
        (directory / "signing-key.pem").write_bytes(private_pem(key))
        (directory / "signing-cert.pem").write_bytes(pem(certificate))
        yield SnsTestServer(server, signer, directory)
        server.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
