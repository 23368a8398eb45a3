"""Materializing a snapshot: the weights it stands for, written out as a plain HF directory.

The reader rebuilds and verifies the weights (`SnapshotStore.materialize`); this module
only writes them, so it depends on the reader and the writer and neither depends on it.
"""

from __future__ import annotations

import logging
import os
import pathlib

from weightsync.errors import InvalidInputError
from weightsync.snapshot.layout import CONFIG_FILE, is_tokenizer_file
from weightsync.snapshot.reader import SnapshotStore
from weightsync.snapshot.writer import write_hf_files
from weightsync.storage import open_storage

logger = logging.getLogger(__name__)


def materialize_to(
    store: SnapshotStore, identity: str, output_dir: str | os.PathLike[str]
) -> pathlib.Path:
    """Write `identity` as a standalone HF directory (config, index, spec, shards, tokenizer).

    The output has no manifest: it is a model directory for `from_pretrained`, not a
    snapshot. `output_dir` must be missing or empty. Returns the absolute output path.
    """
    out = pathlib.Path(output_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(
            f"cannot materialize {identity!r} into {out}: it exists and is not an empty "
            "directory; choose a new output directory"
        )
    chain = store.chain(identity)
    if chain[-1].kind == "lora":
        raise InvalidInputError(
            f"snapshot {identity!r} is a LoRA adapter; it is already a standalone PEFT directory"
        )
    weights = store.materialize(identity)
    base = chain[0]
    config = store.read_file(chain[-1], CONFIG_FILE)
    extra = {
        name: store.read_file(base, name)
        for name in sorted(base.files)
        if is_tokenizer_file(name) and not name.endswith(".safetensors")
    }
    write_hf_files(open_storage(out), "", weights, config_bytes=config, extra_files=extra)
    logger.info("materialized %s into %s", identity, out)
    return out
