"""The weight-sync methods the benchmark puts side by side.

Each method is one way the field moves new weights to inference: which codec
encodes a snapshot, and whether every sync is a full base (reload) or a delta
against the snapshot the deployment serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from weightsync.codec import DEFAULT_CODEC, get_codec, list_codecs
from weightsync.errors import UnknownCodecError

CheckpointType = Literal["base", "delta"]


@dataclass(frozen=True, kw_only=True)
class Method:
    """One weight-sync method: a codec, a checkpoint type and who uses it."""

    name: str
    codec: str
    checkpoint_type: CheckpointType
    practice: str
    #: Extra `weightsync serve` arguments of the deployment it syncs to (torch engine).
    #: A method with some measures a way of serving, not a codec: it runs end to end only.
    serve_args: tuple[str, ...] = ()

    @property
    def is_full_reload(self) -> bool:
        return self.checkpoint_type == "base"

    @property
    def measures_codec(self) -> bool:
        """Whether the method's codec rows are its own (not another method's again)."""
        return not self.serve_args

    @property
    def syncs_end_to_end(self) -> bool:
        """False for a format weightsync only reads: measured as a codec, never synced."""
        return not get_codec(self.codec).read_only


FULL_RELOAD = "full-reload"
#: The default codec synced to a deployment that serves with `--buffered-swap`.
BUFFERED_SWAP = f"{DEFAULT_CODEC}+buffered-swap"

# Methods of the field, in the order the report lists them; codecs that are not
# registered (yet) are skipped by `bench_methods`.
_FIELD_METHODS: tuple[Method, ...] = (
    Method(
        name=FULL_RELOAD,
        codec="full",
        checkpoint_type="base",
        practice="full snapshot + full reload (update_weights_from_disk style)",
    ),
    Method(
        name="sparse-idx-val",
        codec="sparse-idx-val",
        checkpoint_type="delta",
        practice="int32 indices + new values (PULSE / TRL style)",
    ),
    Method(
        name="gap-zstd",
        codec="gap-zstd",
        checkpoint_type="delta",
        practice="gap-coded positions + zstd (slime style)",
    ),
    Method(
        name="xor-zstd",
        codec="xor-zstd",
        checkpoint_type="delta",
        practice="XOR of raw bits + zstd, self-checking payload (slime-current style)",
    ),
    Method(
        name="arc_v1",
        codec="arc_v1",
        checkpoint_type="delta",
        practice="Fireworks arc_v1: XOR + zlib (fireworks-delta-compression, byte-exact)",
    ),
    Method(
        name="arc_v2",
        codec="arc_v2",
        checkpoint_type="delta",
        practice="Fireworks SDK default arc_v2: XOR + zstd (byte-exact)",
    ),
    Method(
        name="arc_v3",
        codec="arc_v3",
        checkpoint_type="delta",
        practice="Fireworks arc_v3: encoded by fireworks-delta-compression, decoded by weightsync",
    ),
)


def bench_methods(codecs: tuple[str, ...] | None = None) -> list[Method]:
    """The methods to measure: the field's, the default codec (also synced to replicas
    with the buffered swap), then any other codec.

    `codecs` restricts the list to methods whose codec is named there (`full`
    selects the full-reload method); an unregistered name raises with the known
    names. Read-only formats (`arc_v3`) are included: their reference encoder is
    the format's own implementation (`weightsync.bench.codecs.reference_encoder`),
    and they are left out of end-to-end runs, which save through weightsync.
    """
    known = list_codecs(include_read_only=True)
    if codecs is not None:
        unknown = [c for c in codecs if c not in known]
        if unknown:
            raise UnknownCodecError(
                f"unknown codec(s) {', '.join(unknown)} for the benchmark; known: "
                f"{', '.join(known)}"
            )
    methods = [m for m in _FIELD_METHODS if m.codec in known]
    covered = {m.codec for m in methods if not m.is_full_reload}
    extra = [DEFAULT_CODEC, *(c for c in known if c != DEFAULT_CODEC)]
    for codec in extra:
        if codec in covered or codec == "full":
            continue
        covered.add(codec)
        practice = "weightsync default codec" if codec == DEFAULT_CODEC else "weightsync codec"
        methods.append(Method(name=codec, codec=codec, checkpoint_type="delta", practice=practice))
        if codec == DEFAULT_CODEC:
            methods.append(
                Method(
                    name=BUFFERED_SWAP,
                    codec=codec,
                    checkpoint_type="delta",
                    practice="weightsync default codec, replicas with --buffered-swap (opt-in)",
                    serve_args=("--buffered-swap",),
                )
            )
    if codecs is not None:
        methods = [m for m in methods if m.codec in codecs]
    return methods
