"""Sharded, reshardable, atomic checkpoints (see :mod:`megamix.checkpoint.store`)."""

from megamix.checkpoint.store import (
    CONFIG_FILE,
    LATEST,
    META_FILE,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_config,
    read_meta,
    read_metadata,
    resolve_checkpoint,
    save_checkpoint,
)

__all__ = [
    "CONFIG_FILE", "LATEST", "META_FILE", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
    "read_config", "read_meta", "read_metadata", "resolve_checkpoint", "save_checkpoint",
]
