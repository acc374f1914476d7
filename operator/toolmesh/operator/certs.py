"""The webhook's serving certificate: a private CA and a leaf made with `cryptography`, kept in a Secret."""

from __future__ import annotations

import base64
import datetime
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from toolmesh.operator.render import MANAGED_BY

VALIDITY = datetime.timedelta(days=365)
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True)
class WebhookCert:
    """PEM texts of the CA (for the apiserver's caBundle) and of the serving certificate and key."""

    ca: bytes
    cert: bytes
    key: bytes

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write the certificate and key for the TLS server; returns (certfile, keyfile)."""
        directory.mkdir(parents=True, exist_ok=True)
        certfile, keyfile = directory / "tls.crt", directory / "tls.key"
        certfile.write_bytes(self.cert + self.ca)
        keyfile.touch(mode=0o600)
        keyfile.write_bytes(self.key)
        return certfile, keyfile

    def secret_data(self) -> dict[str, str]:
        return {k: base64.b64encode(v).decode() for k, v in (("ca.crt", self.ca), ("tls.crt", self.cert),
                                                                ("tls.key", self.key))}

    @classmethod
    def from_secret(cls, secret: Mapping[str, Any]) -> WebhookCert | None:
        data = secret.get("data") or {}
        try:
            return cls(*(base64.b64decode(data[k]) for k in ("ca.crt", "tls.crt", "tls.key")))
        except (KeyError, ValueError):
            return None


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def generate(hosts: Sequence[str], now: datetime.datetime | None = None) -> WebhookCert:
    """A fresh CA and a serving certificate for `hosts` (IP addresses and DNS names)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "toolmesh-webhook-ca")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return WebhookCert(ca=ca_cert.public_bytes(serialization.Encoding.PEM),
                       cert=cert.public_bytes(serialization.Encoding.PEM), key=_key_pem(key))


def still_good(existing: WebhookCert, hosts: Sequence[str], now: datetime.datetime | None = None) -> bool:
    """True when the stored certificate covers `hosts` and is not close to expiry."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        cert = x509.load_pem_x509_certificate(existing.cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    covered = set(map(str, sans.get_values_for_type(x509.IPAddress))) | set(sans.get_values_for_type(x509.DNSName))
    return set(hosts) <= covered and cert.not_valid_after_utc - now > RENEW_BEFORE


SECRET_TYPE = "Opaque"
"""The type of a Secret the operator creates. Opaque, like the chart's: a `kubernetes.io/tls` Secret must hold a
certificate from the start, and the chart's one is empty until the operator first runs (the API server warned
about it on every `helm install`). The type of an existing Secret is immutable, so it is kept."""


def render_secret(name: str, namespace: str, cert: WebhookCert, secret_type: str = SECRET_TYPE) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": secret_type,
            "metadata": {"name": name, "namespace": namespace,
                         "labels": dict(MANAGED_BY)},
            "data": cert.secret_data()}
