"""Checkpoint files whose tensor bytes are copied file to file by the kernel, never through the process.

A conversion that keeps the dtype only moves bytes: every megamix tensor is its HF tensors stacked
along rows, i.e. their byte ranges one after the other (and back: an HF tensor is a row range of a
megamix tensor, found in a DCP checkpoint by :func:`row_pieces`). :class:`SplicedTensors` hands DCP a
placeholder per tensor (``torch.empty``: memory that is never touched) and remembers which file
ranges hold its bytes. DCP's own writer serialises each placeholder with ``torch.save`` into a
:class:`SplicingStream`, which recognises the placeholder's storage when it arrives (by address and
size) and writes the ranges there with ``copy_file_range`` instead; ranges without a file become a
hole, which reads back as zeros (fresh Adam moments cost no writing). Everything else — planning,
the other records of each ``torch.save``, ``.metadata``, fsync — is DCP's, so the files are ordinary
DCP checkpoints. ``torch.save`` must not checksum the placeholder (that would read it), so CRC-32
is off while saving (:func:`without_crc32`; ``torch.load`` does not check it).
"""

from __future__ import annotations

import collections
import errno
import io
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.serialization import get_crc32_options, set_crc32_options

from megamix.errors import CheckpointError

# (file, offset, length); file None: ``length`` zero bytes
Piece = tuple[Path | None, int, int]
_FALLBACK_BYTES = 64 * 2**20


def _copy_range(source: int, target: int, offset: int, position: int, length: int) -> None:
    """``length`` bytes of fd ``source`` from ``offset`` to fd ``target`` at ``position``, in the kernel where
    the file systems allow (``copy_file_range``), else through a buffer."""
    try:
        while length:
            copied = os.copy_file_range(source, target, length, offset, position)
            if copied == 0:
                raise CheckpointError(f"a source file ends {length} bytes early")
            offset, position, length = offset + copied, position + copied, length - copied
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    while length:
        data = os.pread(source, min(length, _FALLBACK_BYTES), offset)
        if not data:
            raise CheckpointError(f"a source file ends {length} bytes early")
        os.pwrite(target, data, position)
        offset, position, length = offset + len(data), position + len(data), length - len(data)


class SplicedTensors:
    """Placeholders of tensors whose bytes are ranges of files, written by :class:`SplicingStream`."""

    def __init__(self):
        self._pending: dict[tuple[int, int], list[Piece]] = {}

    def placeholder(self, shape: tuple[int, ...], dtype: torch.dtype, pieces: list[Piece]) -> torch.Tensor:
        """An untouched ``[*shape]`` tensor that will be written as ``pieces`` (whose lengths sum to its bytes)."""
        tensor = torch.empty(shape, dtype=dtype)
        if sum(length for _, _, length in pieces) != tensor.nbytes:
            raise CheckpointError(f"internal: pieces of {sum(p[2] for p in pieces)} bytes for a {list(shape)} "
                                  f"{dtype} tensor ({tensor.nbytes} bytes)")
        if tensor.nbytes:
            self._pending[(tensor.data_ptr(), tensor.nbytes)] = pieces
        return tensor

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A placeholder written as a hole (zeros)."""
        return self.placeholder(shape, dtype, [(None, 0, math.prod(shape) * dtype.itemsize)])

    def take(self, buffer: memoryview) -> list[Piece] | None:
        """The pieces of the placeholder whose storage ``buffer`` is, if it is one."""
        if not buffer.nbytes:
            return None
        address = np.frombuffer(buffer, dtype=np.uint8).ctypes.data
        return self._pending.pop((address, buffer.nbytes), None)

    def check_written(self) -> None:
        if self._pending:
            raise CheckpointError(f"internal: {len(self._pending)} spliced tensors were not written (DCP copied "
                                  f"them before serialising); the checkpoint is incomplete")


class SplicingStream:
    """A binary file for DCP's writer: writes pass through, except a placeholder's storage, which becomes its
    pieces copied in place (or a hole)."""

    def __init__(self, file, spliced: SplicedTensors):
        self._file, self._spliced = file, spliced
        self._sources: dict[Path, int] = {}

    def write(self, data) -> int:
        buffer = memoryview(data)
        pieces = self._spliced.take(buffer)
        if pieces is None:
            return self._file.write(buffer)
        self._file.flush()
        position, target = self._file.tell(), self._file.fileno()
        for path, offset, length in pieces:
            if path is not None:
                if path not in self._sources:
                    self._sources[path] = os.open(path, os.O_RDONLY)
                _copy_range(self._sources[path], target, offset, position, length)
            position += length
        if os.fstat(target).st_size < position:  # the pieces end in a hole: the file must still reach past it
            os.ftruncate(target, position)
        self._file.seek(position)
        return buffer.nbytes

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _SplicingFileSystem(FileSystem):
    def __init__(self, spliced: SplicedTensors):
        super().__init__()
        self._spliced = spliced

    @contextmanager
    def create_stream(self, path, mode: str) -> Generator:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with SplicingStream(open(path, "wb"), self._spliced) as stream:  # the stream closes the file
            yield stream


class SplicingWriter(FileSystemWriter):
    """DCP's file system writer, one file and thread, writing the placeholders of ``spliced`` by splicing.
    It never loads ahead (``per_thread_copy_ahead=0`` keeps DCP's serial loader on CUDA machines too) and
    refuses to finish (write ``.metadata``) while a placeholder is left unwritten."""

    def __init__(self, path: str | os.PathLike, spliced: SplicedTensors):
        super().__init__(path, per_thread_copy_ahead=0)
        self.fs, self._spliced = _SplicingFileSystem(spliced), spliced

    def finish(self, metadata, results) -> None:
        self._spliced.check_written()
        super().finish(metadata, results)


@contextmanager
def without_crc32() -> Generator[None, None, None]:
    """``torch.save`` without CRC-32 checksums (it would read every placeholder byte)."""
    previous = get_crc32_options()
    set_crc32_options(False)
    try:
        yield
    finally:
        set_crc32_options(previous)


# -- where a DCP checkpoint keeps a tensor's bytes ------------------------------------------------

class _FileRange(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open binary file, as a seekable file of their own."""

    def __init__(self, file, start: int, length: int):
        super().__init__()
        self._file, self._start, self._length, self._position = file, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, min(self._length, base + offset))
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self._length - self._position)
        self._file.seek(self._start + self._position)
        count = self._file.readinto(memoryview(buffer)[:count])
        self._position += count
        return count


