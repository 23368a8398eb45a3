"""What `weightsync snapshot inspect` shows: a JSON-ready description of one snapshot."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightsync.snapshot.reader import SnapshotStore


def describe_snapshot(
    store: SnapshotStore, identity: str, *, detailed: bool = False, parent: str | None = None
) -> dict[str, Any]:
    """Kind, chain, sizes, codec, per-tensor change counts of `identity`, and what is unproven.

    Payload files are read and verified (per-tensor payload sizes come from the
    delta shards). With `detailed=True` a delta's parent and the delta itself are
    materialized to compute `weightsync.codec.stats.change_stats` per tensor.
    `parent` names the parent of a Fireworks delta (its directory does not).
    """
    from weightsync.snapshot.reader import read_delta_shard

    manifest = store.read_manifest(identity, parent=parent)
    chain = store.chain(identity)
    fetched = store.fetch(identity)
    payload_sizes: dict[str, int] = {}
    if manifest.kind == "delta" and manifest.compression_format is not None:
        for file, data in fetched.files.items():
            where = f"snapshot {identity!r}, file {file!r}"
            shard = read_delta_shard(
                data, compression_format=manifest.compression_format, where=where
            )
            payload_sizes.update({name: view.nbytes for name, view in shard.items()})
    details: dict[str, dict[str, Any]] = {}
    if detailed and manifest.kind == "delta" and manifest.parent is not None:
        from weightsync.codec.stats import change_stats

        old = store.materialize(manifest.parent)
        new = store.materialize(identity)
        details = {name: change_stats(old[name], new[name]).to_json() for name in sorted(new)}
    tensors = []
    for name in sorted(manifest.tensors):
        entry = manifest.tensors[name]
        row: dict[str, Any] = {
            "name": name,
            "shape": list(entry.shape),
            "dtype": entry.dtype,
            "file": entry.file,
            "num_elements": entry.num_elements,
            "num_changed": entry.num_changed,
            "changed_fraction": (
                entry.num_changed / entry.num_elements
                if entry.num_changed is not None and entry.num_elements
                else None
            ),
            "payload_bytes": payload_sizes.get(name),
        }
        if name in details:
            row["change_stats"] = details[name]
        tensors.append(row)
    stats = dict(manifest.stats)
    full, payload = stats.get("full_bytes"), stats.get("payload_bytes")
    return {
        "identity": manifest.identity,
        "url": store.snapshot_url(identity),
        "kind": manifest.kind,
        "parent": manifest.parent,
        "base": manifest.base,
        "chain": [m.identity for m in chain],
        "compression_format": manifest.compression_format,
        "checksum_format": manifest.checksum_format,
        "session_id": manifest.session_id,
        "created_at": manifest.created_at,
        "format_version": manifest.format_version,
        "layout": "fireworks" if manifest.cannot_prove else "weightsync",
        "cannot_prove": list(manifest.cannot_prove),
        "files": {n: e.size_bytes for n, e in sorted(manifest.files.items())},
        "stats": stats,
        "compression_ratio": (full / payload) if full and payload else None,
        "tensors": tensors,
    }
