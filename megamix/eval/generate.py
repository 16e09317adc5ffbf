"""Batched generation: chunked prefill, then one token at a time, with a KV cache for softmax attention
(``*``, ``H``) and the fixed-size recurrent state of ``L``/``M`` (:meth:`HybridModel.extend`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megamix.errors import ConfigError
from megamix.models import HybridModel
from megamix.parallel.comm import all_gather

# Prompt tokens per prefill call: softmax attention then holds a [chunk, seen] score matrix per head,
# the linear mixers a chunk of activations, instead of a whole prompt's.
PREFILL_CHUNK = 2048


@dataclass
class Generation:
    """One row's result: the new tokens (up to and without the EOS or the tokens completing a stop string)
    and their text (cut before the first stop string) when a ``decode`` function was given."""

    tokens: list[int]
    text: str | None = None
    stopped: str | None = None  # "eos", "stop" or None (max_new_tokens reached)


def _left_padded(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts → tokens ``[batch, longest]`` right-aligned with 0 before them, and valid ``[batch, longest]``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("generation needs at least one prompt, and every prompt at least one token")
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    valid = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        valid[row, longest - len(prompt):] = True
    return tokens.to(device), valid.to(device)


def _pick(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """logits ``[batch, vocab]`` → next tokens ``[batch]``: argmax at temperature 0, else a sample from
    softmax(logits / temperature), over the ``top_k`` most likely tokens when top_k > 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def generate(model: HybridModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0, eos_id: int | None = None,
             stop: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None,
             prefill_chunk: int = PREFILL_CHUNK) -> list[Generation]:
    """Continue each prompt (token ids) by up to ``max_new_tokens`` tokens; greedy at ``temperature`` 0.

    The prompts run as one batch, left-padded to the longest; the prefill feeds ``prefill_chunk`` tokens per
    call. A row stops at ``eos_id`` or once its decoded text contains a string of ``stop`` (needs ``decode``);
    the batch stops when every row has. Sampling draws from a generator seeded with ``seed``.
    Under tensor parallelism every rank of the model's group calls this with the same prompts: the vocabulary
    shards of the logits are gathered, so every rank picks (or samples, with the same seed) the same token.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if stop and decode is None:
        raise ConfigError("stop strings need a decode function to read the generated text")
    device = next(model.parameters()).device
    tokens, valid = _left_padded(prompts, device)
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    state = model.initial_state(len(prompts), device)

    def extend(new: torch.Tensor, new_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[batch, new, vocab]`` of the next tokens (all of the vocabulary, on every TP rank)."""
        return all_gather(model.extend(new, state, new_valid), model.tp.group, dim=-1)

    for start in range(0, tokens.shape[1], prefill_chunk):
        logits = extend(tokens[:, start:start + prefill_chunk], valid[:, start:start + prefill_chunk])
    results = [Generation([]) for _ in prompts]
    running = list(range(len(prompts)))
    for step in range(max_new_tokens):
        chosen = _pick(logits[:, -1], temperature, top_k, generator).tolist()
        for row in running:
            result = results[row]
            if chosen[row] == eos_id:
                result.stopped = "eos"
                continue
            result.tokens.append(chosen[row])
            if stop and any(s in decode(result.tokens) for s in stop):
                result.stopped = "stop"
        running = [row for row in running if results[row].stopped is None]
        if not running or step == max_new_tokens - 1:
            break
        logits = extend(torch.tensor(chosen, device=device)[:, None])
    if decode is not None:
        for result in results:
            result.text = decode(result.tokens)
            for s in stop:
                result.text = result.text.split(s, 1)[0]
    return results
