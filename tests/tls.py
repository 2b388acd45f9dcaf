"""
A self-signed certificate made for a test, for servers on loopback: its
subject and subjectAltName name C{localhost} and C{127.0.0.1}.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.web.client import BrowserLikePolicyForHTTPS


@dataclass(frozen=True)
class SelfSigned:
    """A certificate and its key, as PEM files in a test's directory."""

    cert: Path
    key: Path

    @property
    def pem(self) -> bytes:
        return self.cert.read_bytes()

    def server_options(self) -> object:
        """TLS options for a Twisted server that presents this certificate."""
        return PrivateCertificate.loadPEM(self.pem + self.key.read_bytes()).options()

    def trusting_policy(self) -> BrowserLikePolicyForHTTPS:
        """A client policy that trusts this certificate (and nothing else)."""
        return BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(self.pem))

    def endpoint(self, port: int = 0) -> str:
        """A Twisted C{ssl:} server endpoint description on loopback with this certificate."""
        return f"ssl:{port}:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"


def self_signed(directory: Path, name: str = "localhost") -> SelfSigned:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    return SelfSigned(cert_path, key_path)
