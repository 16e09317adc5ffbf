"""The conversions, each streamed tensor by tensor: HF → megamix, megamix → HF, megamix → megamix (reshard).

megamix checkpoints hold every tensor whole at its global shape (DCP reassembles the pieces any
layout wrote), so the target layout of a conversion is what its ``config.yaml`` says: the tensors
are the same. Writing goes through :class:`LazyTensor` entries that DCP asks for one at a time, and
reading loads a few checkpoint keys at a time (:class:`GroupedReader`), so memory stays at a few
tensors, not the model.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from megamix import __version__
from megamix.checkpoint.store import (
    load_checkpoint,
    read_config,
    read_meta,
    read_metadata,
    resolve_checkpoint,
    save_checkpoint,
)
from megamix.config import Config, ModelConfig, config_from_dict
from megamix.convert.architectures import (
    Architecture,
    architecture_for,
    architecture_of_hf,
    hf_config,
)
from megamix.convert.hf import SafetensorsReader, read_hf_config, write_hf
from megamix.convert.links import Link
from megamix.convert.splice import (
    SplicedTensors,
    SplicingWriter,
    row_pieces,
    without_crc32,
)
from megamix.errors import CheckpointError, ConfigError
from megamix.parallel.checkpointing import GlobalPieces
from megamix.parallel.sharding import sharding_of

DEFAULT_SHARD_BYTES = 5 * 2**30
READ_GROUP_BYTES = 64 * 2**20  # small tensors are read from a checkpoint together, up to this much


def _release_free_memory() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)``, or a no-op elsewhere. After a large block is freed glibc raises its mmap
    threshold (up to 32 MiB), so the next tensors below it come from the heap, whose freed space it keeps
    unless trimmed: without trimming, a conversion's resident memory would creep up by such tensors."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


class WriteOrder:
    """Makes the tensors of one save in the order DCP writes them, freeing each when the next is asked for.

    torch 2.13's ``FileSystemWriter`` keeps a reference to every tensor of a file until the file is
    closed (for its safetensors format), which would hold the whole checkpoint in memory. The serial
    CPU loader of :class:`SplicingWriter` (it never loads ahead, with or without CUDA) asks for a
    tensor only after writing the one before, so that one's storage can be released then (and given
    back to the system).
    """

    _trim = staticmethod(_release_free_memory())

    def __init__(self):
        self._last: torch.Tensor | None = None

    def __call__(self, produce: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self._last is not None:
            self._last.untyped_storage().resize_(0)
            self._trim()
        self._last = produce()
        return self._last


class LazyTensor(GlobalPieces):
    """A whole global tensor ``[*shape]`` for DCP, made by ``produce()`` (a tensor no one else holds on to)
    only when DCP writes it, through ``order``.

    A :class:`GlobalPieces` with one piece at offset 0, so the save planner of
    :func:`save_checkpoint` resolves it like any sharded entry, one entry at a time.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, produce: Callable[[], torch.Tensor], name: str,
                 order: WriteOrder):
        self.global_shape, self.dtype, self._produce, self._name = torch.Size(shape), dtype, produce, name
        self._origin, self._order = torch.Size([0] * len(shape)), order

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(self._origin, self.global_shape)]

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, self._origin), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(self._origin, self.global_shape),
                                                      properties=TensorProperties(dtype=self.dtype),
                                                      size=self.global_shape))]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        tensor = self._order(self._produce)
        if tensor.shape != self.global_shape or tensor.dtype != self.dtype:
            raise CheckpointError(f"tensor {self._name}: produced {list(tensor.shape)} {tensor.dtype}, planned "
                                  f"{list(self.global_shape)} {self.dtype}")
        return tensor


def _names(items: list[str]) -> str:
    return ", ".join(items[:5]) + (f" ... ({len(items)} in all)" if len(items) > 5 else "")


