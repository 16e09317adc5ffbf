"""The lm-evaluation-harness adapter on tasks built locally (no downloads), checked against our own scoring."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megamix.checkpoint import save_checkpoint
from megamix.config import load_config
from megamix.eval.generate import generate
from megamix.eval.loading import load_for_eval
from megamix.models import HybridModel
from tests.conftest import BUILTIN_VOCAB

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager

import megamix.eval.lm_eval_adapter  # noqa: F401  (registers "megamix")

DOCS = [{"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0, "text": "The sky is blue."},
        {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0,
         "text": "Two plus two is four, and the grass is green. " * 6}]
TASKS = {
    "megamix_choice": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                       "doc_to_choice": "{{choices}}", "metric_list": [{"metric": "acc"}]},
    "megamix_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                        "metric_list": [{"metric": "word_perplexity"}]},
    "megamix_generate": {"output_type": "generate_until", "doc_to_text": "{{question}}",
                         "doc_to_target": "{{choices[answer]}}", "metric_list": [{"metric": "exact_match"}],
                         "generation_kwargs": {"until": ["."], "max_gen_toks": 5, "do_sample": False}},
}


@pytest.fixture(scope="module")
def checkpoint(builtin_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval-ckpt")
    config = load_config(None, ["model.hidden_size=32", "model.num_heads=2", "model.pattern=*-L-",
                                f"model.vocab_size={BUILTIN_VOCAB}", f"data.cache_dir={builtin_cache}"])
    model = HybridModel(config.model, seed=1)
    save_checkpoint(root, 0, {f"model.{k}": v for k, v in model.state_dict().items()}, config.to_dict(), {})
    return root


def test_harness_runs_local_tasks_through_the_adapter(checkpoint, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, spec in TASKS.items():
        spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **spec}
        (tmp_path / f"{name}.yaml").write_text(json.dumps(spec))  # YAML reads JSON
    results = lm_eval.simple_evaluate(model="megamix", model_args=f"pretrained={checkpoint},max_length=16,batch_size=2",
                                      tasks=list(TASKS), task_manager=TaskManager(include_path=str(tmp_path)),
                                      log_samples=True)
    samples = results["samples"]

    em = load_for_eval(checkpoint)
    tokenizer, model = em.tokenizer, em.model

    def logprob(context: list[int], continuation: list[int]) -> float:
        tokens = torch.tensor([context + continuation])
        with torch.no_grad():
            logprobs = F.log_softmax(model(tokens[:, :-1]), dim=-1)[0]
        return sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))

    for sample in samples["megamix_choice"]:  # the harness asks (question, " " + choice) for each choice
        expected = [logprob(tokenizer.encode(context), tokenizer.encode(choice))
                    for context, choice in sample["arguments"]]
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(expected, abs=1e-4)
    for sample in samples["megamix_rolling"]:  # windows of max_length=16 tokens, each token predicted once
        tokens = tokenizer.encode(sample["doc"]["text"])
        expected = logprob([tokenizer.eos_id], tokens[:16])
        for start in range(16, len(tokens), 16):  # later windows: full 16-token contexts
            end = min(start + 16, len(tokens))
            expected += logprob(tokens[end - 17:start], tokens[start:end])
        assert sample["resps"][0][0] == pytest.approx(expected, abs=1e-3)
    for sample in samples["megamix_generate"]:
        prompt = tokenizer.encode(sample["arguments"][0][0])
        expected = generate(model, [prompt], 5, eos_id=tokenizer.eos_id, stop=["."], decode=tokenizer.decode)[0].text
        assert sample["resps"][0][0] == expected
    assert math.isfinite(results["results"]["megamix_rolling"]["word_perplexity,none"])
    assert 0 <= results["results"]["megamix_choice"]["acc,none"] <= 1
