"""Delta encodings and checksums, registered by name; bit-exact round trips.

Importing this package registers every built-in codec.
"""

# Each codec module registers itself on import.
from weightsync.codec import arc as _arc  # noqa: F401
from weightsync.codec import arc_v3 as _arc_v3  # noqa: F401
from weightsync.codec import full as _full  # noqa: F401
from weightsync.codec import gap_zstd as _gap_zstd  # noqa: F401
from weightsync.codec import sparse_idx_val as _sparse_idx_val  # noqa: F401
from weightsync.codec import wsdelta1 as _wsdelta1
from weightsync.codec import xor_zstd as _xor_zstd  # noqa: F401
from weightsync.codec.base import Codec, Patch, write_patches
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
    "write_patches",
]
