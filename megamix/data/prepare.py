"""Text files → sentencepiece tokens → packed token files; the ``megamix prepare-data`` subcommand.

Outputs, for ``--output PREFIX``:
    PREFIX.bin, PREFIX.idx   token ids, every document ending in EOS (see indexed.py)
    PREFIX.model             the tokenizer (trained here, or a copy of --tokenizer)
    PREFIX.json              metadata: tokenizer, vocab_size, eos_id, num_documents, num_tokens, inputs
"""

import argparse
import functools
import itertools
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from megamix.data.indexed import IndexedDatasetWriter, write_atomically
from megamix.data.tokenizer import Tokenizer, train_tokenizer
from megamix.errors import DataError

# Input file suffix → `datasets` builder.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
BATCH_SIZE = 1000


@dataclass
class PreparedInfo:
    """What ``prepare_data`` wrote: PREFIX.{bin,idx,model,json}."""

    prefix: str
    vocab_size: int
    eos_id: int
    num_documents: int
    num_tokens: int

    @property
    def bin_path(self) -> str:
        return self.prefix + ".bin"

    @property
    def idx_path(self) -> str:
        return self.prefix + ".idx"

    @property
    def tokenizer_path(self) -> str:
        return self.prefix + ".model"

    @property
    def metadata_path(self) -> str:
        return self.prefix + ".json"


def prepare_data(
    inputs: list[str],
    output_prefix: str,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    text_key: str = "text",
    workers: int = 1,
) -> PreparedInfo:
    """Tokenize ``inputs`` into ``OUTPUT_PREFIX.{bin,idx,model,json}``.

    Documents: each line of a .txt file; the ``text_key`` field of each record of a
    .jsonl / .json / .parquet file. Empty documents are skipped, the others get EOS
    appended. Give either ``tokenizer`` (a sentencepiece .model to reuse) or
    ``vocab_size`` (train a new BPE tokenizer on the inputs).
    """
    if (tokenizer is None) == (vocab_size is None):
        raise DataError("give exactly one of tokenizer (a .model file to reuse) or vocab_size (to train one)")
    if not (isinstance(workers, int) and workers >= 1):
        raise DataError(f"workers must be a positive integer, got {workers!r}")
    if not inputs:
        raise DataError("no input files given; pass .txt, .jsonl, .json or .parquet files")
    prefix = os.path.abspath(output_prefix)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(prefix), prefix=".prepare-") as cache_dir:
        texts = load_texts(inputs, text_key, cache_dir)
        tok = output_tokenizer(texts, prefix, tokenizer, vocab_size)
        encoded = texts.map(
            functools.partial(encode_documents, model_path=tok.path, model_stat=model_stat(tok.path)),
            batched=True,
            batch_size=BATCH_SIZE,
            num_proc=workers if workers > 1 else None,
            remove_columns=["text"],
            desc="tokenizing",
        )
        lengths = write_tokens(encoded, prefix, tok.vocab_size, inputs)
    info = PreparedInfo(prefix, tok.vocab_size, tok.eos_id, len(lengths), sum(lengths))
    write_metadata(info, inputs, text_key)
    return info


def output_tokenizer(texts, prefix: str, tokenizer: str | None, vocab_size: int | None) -> Tokenizer:
    """``PREFIX.model``: trained on ``texts`` with ``vocab_size`` pieces, or a copy of ``tokenizer``."""
    if tokenizer is None:
        return train_tokenizer(iter_texts(texts), prefix, vocab_size)
    Tokenizer.load(tokenizer)  # check it before copying
    with open(tokenizer, "rb") as f:
        write_atomically(prefix + ".model", f.read())
    return Tokenizer.load(prefix + ".model")


def write_tokens(encoded, prefix: str, vocab_size: int, inputs: list[str]) -> list[int]:
    """Write the "ids" column of ``encoded`` to PREFIX.bin/.idx; returns the document lengths."""
    with IndexedDatasetWriter(prefix, vocab_size) as writer:
        for batch in encoded.iter(batch_size=BATCH_SIZE):
            for ids in batch["ids"]:
                writer.add_document(ids)
        if not writer.lengths:
            raise DataError(f"{', '.join(inputs)}: no non-empty documents to tokenize")
    return writer.lengths


