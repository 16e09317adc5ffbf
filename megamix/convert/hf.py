"""Hugging Face model directories: ``config.json`` plus ``*.safetensors`` files, read and written tensor by tensor.

A safetensors file is an 8-byte little-endian header length, a JSON header (name → dtype, shape,
byte range; ``__metadata__``), then the raw tensor bytes. Both directions work on that layout with
plain file reads and writes — no memory map, so a tensor's pages do not stay resident after it was
used — which keeps a conversion's memory at about one tensor, whatever the model's size.
"""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from megamix.convert.splice import SplicedTensors, SplicingStream
from megamix.errors import CheckpointError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; expected a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte offset where its tensor data starts."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    return header, 8 + length


class SafetensorsReader:
    """The tensors of a model directory (one file, or shards listed in an index), read one at a time.

    Shapes and dtypes come from the headers without reading data. Remembers which names were
    read, so the caller can refuse tensors it did not understand instead of dropping them.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        elif (directory / WEIGHTS).is_file():
            weight_map, files = None, [WEIGHTS]
        else:
            raise CheckpointError(f"{directory} has neither {WEIGHTS} nor {INDEX}")
        self._entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for file in files:
            path = directory / file
            if not path.is_file():
                raise CheckpointError(f"{path} (listed in {INDEX}) does not exist")
            header, start = _read_header(path)
            for name, entry in header.items():
                if weight_map is not None and weight_map.get(name) != file:
                    continue  # a tensor the index places in another shard
                begin, end = entry["data_offsets"]
                self._entries[name] = (path, entry["dtype"], tuple(entry["shape"]), start + begin, end - begin)
        if weight_map is not None and (missing := sorted(set(weight_map) - set(self._entries))):
            raise CheckpointError(f"{index} lists tensors its shards do not hold: {', '.join(missing[:5])}")
        self.read: set[str] = set()

    @property
    def names(self) -> set[str]:
        return set(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[2]

    def dtype(self, name: str) -> torch.dtype:
        path, dtype, *_ = self._entry(name)
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}; supported: {', '.join(DTYPES)}")
        return DTYPES[dtype]

    def _entry(self, name: str):
        if name not in self._entries:
            raise CheckpointError(f"{self.directory} has no tensor {name}")
        return self._entries[name]

    def location(self, name: str) -> tuple[Path, int, int]:
        """Where tensor ``name``'s bytes are: (file, offset, length)."""
        path, _, _, offset, size = self._entry(name)
        return path, offset, size

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor from disk into fresh memory, or into ``out`` (contiguous, of its shape and dtype:
        e.g. a row range of the tensor it is stacked into)."""
        path, _, shape, offset, size = self._entry(name)
        tensor = torch.empty(shape, dtype=self.dtype(name)) if out is None else out
        if tuple(tensor.shape) != shape or tensor.dtype != self.dtype(name) or not tensor.is_contiguous():
            raise CheckpointError(f"tensor {name} ({list(shape)}, {self.dtype(name)}) cannot be read into a "
                                  f"{list(tensor.shape)} {tensor.dtype} tensor")
        if tensor.nbytes != size:
            raise CheckpointError(f"{path}: tensor {name} holds {size} bytes, but its shape {list(shape)} needs "
                                  f"{tensor.nbytes}")
        if size:
            # into the tensor's memory through ctypes: a numpy view would pin its storage's size, and a
            # conversion frees written tensors by resizing their storage (directions.WriteOrder)
            with open(path, "rb") as f:
                f.seek(offset)
                if f.readinto((ctypes.c_char * size).from_address(tensor.data_ptr())) != size:
                    raise CheckpointError(f"{path} is truncated inside tensor {name}")
        self.read.add(name)
        return tensor


def shard_plan(tensors: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[int]]:
    """Consecutive runs of ``tensors`` (name, shape, dtype) of at most ``max_bytes`` each (a larger tensor
    gets a shard of its own), as lists of indices."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(tensors):
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
                       produce: Iterator[torch.Tensor], spliced: SplicedTensors) -> None:
    """Write the header for ``tensors``, then each tensor as ``produce`` yields it (in the same order); the
    placeholders of ``spliced`` among them as the file ranges they stand for."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers checks the format
    offset = 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
    with SplicingStream(open(path, "wb"), spliced) as f:  # the stream closes the file
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for (name, shape, dtype), tensor in zip(tensors, produce, strict=True):
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise CheckpointError(f"tensor {name}: produced {list(tensor.shape)} {tensor.dtype}, planned "
                                      f"{list(shape)} {dtype}")
            if tensor.numel():
                f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)


def write_hf(directory: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
             produce: Callable[[int], torch.Tensor], config: dict[str, Any], max_shard_bytes: int,
             spliced: SplicedTensors | None = None) -> list[Path]:
    """Write ``config.json`` and the ``tensors`` (name, shape, dtype), tensor ``i`` made by ``produce(i)`` when
    its turn comes (a placeholder of ``spliced`` is written as its file ranges): one ``model.safetensors``,
    or ``model-0000k-of-0000n.safetensors`` shards of at most ``max_shard_bytes`` with
    ``model.safetensors.index.json``. Returns the files written."""
    spliced = spliced or SplicedTensors()
    directory.mkdir(parents=True, exist_ok=True)
    shards = shard_plan(tensors, max_shard_bytes)
    names = ([WEIGHTS] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    for file, shard in zip(names, shards):
        _write_safetensors(directory / file, [tensors[i] for i in shard], (produce(i) for i in shard), spliced)
    spliced.check_written()
    if len(shards) > 1:
        total = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in tensors)
        index = {"metadata": {"total_size": total},
                 "weight_map": {tensors[i][0]: file for file, shard in zip(names, shards) for i in shard}}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return [directory / file for file in names]
