"""Checkpoints: ``<root>/step_<N>/`` written with ``torch.distributed.checkpoint``.

A save goes to ``step_<N>.partial`` first and is renamed to ``step_<N>`` only when
every rank has finished writing; only then is ``<root>/latest`` (a one-line text
file naming the directory) replaced atomically. A crash mid-save therefore never
touches the last good checkpoint. DCP stores tensors by fully qualified name with
their global shapes, so a checkpoint loads under any other parallel layout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint import FileSystemReader, StorageWriter
from torch.distributed.checkpoint.metadata import Metadata

from megamix.errors import CheckpointError
from megamix.parallel.checkpointing import PiecesLoadPlanner, PiecesSavePlanner

LATEST = "latest"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save/load; that is our intended mode when no group exists."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / META_FILE).is_file()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete ``step_<N>`` directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and _complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The directory ``<root>/latest`` names, or None when nothing was saved yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not _complete(path):
        raise CheckpointError(f"{pointer} names {path}, which is not a complete checkpoint; "
                              f"point it at one of {[p.name for p in list_checkpoints(root)]} or remove it")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint root (its ``latest`` is used) or one ``step_<N>`` directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if _complete(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path} is neither a complete step_<N> checkpoint (with .metadata and {META_FILE}) "
                              f"nor a checkpoint root with a '{LATEST}' file")
    return latest


def save_checkpoint(root: str | Path, step: int, state: dict[str, Any], config: dict[str, Any],
                    meta: dict[str, Any], keep: int = 0, writer: StorageWriter | None = None) -> Path:
    """Write ``state`` (a flat dict of tensors, GlobalPieces and plain values) as ``<root>/step_<step>``.

    All ranks call this with their own shards of ``state``. ``config`` (the resolved
    run config) and ``meta`` are written by rank 0 beside the tensors. ``keep`` > 0
    removes all but the newest ``keep`` complete checkpoints afterwards. ``writer``: a DCP
    storage writer to use instead of the default file system writer.
    """
    root = Path(root)
    final = root / f"step_{step}"
    partial = root / f"step_{step}.partial"
    if _is_rank0():
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash during an earlier save
        partial.mkdir(parents=True)
    _barrier()
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=partial, storage_writer=writer, planner=PiecesSavePlanner(),
                 no_dist=not dist.is_initialized())
    if _is_rank0():
        (partial / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        (partial / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=2))
        if final.exists():  # re-saving a step (e.g. after train.resume=none): swap, then drop the old one
            stale = root / f"step_{step}.stale"
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            partial.rename(final)
            shutil.rmtree(stale)
        else:
            partial.rename(final)
        pointer_tmp = root / f"{LATEST}.tmp"
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, root / LATEST)
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old)
    _barrier()
    return final


def load_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Fill the flat ``state`` in place (tensors and pieces are copied into, plain values replaced)."""
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=Path(path), planner=PiecesLoadPlanner(), no_dist=not dist.is_initialized())
    except Exception as e:  # DCP reports a missing key or a shape clash as a long planner traceback
        raise CheckpointError(f"checkpoint {path} does not fit this model: {str(e).splitlines()[0][:400]}") from e


def read_config(path: str | Path) -> dict[str, Any]:
    """The resolved run config saved with a checkpoint."""
    return yaml.safe_load((Path(path) / CONFIG_FILE).read_text())


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / META_FILE).read_text())


def read_metadata(path: str | Path) -> Metadata:
    """DCP's index of a checkpoint: every stored key with its global shape and dtype."""
    return FileSystemReader(str(path)).read_metadata()
