"""Delta encodings and checksums, registered by name; bit-exact round trips.

Importing this package registers every built-in codec.
"""

from weightsync.codec import full as _full  # noqa: F401  (registers itself)
from weightsync.codec import wsdelta1 as _wsdelta1  # registers itself
from weightsync.codec.base import Codec, Patch
from weightsync.codec.checksums import (
    DEFAULT_CHECKSUM,
    canonical_checksum_name,
    checksum_bytes,
    checksum_tensor,
    list_checksums,
)
from weightsync.codec.registry import get_codec, list_codecs, register_codec

#: The codec a delta snapshot uses unless told otherwise (see docs/codecs.md).
DEFAULT_CODEC = _wsdelta1.NAME

__all__ = [
    "DEFAULT_CHECKSUM",
    "DEFAULT_CODEC",
    "Codec",
    "Patch",
    "canonical_checksum_name",
    "checksum_bytes",
    "checksum_tensor",
    "get_codec",
    "list_checksums",
    "list_codecs",
    "register_codec",
]
