"""Codecs registered by name (one file per codec, each registering itself)."""

from __future__ import annotations

from collections.abc import Callable
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
        hint = ""
        if name == "arc_v2":
            hint = (
                " ('arc_v2' is Fireworks' unpublished proprietary format; weightsync "
                "does not implement it — use the default)"
            )
        raise UnknownCodecError(
            f"unknown compression format {name!r}{hint}; known: {', '.join(list_codecs())}"
        ) from None


def list_codecs() -> list[str]:
    return sorted(_CODECS)


CodecFactory = Callable[[], Codec]
