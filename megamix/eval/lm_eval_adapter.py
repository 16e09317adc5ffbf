"""lm-evaluation-harness adapter: megamix models under the model name ``megamix``.

    import megamix.eval.lm_eval_adapter  # registers "megamix"
    lm_eval.simple_evaluate(model="megamix", model_args="pretrained=runs/tiny/checkpoints", tasks=[...])

or from the shell (the harness's own CLI, with the model registered first):

    python -m megamix.eval.lm_eval_adapter --model megamix --model_args pretrained=CKPT --tasks hellaswag

``pretrained`` is a megamix checkpoint or an HF directory (:func:`~megamix.eval.loading.load_for_eval`);
``tokenizer`` a sentencepiece ``.model``; ``max_length`` the context (default: the model's limit, else its
training length); ``batch_size`` scoring rows per forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megamix.eval.generate import generate
from megamix.eval.loading import load_for_eval

DEFAULT_MAX_LENGTH = 2048  # when neither the model nor its checkpoint says


@register_model("megamix")
class MegamixLM(LM):
    def __init__(self, pretrained: str, tokenizer: str | None = None, max_length: int | None = None,
                 batch_size: int | str = 1, **_ignored):
        super().__init__()
        self.em = load_for_eval(pretrained, tokenizer)
        self.tokenizer = self.em.tokenizer
        self.max_length = int(max_length or self.em.max_length or self.em.trained_length or DEFAULT_MAX_LENGTH)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1  # "auto" → 1

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context, continuation) token lists → (Σ log p(continuation | context), whether greedy decoding
        produces it). Rows are right-padded into batches: causal models ignore what follows a position."""
        results = []
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start:start + self.batch_size]
            rows = [(context + continuation)[-(self.max_length + 1):][:-1] for context, continuation in batch]
            tokens = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
            for i, row in enumerate(rows):
                tokens[i, :len(row)] = torch.tensor(row)
            with torch.no_grad():
                logprobs = F.log_softmax(self.em.model(tokens).float(), dim=-1)
            for i, (row, (_, continuation)) in enumerate(zip(rows, batch)):
                scored = logprobs[i, len(row) - len(continuation):len(row)]  # [continuation, vocab]
                target = torch.tensor(continuation)
                results.append((scored.gather(1, target[:, None]).sum().item(),
                                bool((scored.argmax(dim=-1) == target).all())))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in (r.args for r in requests):
            context_tokens = self.tokenizer.encode(context) or [self.tokenizer.eos_id]
            pairs.append((context_tokens, self.tokenizer.encode(continuation)))
        return self._score(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        totals = []
        for (text,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tokenizer.encode(text), self.tokenizer.eos_id, self.max_length, 1)]
            totals.append(sum(logprob for logprob, _ in self._score(windows)))
        return totals

    def generate_until(self, requests) -> list[str]:
        outputs = []
        for context, options in (r.args for r in requests):
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(options.get("max_gen_toks", 256))
            temperature = float(options.get("temperature", 0.0)) if options.get("do_sample", False) else 0.0
            prompt = (self.tokenizer.encode(context) or [self.tokenizer.eos_id])[-(self.max_length - max_new):]
            result = generate(self.em.model, [prompt], max_new, temperature=temperature, eos_id=self.tokenizer.eos_id,
                              stop=until, decode=self.tokenizer.decode)[0]
            outputs.append(result.text)
        return outputs


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
