"""Token pieces for the JWT tests (unit and protocol): public PEMs, base64url, the bearer
header. The RSA and EC keys themselves are session fixtures in ``tests/conftest.py``
(made once)."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JWT segments are written."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def bearer(token: str) -> list[tuple[str, str]]:
    """The request header that carries ``token``."""
    return [("Authorization", f"Bearer {token}")]
