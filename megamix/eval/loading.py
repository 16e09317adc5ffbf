"""The model under evaluation: a megamix checkpoint or a Hugging Face directory, with its tokenizer."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from megamix.config import Config, config_from_dict
from megamix.data import Tokenizer, ensure_builtin
from megamix.data.builtin import default_cache_dir
from megamix.errors import CheckpointError, ConfigError
from megamix.models import HybridModel
from megamix.parallel import ParallelState
from megamix.parallel.sharding import sharding_of


class TextTokenizer(Protocol):
    """What evaluation needs of a tokenizer (:class:`megamix.data.Tokenizer` has it)."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """A Hugging Face tokenizer directory seen as a :class:`TextTokenizer` (no special tokens added)."""

    def __init__(self, directory: Path):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError(f"{directory} has no tokenizer.model; reading its tokenizer needs transformers") from None
        self.processor = AutoTokenizer.from_pretrained(directory)
        self.vocab_size, self.eos_id = len(self.processor), self.processor.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.processor(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


@dataclass
class EvalModel:
    """A model ready for evaluation. ``max_length``: the longest context it supports (an HF model's
    ``max_position_embeddings``; None when nothing limits it); ``trained_length``: its training context."""

    model: HybridModel
    tokenizer: TextTokenizer
    source: str
    max_length: int | None = None
    trained_length: int | None = None

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def check_length(self, length: int) -> None:
        if length < 1:
            raise ConfigError(f"length {length}: give context lengths of at least 1 token")
        if self.max_length is not None and length > self.max_length:
            raise ConfigError(f"length {length} is beyond what {self.source} supports ({self.max_length} "
                              f"positions, its max_position_embeddings)")


def checkpoint_tokenizer(config: Config) -> Tokenizer:
    """The tokenizer a megamix run trained with: ``data.tokenizer``, or the one beside its first dataset."""
    data = config.data
    if data.tokenizer:
        return Tokenizer.load(data.tokenizer)
    first = data.datasets[0].path
    if first == "builtin":
        first = ensure_builtin(data.cache_dir or default_cache_dir(), config.model.vocab_size)
    return Tokenizer.load(f"{first}.model")


def _load_weights(model: HybridModel, tensors: dict[str, torch.Tensor]) -> HybridModel:
    """Copy full tensors into the model's (tensor-parallel) shards."""
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    missing = sorted(set(model.state_dict()) - set(tensors))  # non-persistent buffers are not stored
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} tensors of its model: {', '.join(missing[:5])}")
    with torch.no_grad():
        for name, tensor in own.items():
            if name in tensors:
                tensor.copy_(sharding_of(tensor, model.tp.size).take(tensors[name]))
    return model.eval()


def load_for_eval(path: str | Path, tokenizer: str | None = None, parallel: ParallelState | None = None,
                  device: str | torch.device = "cpu") -> EvalModel:
    """A megamix checkpoint (``step_<N>`` or a root with ``latest``) or an HF directory (``config.json`` +
    safetensors, converted to megamix in a temporary directory), in fp32, split over ``parallel``'s tp
    group. ``tokenizer``: a sentencepiece ``.model`` instead of the model's own."""
    from megamix.checkpoint import read_config, resolve_checkpoint
    from megamix.convert.directions import hf_to_megamix, load_model_state

    parallel = parallel or ParallelState.single()
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model {path} does not exist; give a megamix checkpoint or a Hugging Face directory")
    max_length = None
    if (path / "config.json").is_file():
        hf_config = json.loads((path / "config.json").read_text())
        max_length = hf_config.get("max_position_embeddings")
        with tempfile.TemporaryDirectory() as converted:
            model_config, tensors, _ = load_model_state(hf_to_megamix(path, converted))
        trained = max_length
        def own_tokenizer() -> TextTokenizer:
            spm_file = path / "tokenizer.model"
            return Tokenizer.load(spm_file) if spm_file.is_file() else HFTokenizer(path)
    else:
        config = config_from_dict(read_config(resolve_checkpoint(path)))
        model_config, tensors, trained = load_model_state(path)
        def own_tokenizer() -> TextTokenizer:
            return checkpoint_tokenizer(config)
    text_tokenizer = Tokenizer.load(tokenizer) if tokenizer else own_tokenizer()
    if text_tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(f"the tokenizer has {text_tokenizer.vocab_size} ids, the model only {model_config.vocab_size}")
    model = HybridModel(model_config, device=device, tp=parallel.tensor_parallel)
    return EvalModel(_load_weights(model, {n: t.float() for n, t in tensors.items()}), text_tokenizer, str(path),
                     max_length, trained)