def load_texts(inputs: list[str], text_key: str, cache_dir: str):
    """One ``datasets.Dataset`` with a single string column "text", documents in input order."""
    # Imported here: `datasets` takes a second to import and only data preparation needs it.
    import datasets

    parts = [
        load_files(builder, list(files), text_key, cache_dir)
        for builder, files in itertools.groupby(inputs, key=builder_for)
    ]
    return datasets.concatenate_datasets(parts)


def builder_for(path: str) -> str:
    """The ``datasets`` builder that reads ``path``."""
    if not os.path.isfile(path):
        raise DataError(f"input file {path} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in BUILDERS:
        raise DataError(f"input file {path}: unsupported type {suffix!r}; use one of {', '.join(BUILDERS)}")
    return BUILDERS[suffix]


def load_files(builder: str, files: list[str], text_key: str, cache_dir: str):
    """Files of one type as a Dataset with a single string column "text"."""
    import datasets

    names = ", ".join(files)
    try:
        table = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
    except Exception as e:  # whatever the parser raises, the input file is at fault
        raise DataError(f"cannot read {names} as {builder}: {e}") from e
    key = "text" if builder == "text" else text_key
    if key not in table.column_names:
        raise DataError(
            f"{names}: records have no field {key!r} (fields: {', '.join(table.column_names)}); "
            "name the text field with --text-key"
        )
    feature = table.features[key]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"{names}: field {key!r} holds {feature}, not text; name the text field with --text-key")
    table = table.select_columns([key])
    return table if key == "text" else table.rename_column(key, "text")


def iter_texts(texts) -> Iterator[str]:
    """The non-empty documents of a "text" Dataset."""
    for batch in texts.iter(batch_size=BATCH_SIZE):
        yield from filter(None, batch["text"])


def model_stat(path: str) -> tuple[int, int]:
    """Changes when the file at ``path`` is replaced, so a cached tokenizer of an older file is not reused."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_mtime_ns


@functools.lru_cache(maxsize=1)
def cached_tokenizer(model_path: str, model_stat: tuple[int, int]) -> Tokenizer:
    # One load per worker process rather than one per batch.
    return Tokenizer.load(model_path)


def encode_documents(batch: dict, model_path: str, model_stat: tuple[int, int]) -> dict:
    """Batched map: {"text": [str | None]} → {"ids": [ids + [eos]]}, empty documents dropped."""
    tokenizer = cached_tokenizer(model_path, model_stat)
    ids = tokenizer.encode_batch([text for text in batch["text"] if text])
    return {"ids": [document + [tokenizer.eos_id] for document in ids]}


def write_metadata(info: PreparedInfo, inputs: list[str], text_key: str) -> None:
    metadata = {
        **asdict(info),
        "tokenizer": os.path.basename(info.tokenizer_path),
        "inputs": [os.path.abspath(path) for path in inputs],
        "text_key": text_key,
    }
    del metadata["prefix"]  # the files move together (e.g. the built-in corpus cache)
    write_atomically(info.metadata_path, json.dumps(metadata, indent=2).encode())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``megamix prepare-data``."""
    parser.description = (
        "Tokenize text into packed token files PREFIX.bin/.idx (Megatron-LM indexed format),\n"
        "with the tokenizer PREFIX.model and metadata PREFIX.json."
    )
    parser.epilog = (
        "examples:\n"
        "  megamix prepare-data books.txt wiki.jsonl --output data/corpus --vocab-size 32000 --workers 8\n"
        "  megamix prepare-data valid.parquet --output data/valid --tokenizer data/corpus.model"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help=".txt (one document per line), .jsonl/.json or .parquet (one document per record)",
    )
    parser.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.bin, .idx, .model, .json")
    tokenizer = parser.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument("--tokenizer", metavar="MODEL", help="encode with this sentencepiece .model file")
    tokenizer.add_argument(
        "--vocab-size", type=int, metavar="N", help="train a new BPE tokenizer with N pieces on the inputs"
    )
    parser.add_argument(
        "--text-key", default="text", metavar="FIELD",
        help="field of .jsonl/.json/.parquet records holding the text (default: text)",
    )
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizer processes (default: 1)")


def run(args: argparse.Namespace) -> int:
    """Run ``megamix prepare-data``; prints a one-line summary."""
    info = prepare_data(args.inputs, args.output, args.tokenizer, args.vocab_size, args.text_key, args.workers)
    print(
        f"prepared {info.num_documents} documents, {info.num_tokens} tokens "
        f"(vocab {info.vocab_size}) into {info.prefix}.{{bin,idx,model,json}}"
    )
    return 0
