"""Generation with a KV cache and recurrent states equals the full forward, token for token."""

import pytest
import torch

from megamix.config import load_config
from megamix.errors import ConfigError
from megamix.eval.generate import generate
from megamix.models import HybridModel
from megamix.parallel import ParallelState
from megamix.testing import run_distributed

MODEL = ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=96",
         "model.vocab_size=256", "model.mamba.head_dim=16", "model.mamba.state_size=16", "model.mamba.num_groups=2",
         "model.moh.shared_heads=2", "model.moh.routed_top_k=1", "model.moe.num_experts=4",
         "model.moe.ffn_hidden_size=64"]
ALL_KINDS = "*H-LME"


def tiny_model(pattern: str, *overrides: str) -> HybridModel:
    return HybridModel(load_config(None, [*MODEL, f"model.pattern={pattern}", *overrides]).model, seed=3).eval()


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("pattern", [ALL_KINDS, "*", "H", "L", "M"])
def test_chunked_extend_equals_forward_logits(pattern):
    model = tiny_model(pattern)
    tokens = torch.tensor(prompts([45, 45]))
    state = model.initial_state(2, "cpu")
    chunks = [model.extend(tokens[:, i:i + 16], state) for i in range(0, 45, 16)]  # 16, 16, 13 tokens
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(chunks, dim=1), model(tokens), rtol=1e-4, atol=1e-5)
    assert state.layers["0"] is not None and state.valid.shape == (2, 45)


@pytest.mark.parametrize("pattern, overrides", [(ALL_KINDS, ()), (ALL_KINDS, ("model.rotary=false",)),
                                                ("*", ()), ("H", ()), ("L", ()), ("M", ())])
def test_batched_greedy_decode_equals_forward_argmax(pattern, overrides):
    """Rows of different lengths share a left-padded batch; every generated token is the argmax of the
    full forward over the row's own prompt and the tokens generated before it."""
    model = tiny_model(pattern, *overrides)
    rows = prompts([23, 9, 17])
    outputs = generate(model, rows, 12, prefill_chunk=8)
    for prompt, out in zip(rows, outputs):
        assert len(out.tokens) == 12 and out.stopped is None
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out.tokens]))[0]
        assert logits[len(prompt) - 1:-1].argmax(dim=-1).tolist() == out.tokens


def test_padding_does_not_change_a_row():
    model = tiny_model(ALL_KINDS)
    rows = prompts([30, 5])
    alone = generate(model, rows[1:], 6)[0].tokens
    assert generate(model, rows, 6)[1].tokens == alone


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = tiny_model("L*")
    row = prompts([10])
    first, again, other = (generate(model, row, 16, temperature=1.0, seed=s)[0].tokens for s in (1, 1, 2))
    assert first == again and first != other
    assert generate(model, row, 8, temperature=0.7, top_k=1, seed=5)[0].tokens == generate(model, row, 8)[0].tokens


def test_stops_at_eos_and_at_stop_strings():
    model = tiny_model("M*")
    row = prompts([10])
    greedy = generate(model, row, 6)[0].tokens
    at_eos = generate(model, row, 6, eos_id=greedy[2])[0]
    assert at_eos.tokens == greedy[:2] and at_eos.stopped == "eos"

    def decode(ids):
        return "".join(f"<{i}>" for i in ids)

    at_stop = generate(model, row, 6, stop=[f"<{greedy[1]}>"], decode=decode)[0]
    assert at_stop.tokens == greedy[:2] and at_stop.stopped == "stop" and at_stop.text == f"<{greedy[0]}>"


def test_bad_generation_requests_are_refused():
    model = tiny_model("*")
    with pytest.raises(ConfigError, match="at least one token"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(model, [[1, 2]], 0)
    with pytest.raises(ConfigError, match="decode"):
        generate(model, [[1, 2]], 3, stop=["x"])


def generate_under_tp(tp: int, temperature: float):
    parallel = ParallelState.create(tp=tp)
    cfg = load_config(None, [*MODEL, f"model.pattern={ALL_KINDS}"]).model
    model = HybridModel(cfg, seed=3, tp=parallel.tensor_parallel).eval()
    return [out.tokens for out in generate(model, prompts([23, 9, 17]), 10, temperature=temperature, seed=5,
                                           prefill_chunk=8)]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_generation_under_tensor_parallelism_equals_one_process(temperature):
    expected = generate_under_tp(1, temperature)
    for tokens in run_distributed(generate_under_tp, 2, 2, temperature):
        assert tokens == expected
