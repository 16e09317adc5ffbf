"""Packed token files in Megatron-LM's indexed-dataset format.

``PREFIX.bin`` holds the token ids of all sequences back to back.
``PREFIX.idx`` (all integers little-endian):

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version, 1
    uint8     dtype code of the tokens (1 uint8, 2 int8, 3 int16, 4 int32,
              5 int64, 6 float64, 7 float32, 8 uint16)
    uint64    S, number of sequences
    uint64    D + 1, number of document boundaries
    int32[S]  sequence lengths in tokens
    int64[S]  byte offset of each sequence in .bin
    int64[D+1] document boundaries as sequence indices: 0, ..., S

megamix writes one sequence per document (boundaries 0, 1, ..., S); files made
by Megatron's preprocessing, where a document may span several sequences, read
the same way.
"""

import os
import struct

import numpy as np

from megamix.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")
DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every id below ``vocab_size``."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)


def index_bytes(dtype: np.dtype, lengths: np.ndarray, document_bounds: np.ndarray) -> bytes:
    """The whole .idx file for sequences of ``lengths`` tokens stored contiguously."""
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1] * dtype.itemsize, out=pointers[1:])
    header = HEADER.pack(MAGIC, VERSION, DTYPE_CODES[dtype], len(lengths), len(document_bounds))
    return b"".join([
        header,
        lengths.astype("<i4").tobytes(),
        pointers.astype("<i8").tobytes(),
        document_bounds.astype("<i8").tobytes(),
    ])


def temporary_path(path: str) -> str:
    """A name beside ``path`` to write to before renaming it to ``path``."""
    return f"{path}.tmp-{os.getpid()}"


def write_atomically(path: str, data: bytes) -> None:
    """Write ``path`` so that readers see either the old file or the whole new one."""
    tmp_path = temporary_path(path)
    with open(tmp_path, "wb") as f:
        f.write(data)
    os.replace(tmp_path, path)


class IndexedDatasetWriter:
    """Writes ``PREFIX.bin`` / ``PREFIX.idx``, one sequence per ``add_document`` call.

    Both files are written under temporary names and renamed at ``close()``,
    so a crash never leaves a partial file under the final names.
    """

    def __init__(self, prefix: str, vocab_size: int):
        self.prefix = str(prefix)
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.lengths: list[int] = []
        os.makedirs(os.path.dirname(os.path.abspath(self.prefix)), exist_ok=True)
        self.tmp_bin = temporary_path(self.prefix + ".bin")
        self.bin_file = open(self.tmp_bin, "wb")

    def add_document(self, ids) -> None:
        """Append one document: a sequence of token ids in ``[0, vocab_size)``."""
        ids = np.asarray(ids, dtype=np.int64)
        outside = ids[(ids < 0) | (ids >= self.vocab_size)]
        if outside.size:
            raise DataError(
                f"{self.prefix}.bin: token id {outside[0]} is outside the vocabulary [0, {self.vocab_size}); "
                "the tokenizer's vocabulary is larger than the vocab_size given to the writer"
            )
        self.bin_file.write(ids.astype(self.dtype.newbyteorder("<")).tobytes())
        self.lengths.append(ids.size)

    def close(self) -> None:
        """Write the index and move both files to their final names."""
        self.bin_file.close()
        lengths = np.asarray(self.lengths, dtype=np.int64)
        bounds = np.arange(len(lengths) + 1, dtype=np.int64)
        # .bin first: a reader that sees the new .idx then also sees its .bin.
        os.replace(self.tmp_bin, self.prefix + ".bin")
        write_atomically(self.prefix + ".idx", index_bytes(self.dtype, lengths, bounds))

    def abort(self) -> None:
        """Drop what was written; the final names are left untouched."""
        self.bin_file.close()
        os.remove(self.tmp_bin)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class IndexedDataset:
    """Memory-mapped reader of ``PREFIX.bin`` / ``PREFIX.idx``.

    ``tokens`` is the flat ``[num_tokens]`` array over the whole .bin;
    ``document(i)`` is a ``[length]`` view of document i.
    """

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        self.idx_path = self.prefix + ".idx"
        self.bin_path = self.prefix + ".bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise DataError(
                    f"{path} does not exist; token files come in pairs PREFIX.bin/PREFIX.idx, "
                    "made by `megamix prepare-data` or Megatron-LM's preprocess_data.py"
                )
        self.dtype, self.document_offsets = read_index(self.idx_path)
        self.num_tokens = int(self.document_offsets[-1])
        expected = self.num_tokens * self.dtype.itemsize
        actual = os.path.getsize(self.bin_path)
        if actual != expected:
            raise DataError(
                f"{self.bin_path} has {actual} bytes but {self.idx_path} describes {expected}; "
                "the pair is incomplete or from different runs: prepare the data again"
            )
        # numpy cannot map an empty file.
        self.tokens = (
            np.memmap(self.bin_path, dtype=self.dtype.newbyteorder("<"), mode="r")
            if self.num_tokens
            else np.empty(0, dtype=self.dtype)
        )

    @property
    def num_documents(self) -> int:
        return len(self.document_offsets) - 1

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i``, shape ``[length]``."""
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} out of range [0, {self.num_documents}) in {self.bin_path}")
        return self.tokens[self.document_offsets[i] : self.document_offsets[i + 1]]


def read_index(path: str) -> tuple[np.dtype, np.ndarray]:
    """Parse and check a .idx file: (token dtype, token offset of each document and the end ``[D + 1]``)."""
    with open(path, "rb") as f:
        data = f.read()

    def corrupt(reason: str) -> DataError:
        return DataError(f"{path} is not a valid index file ({reason}); prepare the data again")

    if len(data) < HEADER.size:
        raise corrupt(f"{len(data)} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, code, num_sequences, num_bounds = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise corrupt(f"magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise corrupt(f"version {version}, expected {VERSION}")
    if code not in DTYPES_BY_CODE:
        raise corrupt(f"unknown dtype code {code}")
    expected = HEADER.size + 12 * num_sequences + 8 * num_bounds
    if len(data) != expected:
        raise corrupt(f"{len(data)} bytes, but its header announces {expected}")
    dtype = DTYPES_BY_CODE[code]
    lengths = np.frombuffer(data, "<i4", num_sequences, HEADER.size)
    pointers = np.frombuffer(data, "<i8", num_sequences, HEADER.size + 4 * num_sequences)
    bounds = np.frombuffer(data, "<i8", num_bounds, HEADER.size + 12 * num_sequences)
    sequence_offsets = np.zeros(num_sequences + 1, dtype=np.int64)
    np.cumsum(lengths, out=sequence_offsets[1:])
    if np.any(lengths < 0):
        raise corrupt("negative sequence lengths")
    # The flat `tokens` view relies on sequences stored back to back.
    if not np.array_equal(pointers, sequence_offsets[:-1] * dtype.itemsize):
        raise corrupt("sequence pointers do not match back-to-back sequences")
    if num_bounds == 0 or bounds[0] != 0 or bounds[-1] != num_sequences or np.any(np.diff(bounds) < 0):
        raise corrupt("document boundaries are not 0 ... number of sequences, ascending")
    return dtype, sequence_offsets[bounds]
