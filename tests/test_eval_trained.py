"""A real end-to-end check: a tiny model trained briefly on passkey prompts retrieves passkeys it never saw."""

import torch
import torch.nn.functional as F

from megamix.config import load_config
from megamix.data import Tokenizer, ensure_builtin
from megamix.eval.loading import EvalModel
from megamix.eval.runner import SuiteSettings, generation_cell
from megamix.eval.tasks import TASKS, fit_to_length
from megamix.models import HybridModel
from megamix.parallel.context_parallel import SequenceLayout
from tests.conftest import BUILTIN_VOCAB

LENGTH, STEPS, BATCH = 100, 400, 16


def answer_loss(model: HybridModel, tokens: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Next-token loss at the answer positions only (``answer [batch, seq − 1]`` bool): the LM head, which
    dominates this tiny model's cost, runs on those rows alone."""
    x = model.embed(tokens[:, :-1])
    ctx = model.forward_context(SequenceLayout(x.shape[1]), x.device)
    for layer in model.layers.values():
        x = layer(x, ctx)
    return F.cross_entropy(model.logits(x[answer]), tokens[:, 1:][answer])


def test_trained_tiny_model_scores_well_above_chance_on_passkey(builtin_cache):
    tokenizer = Tokenizer.load(ensure_builtin(builtin_cache, BUILTIN_VOCAB) + ".model")
    task = TASKS["passkey"]
    examples = []
    for i in range(800):  # seeds disjoint from the evaluation's
        sample, prompt_tokens = fit_to_length(task, lambda t: len(tokenizer.encode(t)), LENGTH, f"train/{i}")
        examples.append((tokenizer.encode(sample.prompt + " " + sample.answers[0] + "."), prompt_tokens))
    torch.manual_seed(0)
    cfg = load_config(None, ["model.hidden_size=64", "model.num_heads=4", "model.pattern=*-*-",
                             f"model.vocab_size={BUILTIN_VOCAB}"]).model
    model = HybridModel(cfg, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(STEPS):
        batch = [examples[(step * BATCH + i) % len(examples)] for i in range(BATCH)]
        tokens = torch.zeros(BATCH, max(len(t) for t, _ in batch), dtype=torch.long)
        answer = torch.zeros(BATCH, tokens.shape[1] - 1, dtype=torch.bool)
        for row, (ids, prompt_tokens) in enumerate(batch):
            tokens[row, :len(ids)] = torch.tensor(ids)
            answer[row, prompt_tokens - 1:len(ids) - 1] = True
        loss = answer_loss(model, tokens, answer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    summary, records = generation_cell(EvalModel(model.eval(), tokenizer, "trained"), "passkey", LENGTH, None,
                                       SuiteSettings(samples=20, batch_size=20))
    # chance is 1 in 90,000 for a 5-digit passkey
    assert summary["value"] >= 40, [r["output"] for r in records]
