"""Snapshot identities and session ids.

An identity is one path segment, ``{name}-{session_id}``; it must never escape
the storage root, so the rules below are checked everywhere an identity enters
(trainer, reader, server).
"""

from __future__ import annotations

import re
import secrets
import unicodedata

from weightsync.errors import InvalidIdentityError

MAX_IDENTITY_CHARS = 200
#: UTF-8 bytes: fits one path segment on every storage (ext4 and most filesystems allow
#: 255 bytes, object keys 1024) with room for a temporary name's prefix and suffix.
MAX_IDENTITY_BYTES = 200
SESSION_ID_HEX_CHARS = 8
_SESSION_ID_RE = re.compile(r"^[0-9a-f]{8}$")

IDENTITY_RULE = (
    "an identity is one path segment of 1-200 characters and at most 200 UTF-8 bytes, "
    "with no '/', '\\', control characters, and not '.' or '..'"
)


def validate_identity(identity: object, *, what: str = "snapshot identity") -> str:
    """Return `identity` unchanged if it is a valid single path segment, else raise."""
    if not isinstance(identity, str):
        raise InvalidIdentityError(f"{what} must be a string, got {type(identity).__name__}")
    problem = _identity_problem(identity)
    if problem is not None:
        raise InvalidIdentityError(f"invalid {what} {_shown(identity)}: {problem}; {IDENTITY_RULE}")
    return identity


def _identity_problem(identity: str) -> str | None:
    if not identity:
        return "it is empty"
    if len(identity) > MAX_IDENTITY_CHARS:
        return f"it has {len(identity)} characters (max {MAX_IDENTITY_CHARS})"
    size = len(identity.encode("utf-8", errors="surrogatepass"))
    if size > MAX_IDENTITY_BYTES:
        return f"it has {size} UTF-8 bytes (max {MAX_IDENTITY_BYTES})"
    if identity in (".", ".."):
        return "it is a relative directory reference"
    if "/" in identity or "\\" in identity:
        return "it contains a path separator"
    if any(unicodedata.category(ch).startswith("C") for ch in identity):
        return "it contains a control or unassigned character"
    if identity != identity.strip():
        return "it starts or ends with whitespace"
    return None


def _shown(identity: str, limit: int = 80) -> str:
    """`repr` of the identity, cut short: an error message must not echo a huge input."""
    if len(identity) <= limit:
        return repr(identity)
    return f"{identity[:limit]!r}… ({len(identity)} characters)"


def new_session_id() -> str:
    """Return a fresh 8-hex-character session id."""
    return secrets.token_hex(SESSION_ID_HEX_CHARS // 2)


def is_session_id(value: str) -> bool:
    return bool(_SESSION_ID_RE.match(value))


def session_identity(name: str, session_id: str) -> str:
    """Return the session-qualified identity ``f"{name}-{session_id}"``, validated."""
    validate_identity(name, what="snapshot name")
    return validate_identity(f"{name}-{session_id}")
