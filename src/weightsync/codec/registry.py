"""Codecs registered by name (one file per codec, each registering itself)."""

from __future__ import annotations

from typing import TypeVar

from weightsync.codec.base import Codec
from weightsync.errors import UnknownCodecError

_CODECS: dict[str, Codec] = {}

C = TypeVar("C", bound=type[Codec])


def register_codec(cls: C) -> C:
    """Class decorator: register one codec instance under `cls.name`."""
    if cls.name in _CODECS:
        raise ValueError(f"codec {cls.name!r} is already registered")
    _CODECS[cls.name] = cls()
    return cls


def get_codec(name: str) -> Codec:
    """Return the codec registered as `name`, or raise with the known names."""
    try:
        return _CODECS[name]
    except KeyError:
        raise UnknownCodecError(
            f"unknown compression format {name!r}; known: "
            f"{', '.join(list_codecs(include_read_only=True))}"
        ) from None


def list_codecs(*, include_read_only: bool = False) -> list[str]:
    """Names of the codecs weightsync writes (and reads); read-only formats on request."""
    return sorted(n for n, c in _CODECS.items() if include_read_only or not c.read_only)
