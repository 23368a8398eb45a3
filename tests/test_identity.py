"""Identity rules: one path segment that can never escape a storage root."""

from __future__ import annotations

import pytest

from weightsync.errors import InvalidIdentityError, InvalidInputError
from weightsync.identity import (
    MAX_IDENTITY_BYTES,
    MAX_IDENTITY_CHARS,
    is_session_id,
    new_session_id,
    session_identity,
    validate_identity,
)


@pytest.mark.parametrize(
    "identity",
    [
        "step-00001-1a2b3c4d",
        "base",
        "a.b_c-d",
        "x" * MAX_IDENTITY_CHARS,
        "snapshot@v1",
        "é" * (MAX_IDENTITY_BYTES // 2),  # exactly the byte limit
    ],
)
def test_valid_identities_are_returned_unchanged(identity: str) -> None:
    assert validate_identity(identity) == identity


@pytest.mark.parametrize(
    ("identity", "reason"),
    [
        ("", "empty"),
        (".", "relative"),
        ("..", "relative"),
        ("../etc", "separator"),
        ("a/b", "separator"),
        ("a\\b", "separator"),
        ("x" * (MAX_IDENTITY_CHARS + 1), "characters"),
        ("é" * 200, "400 UTF-8 bytes"),  # 200 characters, but no filesystem segment fits
        ("步" * 67, "201 UTF-8 bytes"),
        ("step\x00", "control"),
        ("step\n1", "control"),
        ("step\u202e1", "control"),  # right-to-left override (format character)
        (" step", "whitespace"),
    ],
)
def test_invalid_identities_say_the_rule(identity: str, reason: str) -> None:
    with pytest.raises(InvalidIdentityError) as excinfo:
        validate_identity(identity)
    message = str(excinfo.value)
    assert reason in message
    assert "one path segment" in message
    # Callers may catch the built-in category too.
    assert isinstance(excinfo.value, ValueError)
    assert isinstance(excinfo.value, InvalidInputError)


def test_non_string_identity_is_rejected() -> None:
    with pytest.raises(InvalidIdentityError, match="must be a string"):
        validate_identity(42)


def test_session_ids_are_fresh_8_hex() -> None:
    ids = {new_session_id() for _ in range(64)}
    assert len(ids) == 64
    assert all(is_session_id(i) for i in ids)
    assert not is_session_id("ABCDEF12")
    assert not is_session_id("abc")


def test_session_identity_qualifies_and_validates() -> None:
    assert session_identity("step-00042", "0a1b2c3d") == "step-00042-0a1b2c3d"
    with pytest.raises(InvalidIdentityError, match="snapshot name"):
        session_identity("a/b", "0a1b2c3d")


def test_a_huge_identity_is_not_echoed_whole() -> None:
    with pytest.raises(InvalidIdentityError) as excinfo:
        validate_identity("x" * 100_000)
    message = str(excinfo.value)
    assert "100000 characters" in message and len(message) < 600
