"""Shared fixtures: the builtin corpus is prepared once per test session.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; the variable
must be set before any kernel module is imported (``triton.jit`` reads it then).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megamix.data import ensure_builtin

BUILTIN_VOCAB = 4096  # tests that train on the builtin corpus use this model.vocab_size


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """A cache directory holding the prepared builtin corpus (pass it as data.cache_dir)."""
    cache = tmp_path_factory.mktemp("megamix-cache")
    ensure_builtin(cache, BUILTIN_VOCAB)
    return cache