def model_shapes(m: ModelConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Global shapes of ``m``'s parameters and of its saved buffers (e.g. MoE's selection bias), by name."""
    from megamix.models import HybridModel

    model = HybridModel(m, device="meta")
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    return params, {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in params}


def _check_links(arch: Architecture, m: ModelConfig, links: list[Link]) -> None:
    params, buffers = model_shapes(m)
    expected = params | buffers
    mapped = {link.name: link.shape for link in links}
    if mapped != expected:
        wrong = sorted(set(mapped) ^ set(expected)) or sorted(n for n in mapped if mapped[n] != expected[n])
        raise CheckpointError(f"internal: the {arch.name} mapping does not match the megamix model: {_names(wrong)}")


def fresh_training_state(params: dict[str, tuple[int, ...]], order: WriteOrder,
                         spliced: SplicedTensors) -> dict[str, Any]:
    """What ``Trainer`` loads besides the weights, as a run that has not taken a step yet saves it.

    Resuming loads the Adam moments, step counters, RNG and data position too, so a
    weights-only checkpoint could not be passed to ``train.resume``. The moments (fp32 zeros)
    are written as holes by the :class:`SplicingWriter` of ``spliced``.
    """
    state: dict[str, Any] = {
        f"optim.{name}.{key}": LazyTensor(shape, torch.float32, lambda shape=shape: spliced.zeros(shape),
                                          f"optim.{name}.{key}", order)
        for name, shape in params.items() for key in ("exp_avg", "exp_avg_sq")}
    return state | {"optim.step": torch.tensor(0.0), "rng.cpu": torch.get_rng_state(), "train.step": 0,
                    "data.consumed": 0}


def _target_config(saved: dict[str, Any], overrides: list[str], source: str) -> Config:
    """The saved config with ``overrides`` (the target layout); the model may change only its ``|`` marks."""
    try:
        saved_model = config_from_dict(saved).model
    except ConfigError as e:
        raise ConfigError(f"{source}: megamix cannot build the model it describes: {e}") from None
    config = config_from_dict(saved, overrides)
    before, after = (dataclasses.replace(m, pattern=m.pattern.replace("|", ""))
                     for m in (saved_model, config.model))
    if before != after:
        changed = [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)
                   if getattr(before, f.name) != getattr(after, f.name)]
        raise ConfigError(f"{source}: a conversion keeps the model; it can change the layout (parallel.*, "
                          f"other sections) and the '|' stage marks of model.pattern, not {', '.join(changed)}")
    return config


# -- HF → megamix --------------------------------------------------------------------------------


def _assemble(reader: SafetensorsReader, link: Link, dtype: torch.dtype,
              spliced: SplicedTensors) -> Callable[[], torch.Tensor]:
    """A function making the placeholder of ``link``'s megamix tensor: its HF parts' bytes one after the other
    (rows stacked), or zeros without parts, copied into the checkpoint by the :class:`SplicingWriter`."""
    def produce() -> torch.Tensor:
        if not link.parts:
            return spliced.zeros(link.shape, dtype)
        return spliced.placeholder(link.shape, dtype, [reader.location(name) for name, _ in link.parts])
    return produce


def hf_to_megamix(hf_dir: str | Path, out_dir: str | Path, overrides: list[str] = (),
                  weights_only: bool = False) -> Path:
    """Write ``<out_dir>/step_0`` (and ``latest``) from an HF model directory; returns step_0.

    ``overrides`` (``parallel.tp=2``, ...) set the target layout in the written ``config.yaml``.
    Every HF tensor is checked (present, shape, no leftovers) before anything is written. The
    checkpoint holds what ``train.resume`` loads (zero Adam moments, step 0, data position 0), or
    with ``weights_only`` the model tensors alone (for export, eval, inspection: a third of the bytes).
    """
    hf_dir = Path(hf_dir)
    source = str(hf_dir / "config.json")
    hf = read_hf_config(hf_dir)
    arch = architecture_of_hf(hf, source)
    model = arch.model_config(hf, source)
    config = _target_config(Config(model=model).to_dict(), list(overrides), source)
    links = arch.links(model)
    _check_links(arch, model, links)
    reader = SafetensorsReader(hf_dir)
    order, spliced = WriteOrder(), SplicedTensors()
    state: dict[str, Any] = {}
    for link in links:
        dtypes = set()
        for name, shape in link.parts:
            if reader.shape(name) != shape:
                raise CheckpointError(f"tensor {name}: shape {list(reader.shape(name))}, but config.json implies "
                                      f"{list(shape)}")
            dtypes.add(reader.dtype(name))
        if len(dtypes) > 1:
            raise CheckpointError(f"tensors {_names([n for n, _ in link.parts])} (stacked into {link.name}) "
                                  f"have different dtypes {sorted(map(str, dtypes))}")
        dtype = dtypes.pop() if dtypes else torch.float32
        state[f"model.{link.name}"] = LazyTensor(link.shape, dtype, _assemble(reader, link, dtype, spliced),
                                                 f"model.{link.name}", order)
    used = {name for link in links for name, _ in link.parts}
    if model.tie_embeddings:
        used.add("lm_head.weight")  # a copy of the embedding that some exporters keep
    leftover = sorted(n for n in reader.names - used if not n.endswith(arch.derived))
    if leftover:
        raise CheckpointError(f"{hf_dir}: {len(leftover)} tensors do not belong to a {arch.name} with this "
                              f"config.json: {_names(leftover)}")
    if not weights_only:
        state |= fresh_training_state(model_shapes(model)[0], order, spliced)
    meta = {"world_size": 1, "layout": vars(config.parallel), "tokens": 0, "megamix_version": __version__,
            "converted_from": str(hf_dir.resolve()), "architecture": arch.name}
    with without_crc32():
        return save_checkpoint(out_dir, 0, state, config.to_dict(), meta, writer=SplicingWriter(out_dir, spliced))


# -- reading megamix checkpoints -----------------------------------------------------------------


def tensor_entries(path: Path) -> dict[str, TensorStorageMetadata]:
    """Every tensor a checkpoint holds (model, optimizer, RNG) with its global shape and dtype."""
    return {key: m for key, m in read_metadata(path).state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}


def read_tensor(path: Path, key: str, entry: TensorStorageMetadata) -> torch.Tensor:
    """One global tensor of a checkpoint, reassembled from the pieces whatever layout wrote them."""
    return read_tensors(path, [key], {key: entry})[key]


def read_tensors(path: Path, keys: list[str], entries: dict[str, TensorStorageMetadata]) -> dict[str, torch.Tensor]:
    """Several global tensors of a checkpoint in one DCP load (each load re-reads the metadata and plans)."""
    tensors = {key: torch.empty(entries[key].size, dtype=entries[key].properties.dtype) for key in keys}
    load_checkpoint(path, tensors)
    return tensors


class GroupedReader:
    """Reads the tensors ``keys`` of a checkpoint in runs of consecutive keys of at most ``max_bytes``
    (or one larger tensor), one DCP load per run: each load re-reads the metadata and plans, which
    dominates for small tensors. Holds only the run of the last key asked for."""

    def __init__(self, path: Path, keys: list[str], entries: dict[str, TensorStorageMetadata],
                 max_bytes: int = READ_GROUP_BYTES):
        self.path, self.entries = path, entries
        self.run_of: dict[str, list[str]] = {}
        run: list[str] = []
        size = 0
        for key in keys:
            nbytes = math.prod(entries[key].size) * entries[key].properties.dtype.itemsize
            if run and size + nbytes > max_bytes:
                run, size = [], 0
            run.append(key)
            size += nbytes
            self.run_of[key] = run
        self._current: dict[str, torch.Tensor] = {}

    def get(self, key: str) -> torch.Tensor:
        if key not in self._current:
            self._current = {}  # dropped before the next run is read
            self._current = read_tensors(self.path, self.run_of[key], self.entries)
        return self._current[key]


def load_model_state(checkpoint: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], int]:
    """A checkpoint's model config, all its model tensors (whole) and ``data.seq_len``."""
    path = resolve_checkpoint(checkpoint)
    config = config_from_dict(read_config(path))
    tensors = {key.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
               for key, m in tensor_entries(path).items() if key.startswith("model.")}
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no model.* tensors")
    load_checkpoint(path, {"model": tensors})
    return config.model, tensors, config.data.seq_len


