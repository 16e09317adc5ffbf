"""Data pipeline: text → sentencepiece tokens → packed token files → resumable sample stream."""

from megamix.data.builtin import default_cache_dir, ensure_builtin
from megamix.data.indexed import IndexedDataset, IndexedDatasetWriter
from megamix.data.prepare import PreparedInfo, prepare_data
from megamix.data.sampler import BlendedSamples, SampleStream, TokenWindows
from megamix.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "BlendedSamples",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "PreparedInfo",
    "SampleStream",
    "TokenWindows",
    "Tokenizer",
    "default_cache_dir",
    "ensure_builtin",
    "prepare_data",
    "train_tokenizer",
]