def _zip_records(file, start: int, length: int) -> dict[str, tuple[int, int]]:
    """The stored (uncompressed) records of the zip archive that ``torch.save`` wrote at ``[start, start + length)``
    of ``file``: name (without the archive folder) → (data offset in the file, length). Sizes come from the
    central directory (torch's writer leaves them out of the local headers), data offsets from the local
    headers (name and extra field lengths)."""
    records = {}
    with zipfile.ZipFile(_FileRange(file, start, length)) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                return {}
            file.seek(start + info.header_offset + 26)
            name_length, extra_length = (int.from_bytes(file.read(2), "little") for _ in range(2))
            records[info.filename.split("/", 1)[-1]] = (start + info.header_offset + 30 + name_length + extra_length,
                                                         info.file_size)
    return records


class _TensorLayout(pickle.Unpickler):
    """Reads the ``data.pkl`` of a saved tensor as (storage key, storage offset, size, stride), nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: (storage[2], offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        return pid  # ("storage", type, key, location, numel)


def saved_tensor_offset(path: Path, start: int, length: int, shape: tuple[int, ...],
                        dtype: torch.dtype) -> int | None:
    """The file offset of element 0 of the contiguous ``[*shape]`` tensor that ``torch.save`` wrote at
    ``[start, start + length)`` of ``path``, or None if it was saved otherwise (a strided view, another shape)."""
    with open(path, "rb") as file:
        try:
            records = _zip_records(file, start, length)
        except zipfile.BadZipFile:
            return None
        if "data.pkl" not in records:
            return None
        file.seek(records["data.pkl"][0])
        try:
            key, offset, size, stride = _TensorLayout(io.BytesIO(file.read(records["data.pkl"][1]))).load()
        except (pickle.UnpicklingError, TypeError, ValueError, IndexError):
            return None
    contiguous = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    if size != tuple(shape) or (math.prod(shape) > 1 and stride != contiguous) or f"data/{key}" not in records:
        return None
    data, nbytes = records[f"data/{key}"]
    if (offset + math.prod(shape)) * dtype.itemsize > nbytes:
        return None
    return data + offset * dtype.itemsize


def row_pieces(path: Path, metadata, key: str) -> Callable[[int, int], list[Piece]] | None:
    """For checkpoint ``path`` (DCP ``metadata``): a function giving the file ranges of rows ``[a, b)`` of tensor
    ``key``, if each of its stored chunks holds whole rows contiguously; else None (read it instead)."""
    entry = metadata.state_dict_metadata[key]
    shape, dtype = tuple(entry.size), entry.properties.dtype
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    blocks = []  # (first row, rows, file, offset of the first row)
    for chunk in entry.chunks:
        if any(chunk.offsets[1:]) or tuple(chunk.sizes[1:]) != shape[1:]:
            return None
        info = metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        file = path / info.relative_path
        offset = saved_tensor_offset(file, info.offset, info.length, tuple(chunk.sizes), dtype)
        if offset is None:
            return None
        blocks.append((chunk.offsets[0], chunk.sizes[0], file, offset))

    def pieces(first: int, end: int) -> list[Piece]:
        found = []
        for row, rows, file, offset in sorted(blocks, key=lambda block: block[0]):
            lo, hi = max(first, row), min(end, row + rows)
            if lo < hi:
                found.append((file, offset + (lo - row) * row_bytes, (hi - lo) * row_bytes))
        return found
    return pieces