def load_weights(checkpoint: str | Path, model: torch.nn.Module) -> None:
    """Fill a built :class:`HybridModel` — whole, tensor-parallel or one pipeline stage — with a checkpoint's
    weights and saved buffers: each rank reads its own pieces."""
    params = dict(model.named_parameters())
    entries: dict[str, Any] = {f"model.{name}": GlobalPieces(sharding_of(p, model.tp.size), p.data)
                               for name, p in params.items()}
    entries |= {f"model.{name}": t for name, t in model.state_dict().items() if name not in params}
    load_checkpoint(resolve_checkpoint(checkpoint), entries)


# -- megamix → HF --------------------------------------------------------------------------------


def megamix_to_hf(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
                  architecture: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``config.json`` and safetensors (sharded above ``max_shard_bytes``, with an index) for the HF
    ``architecture`` (default: the one the model fits); ``dtype`` None keeps each tensor's stored dtype."""
    path = resolve_checkpoint(checkpoint)
    config = config_from_dict(read_config(path))
    m = config.model
    arch = architecture_for(m, architecture)  # refuses before any tensor is read
    links = arch.links(m)
    stored_entries = tensor_entries(path)
    stored = {key.removeprefix("model."): e for key, e in stored_entries.items() if key.startswith("model.")}
    missing = [link.name for link in links if link.name not in stored]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks tensors a {arch.name} needs: {_names(missing)}")
    for link in links:
        if tuple(stored[link.name].size) != link.shape:
            raise CheckpointError(f"checkpoint {path}: model.{link.name} has shape {list(stored[link.name].size)}, "
                                  f"but its config implies {list(link.shape)}")
    unknown = sorted(set(stored) - {link.name for link in links})
    if unknown:
        raise CheckpointError(f"checkpoint {path}: {len(unknown)} tensors have no place in {arch.name}: "
                              f"{_names(['model.' + n for n in unknown])}")
    for link in links:
        if not link.parts and read_tensor(path, f"model.{link.name}", stored[link.name]).any():
            raise CheckpointError(f"checkpoint {path}: model.{link.name} is not zero, and {arch.name} has no "
                                  f"place for it (a selection bias learned with model.moe.bias_update_rate > 0)")

    plan, owners = [], []  # HF tensors in file order (name, shape, dtype); each one's link and row range
    for link in links:
        start = 0
        for name, shape in link.parts:
            plan.append((name, shape, dtype or stored[link.name].properties.dtype))
            owners.append((link, start, start + shape[0]))
            start += shape[0]
    reader = GroupedReader(path, [f"model.{link.name}" for link in links], stored_entries)
    metadata, spliced, sources = read_metadata(path), SplicedTensors(), {}

    def produce(i: int) -> torch.Tensor:
        """HF tensor ``i``: when its dtype is kept and the checkpoint holds its rows whole, a placeholder for
        their bytes (copied file to file); otherwise read, cut and cast."""
        link, start, end = owners[i]
        key = f"model.{link.name}"
        if plan[i][2] == stored[link.name].properties.dtype:
            if key not in sources:
                sources[key] = row_pieces(path, metadata, key)
            if sources[key] is not None:
                return spliced.placeholder(plan[i][1], plan[i][2], sources[key](start, end))
        tensor = reader.get(key)
        return (tensor if len(link.parts) == 1 else tensor[start:end]).to(plan[i][2])

    out_dir = Path(out_dir)
    config_json = hf_config(arch, m, dtype or stored["embed.weight"].properties.dtype, config.data.seq_len)
    write_hf(out_dir, plan, produce, config_json, max_shard_bytes, spliced)
    return out_dir


# -- megamix → megamix ---------------------------------------------------------------------------


def reshard(checkpoint: str | Path, out_dir: str | Path, overrides: list[str], model_only: bool = False) -> Path:
    """Copy a checkpoint to ``<out_dir>/step_<N>`` for the layout ``overrides`` set (``parallel.tp=2``, the
    ``|`` marks of ``model.pattern``), after checking the model fits it. With ``model_only`` the copy keeps
    the weights and starts over (zero Adam moments, step 0, data position 0: a fine-tuning start);
    otherwise it carries the optimizer, step, data position and RNG, and training resumes exactly."""
    path = resolve_checkpoint(checkpoint)
    config = _target_config(read_config(path), list(overrides), str(path / "config.yaml"))
    entries = read_metadata(path).state_dict_metadata
    keep = [key for key in entries if key.startswith("model.") or not model_only]
    tensors = {key: entries[key] for key in keep if isinstance(entries[key], TensorStorageMetadata)}
    reader, order, spliced = GroupedReader(path, list(tensors), tensors), WriteOrder(), SplicedTensors()
    # DCP asks for each key once, so the write order may free what the reader returned
    state: dict[str, Any] = {key: LazyTensor(tuple(e.size), e.properties.dtype, lambda key=key: reader.get(key),
                                             key, order) for key, e in tensors.items()}
    values: dict[str, Any] = {key: None for key in keep if key not in tensors}  # plain values: step, data position
    if values:
        load_checkpoint(path, values)
    state |= values
    meta = read_meta(path)
    step = meta.pop("step")
    if model_only:
        state |= fresh_training_state(model_shapes(config.model)[0], order, spliced)
        step, meta["tokens"] = 0, 0
    meta |= {"layout": vars(config.parallel), "resharded_from": str(path.resolve())}
    with without_crc32():
        return save_checkpoint(out_dir, step, state, config.to_dict(), meta, writer=SplicingWriter(out_dir, spliced))
