"""Password hashing, secret-key encryption and random identifiers for the identity store."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import string
import uuid
from datetime import UTC, datetime
from functools import cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from service.identity.store import MasterKeyMismatch

# scrypt at N=2**15, r=8 costs 32 MiB and ~80 ms per hash; the parameters travel with each
# hash, so raising them later only affects new hashes.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
_AK_ALPHABET = string.ascii_uppercase + string.digits
_SK_ALPHABET = string.ascii_letters + string.digits


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=32)


def hash_password(password: str) -> str:
    """`scrypt$N$r$p$salt$hash`, salt and hash in base64."""
    salt = os.urandom(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str | None) -> bool:
    """Constant-time check; with `encoded=None` (unknown user) it burns the same KDF time."""
    if encoded is None:
        verify_password(password, _dummy_hash())
        return False
    scheme, n, r, p, salt, expected = encoded.split("$")
    if scheme != "scrypt":
        raise ValueError(f"unknown password hash scheme {scheme!r}")
    actual = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    return hmac.compare_digest(actual, base64.b64decode(expected))


@cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


class SecretBox:
    """AES-256-GCM for secret keys at rest; the AK is the associated data, so a ciphertext
    copied onto another AK fails to decrypt instead of lending it its secret."""

    def __init__(self, master_key: str) -> None:
        if not master_key:
            raise ValueError("the identity master key must not be empty")
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"imagetag identity sk v1"
        ).derive(master_key.encode())
        self._aead = AESGCM(key)

    def encrypt(self, ak: str, secret: str) -> str:
        nonce = os.urandom(12)
        return "v1:" + _b64(nonce + self._aead.encrypt(nonce, secret.encode(), ak.encode()))

    def decrypt(self, ak: str, sealed: str) -> str:
        version, _, payload = sealed.partition(":")
        if version != "v1":
            raise ValueError(f"unknown sealed-secret format {version!r}")
        raw = base64.b64decode(payload)
        try:
            plain = self._aead.decrypt(raw[:12], raw[12:], ak.encode())
        except InvalidTag:
            raise MasterKeyMismatch(
                f"cannot decrypt the secret key of {ak}: it was sealed under another master key"
            ) from None
        return plain.decode()


def new_id() -> str:
    """32 lowercase hex characters: the shape of the cloud's project ids."""
    return uuid.uuid4().hex


def new_access_key() -> str:
    return "".join(secrets.choice(_AK_ALPHABET) for _ in range(20))


def new_secret_key() -> str:
    return "".join(secrets.choice(_SK_ALPHABET) for _ in range(40))


def new_token() -> str:
    # One in 64 would start with "-", which `imagetag admin tokens revoke TOKEN` reads as an option.
    while (token := secrets.token_urlsafe(48)).startswith("-"):
        pass
    return token


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def utcnow() -> datetime:
    return datetime.now(UTC)


def from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
