"""Certificates for the sandbox HTTPS origin, generated at start (nothing secret is shipped).

A self-signed root (EC P-256, a few ms to make) is served for 127.0.0.1 and
localhost. Because the gateway routes every "internet" host (httpbin.org, ...)
to the origin, an SNI callback also mints a leaf cert per requested hostname,
signed by that root: clients that verify (with ``Sandbox.cert_file`` as CA)
succeed, and clients that only check the hostname (Scrapy logs a warning per
mismatch) stay quiet.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class SelfSignedCert:
    """PEM-encoded root certificate and its private key."""

    cert_pem: bytes
    key_pem: bytes


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def generate_cert(common_name: str = "hexscrape-sandbox") -> SelfSignedCert:
    """Create a self-signed CA cert that is itself valid for 127.0.0.1 and localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return SelfSignedCert(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _context_from_pem(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """SSLContext from PEM bytes; the key touches disk only inside a 0700 tempdir."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_alpn_protocols(["http/1.1"])
    with tempfile.TemporaryDirectory(prefix="hexscrape-tls-") as tmp:
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        with open(cert_path, "wb") as f:
            f.write(cert_pem)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


class _LeafMinter:
    """Per-hostname leaf contexts signed by the root, cached (hosts are few)."""

    def __init__(self, root: SelfSignedCert) -> None:
        self._root_cert = x509.load_pem_x509_certificate(root.cert_pem)
        root_key = serialization.load_pem_private_key(root.key_pem, None)
        assert isinstance(root_key, ec.EllipticCurvePrivateKey)
        self._root_key = root_key
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._cache: dict[str, ssl.SSLContext] = {}

    def context_for(self, hostname: str) -> ssl.SSLContext:
        ctx = self._cache.get(hostname)
        if ctx is None:
            if len(self._cache) > 1000:
                self._cache.clear()
            ctx = self._cache[hostname] = self._mint(hostname)
        return ctx

    def _mint(self, hostname: str) -> ssl.SSLContext:
        now = _now()
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
        except ValueError:
            san = x509.DNSName(hostname)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])]))
            .issuer_name(self._root_cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._root_key.public_key()),
                critical=False,
            )
            .sign(self._root_key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self._root_cert.public_bytes(
            serialization.Encoding.PEM
        )
        return _context_from_pem(chain, self._leaf_key_pem)


def server_context(cert: SelfSignedCert) -> ssl.SSLContext:
    """Server context: the root cert by default, a minted leaf for any other SNI name."""
    ctx = _context_from_pem(cert.cert_pem, cert.key_pem)
    minter = _LeafMinter(cert)

    def on_sni(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        if name and name not in ("localhost", "127.0.0.1"):
            try:
                sslobj.context = minter.context_for(name)
            except ValueError:  # not a valid DNS name: keep the root cert
                pass

    ctx.sni_callback = on_sni  # type: ignore[assignment]
    return ctx


def insecure_client_context() -> ssl.SSLContext:
    """Client context that accepts the sandbox's self-signed cert (gateway upstreams, loadtest)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
