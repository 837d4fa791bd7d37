"""Password hashes, sealed secret keys and identifiers: the crypto under the identity rules."""

from __future__ import annotations

import re

import pytest

import service.identity.crypto as crypto
from service.identity.store import MasterKeyMismatch


def test_a_password_hash_carries_its_parameters_and_checks_only_its_password():
    encoded = crypto.hash_password("hunter2")
    assert re.fullmatch(rf"scrypt\${crypto.SCRYPT_N}\$8\$1\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+", encoded)
    assert crypto.verify_password("hunter2", encoded)
    assert not crypto.verify_password("hunter3", encoded)
    assert not crypto.verify_password("hunter2", None)  # unknown user: same work, no match
    assert crypto.hash_password("hunter2") != encoded  # salted


def test_a_sealed_secret_opens_only_under_its_master_key_and_for_its_own_ak():
    box = crypto.SecretBox("master")
    sealed = box.encrypt("AK1", "secret")
    assert sealed.startswith("v1:") and "secret" not in sealed
    assert box.decrypt("AK1", sealed) == "secret"
    with pytest.raises(MasterKeyMismatch):
        box.decrypt("AK2", sealed)  # copied onto another AK
    with pytest.raises(MasterKeyMismatch):
        crypto.SecretBox("another master").decrypt("AK1", sealed)


def test_identifiers_have_the_clouds_shapes():
    assert re.fullmatch(r"[0-9a-f]{32}", crypto.new_id())
    assert re.fullmatch(r"[A-Z0-9]{20}", crypto.new_access_key())
    assert re.fullmatch(r"[A-Za-z0-9]{40}", crypto.new_secret_key())
    token = crypto.new_token()
    assert crypto.token_digest(token) == crypto.token_digest(token) != token


def test_no_token_starts_with_a_dash_so_the_admin_command_line_takes_it():
    tokens = {crypto.new_token() for _ in range(2000)}  # one in 64 would, were it left to chance
    assert len(tokens) == 2000 and not any(token.startswith("-") for token in tokens)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{64}", token) for token in tokens)
