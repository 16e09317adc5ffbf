"""SentencePiece tokenizer: load a ``.model`` file, or train one on text."""

import io
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from megamix.data.indexed import write_atomically
from megamix.errors import DataError

# Byte fallback keeps every string encodable, so the vocabulary always holds 256
# byte pieces plus unk/bos/eos and the characters of the text.
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}
# Enough lines for a good vocabulary; sentencepiece samples this many from larger inputs.
MAX_TRAINING_LINES = 2_000_000


class Tokenizer:
    """A sentencepiece model; ids are ints in ``[0, vocab_size)``."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str):
        self.processor = processor
        self.path = path
        if self.eos_id < 0:
            raise DataError(
                f"tokenizer {path} has no end-of-sequence piece, which marks document ends; "
                "train one with `megamix prepare-data --vocab-size N`"
            )

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = str(path)
        if not os.path.isfile(path):
            raise DataError(f"tokenizer file {path} does not exist; give the path of a sentencepiece .model file")
        try:
            processor = spm.SentencePieceProcessor(model_file=path)
        except RuntimeError as e:
            raise DataError(f"{path} is not a sentencepiece model file ({e})") from e
        return cls(processor, path)

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode([int(i) for i in ids])


def train_tokenizer(
    texts: Iterable[str],
    model_prefix: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    seed: int = 0,
) -> Tokenizer:
    """Train on ``texts`` (documents; newlines split them into training lines) and save ``MODEL_PREFIX.model``.

    ``model_type`` is "bpe" or "unigram". Decoding reproduces the encoded text exactly:
    no normalization, whitespace kept, unknown characters as bytes.
    """
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"tokenizer model_type {model_type!r} is not supported; use 'bpe' or 'unigram'")
    lines = TrainingLines(texts)
    model = io.BytesIO()
    # Sampling down to MAX_TRAINING_LINES is random: seed it so the same text gives the same model.
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            input_sentence_size=MAX_TRAINING_LINES,
            shuffle_input_sentence=True,
            minloglevel=2,
            **SPECIAL_IDS,
        )
    except RuntimeError as e:
        if not lines.count:
            raise DataError("cannot train a tokenizer: the input text is empty") from e
        raise DataError(
            f"cannot train a tokenizer with vocab size {vocab_size} on this text: {training_failure(e)}"
        ) from e
    path = f"{model_prefix}.model"
    write_atomically(path, model.getvalue())
    return Tokenizer.load(path)


def training_failure(error: RuntimeError) -> str:
    """Sentencepiece's reason for failing, in terms of what the user can change."""
    message = str(error)
    if too_small := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        return f"it needs at least {too_small[1]} pieces (256 bytes, special pieces and its characters)"
    if too_large := re.search(r"Please set it to a value <= (\d+)", message):
        return f"it yields at most {too_large[1]} pieces; use a smaller vocab size or more text"
    return message.split("] ", 1)[-1]


class TrainingLines:
    """Iterates the non-empty lines of documents, counting them."""

    def __init__(self, texts: Iterable[str]):
        self.texts = texts
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            for line in text.splitlines():
                if line:
                    self.count += 1
                    yield line
