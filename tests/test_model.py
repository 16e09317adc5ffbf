"""The dense hybrid model: shapes, causality, initialisation, recompute, HF Llama oracle, FLOPs."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import (
    FlopCounterMode,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from megamix.config import ModelConfig, load_config
from megamix.convert.llama import megamix_from_hf
from megamix.errors import ConfigError
from megamix.models import HybridModel
from megamix.nn import rotary_tables
from megamix.nn.attention import SplitRotaryFunction
from megamix.nn.mlp import SiluGateFunction
from megamix_kernels.norm import rms_norm
from megamix.parallel import (
    NO_TENSOR_PARALLEL,
    tensor_parallel,
    vocab_parallel_cross_entropy,
)

aten = torch.ops.aten


def tiny_config(pattern: str = "*-*-", **overrides) -> ModelConfig:
    """GQA (4 query heads share 2 kv heads), head_dim 16, odd-ish sizes."""
    fields = dict(pattern=pattern, vocab_size=97, hidden_size=64, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=96, rope_theta=500000.0, norm_eps=1e-6)
    return ModelConfig(**{**fields, **overrides})


def random_tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def next_token_loss(model: HybridModel, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


@pytest.mark.parametrize(
    "cfg",
    [
        tiny_config("*-"),
        tiny_config("*-*-", num_kv_heads=4),
        tiny_config("*-|*-"),
        tiny_config("-*|*-", tie_embeddings=True),
        tiny_config("--"),
    ],
    ids=["llama-block", "mha", "gqa-stages", "tied", "mlp-only"],
)
def test_forward_shape(cfg):
    model = HybridModel(cfg)
    logits = model(random_tokens(2, 7, cfg.vocab_size))
    assert logits.shape == (2, 7, cfg.vocab_size)
    assert torch.isfinite(logits).all()
    assert len(model.layers) == cfg.num_layers


def test_parameter_names():
    names = [name for name, _ in HybridModel(tiny_config("*-|*-")).named_parameters()]
    layer = lambda i, kind: [f"layers.{i}.norm.weight"] + [f"layers.{i}.mixer.{p}.weight" for p in kind]
    attention, mlp = ("qkv_proj", "out_proj"), ("gate_up_proj", "down_proj")
    assert names == ["embed.weight", *layer(0, attention), *layer(1, mlp), *layer(2, attention),
                     *layer(3, mlp), "norm.weight", "lm_head.weight"]


def test_tied_embeddings_reuse_the_embedding_matrix():
    cfg = tiny_config(tie_embeddings=True)
    model = HybridModel(cfg)
    assert model.lm_head is None
    assert model.num_parameters() == HybridModel(tiny_config()).num_parameters() - cfg.vocab_size * cfg.hidden_size
    with torch.no_grad():
        model.embed.weight[5] = 0.0  # the head's row for token 5: its logit must vanish everywhere
        logits = model(random_tokens(2, 7, 5))
    assert torch.equal(logits[..., 5], torch.zeros(2, 7))
    assert (logits[..., :5] != 0).all()


def test_num_parameters():
    cfg = tiny_config("*-*-")
    h, v, f = cfg.hidden_size, cfg.vocab_size, cfg.ffn_hidden_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_block = (h + h * (q + 2 * kv) + q * h) + (h + 2 * h * f + f * h)
    model = HybridModel(cfg)
    assert model.num_parameters() == 2 * v * h + 2 * per_block + h
    assert model.num_parameters(exclude_embeddings=True) == v * h + 2 * per_block + h


def test_hand_written_backward_passes_match_autograd():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(16, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x, weight))
    assert torch.autograd.gradcheck(SiluGateFunction.apply, (x,))
    cos, sin = (table.double() for table in rotary_tables(torch.arange(3), 4, 10000.0))
    assert torch.autograd.gradcheck(lambda x: SplitRotaryFunction.apply(x, [2, 1, 1], cos, sin), (x,))


def test_chunked_loss_matches_cross_entropy(monkeypatch):
    monkeypatch.setattr(tensor_parallel, "LOSS_CHUNK_ELEMENTS", 1000)  # 3 rows of 301 logits per chunk
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 301, (3, 7), generator=generator)
    logits = torch.randn(3, 7, 301, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: vocab_parallel_cross_entropy(x, targets), (logits,))
    for dtype in (torch.float32, torch.bfloat16):
        x = (4 * logits.detach()).to(dtype).requires_grad_()
        loss = vocab_parallel_cross_entropy(x, targets, NO_TENSOR_PARALLEL)
        (grad,) = torch.autograd.grad(loss.mean(), x)
        expected = F.cross_entropy(x.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
        (expected_grad,) = torch.autograd.grad(expected.mean(), x)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-7 if dtype == torch.float32 else 1e-6)


def test_rmsnorm_computes_in_fp32_and_returns_the_input_dtype():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).bfloat16() * 100
    weight = torch.ones(64)
    y = rms_norm(x, weight, 1e-6)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.rms_norm(x.float(), (64,), weight, 1e-6).bfloat16())


def test_changing_a_token_never_changes_earlier_logits():
    cfg = tiny_config("*-*-")
    model = HybridModel(cfg, seed=3)
    tokens = random_tokens(2, 12, cfg.vocab_size)
    with torch.no_grad():
        reference = model(tokens)
        for t in (0, 5, 11):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
            logits = model(changed)
            assert torch.equal(logits[:, :t], reference[:, :t]), f"position < {t} saw token {t}"
            assert not torch.allclose(logits[:, t], reference[:, t]), f"position {t} ignored its own token"


def test_same_seed_same_parameters_other_seed_differs():
    cfg = tiny_config()
    a, b, c = HybridModel(cfg, seed=1), HybridModel(cfg, seed=1), HybridModel(cfg, seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if name.endswith("norm.weight"):
            assert torch.equal(pa, torch.ones_like(pa)), name
        else:
            assert not torch.equal(pa, pc), name


def test_parameter_values_depend_only_on_name_and_shape():
    # Same number of layers (the residual std depends on it), but layer 0 differs in
    # kind and size: one RNG stream drawn in construction order would shift every
    # parameter after it.
    a = dict(HybridModel(tiny_config("*-*-"), seed=5).named_parameters())
    b = dict(HybridModel(tiny_config("--*-"), seed=5).named_parameters())
    shared = [n for n in a if n in b and a[n].shape == b[n].shape and not n.endswith("norm.weight")]
    mixer = lambda i, *names: [f"layers.{i}.mixer.{n}.weight" for n in names]
    assert shared == ["embed.weight", *mixer(1, "gate_up_proj", "down_proj"), *mixer(2, "qkv_proj", "out_proj"),
                      *mixer(3, "gate_up_proj", "down_proj"), "lm_head.weight"]
    for name in shared:
        assert torch.equal(a[name], b[name]), name


def test_residual_output_projections_are_scaled_down():
    cfg = tiny_config("*-" * 8, hidden_size=256, ffn_hidden_size=512)
    model = HybridModel(cfg)
    expected = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    assert model.layers["0"].mixer.out_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.layers["1"].mixer.down_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.layers["0"].mixer.qkv_proj.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)


def test_recompute_gives_identical_loss_and_gradients():
    cfg = tiny_config("*-*-")
    tokens = random_tokens(2, 17, cfg.vocab_size)
    results = []
    for recompute in (False, True):
        model = HybridModel(cfg, seed=7)
        model.recompute = recompute
        calls = []
        # the norm, not the mixer: recomputation stops as soon as the last saved tensor is rebuilt
        model.layers["0"].norm.register_forward_hook(lambda *_: calls.append(1))
        loss = next_token_loss(model, tokens)
        loss.backward()
        assert len(calls) == (2 if recompute else 1), "recompute runs each layer's forward again in backward"
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (loss_plain, grads_plain), (loss_recompute, grads_recompute) = results
    assert torch.equal(loss_plain, loss_recompute)
    for name, grad in grads_plain.items():
        assert torch.equal(grad, grads_recompute[name]), name


def test_unknown_pattern_character_is_a_config_error():
    with pytest.raises(ConfigError) as error:
        load_config(overrides=["model.pattern=*X"])
    message = str(error.value)
    assert "'X'" in message and "position 1" in message
    assert "'*' attention" in message and "'-' mlp" in message


def test_logits_match_hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config("*-*-")
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers // 2, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, tie_word_embeddings=False,
        initializer_range=0.2, attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:  # ones by default: randomise so a misplaced norm weight shows
                param.uniform_(0.5, 1.5)

    ours = HybridModel(cfg).eval()
    hf_weights = {name: p.detach() for name, p in hf.named_parameters()}
    converted = megamix_from_hf(cfg, hf_weights.__getitem__)  # q|k|v and gate|up stacked; no rotary permutation
    ours.load_state_dict(converted, strict=True)

    tokens = random_tokens(2, 23, cfg.vocab_size)
    with torch.no_grad():
        expected = hf(tokens).logits
        actual = ours(tokens)
    assert expected.abs().mean() > 0.1, "logits too small for the tolerance to mean anything"
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def count_cpu_flash_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def count_cpu_flash_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def test_flops_per_token_matches_flop_counter():
    cfg = tiny_config("*-*-")
    batch, seq = 2, 32
    model = HybridModel(cfg)
    # FlopCounterMode has no formula for the CPU flash-attention kernel: give it torch's SDPA ones.
    counter = FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: count_cpu_flash_attention,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: count_cpu_flash_attention_backward,
    })
    with counter, sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        next_token_loss(model, random_tokens(batch, seq + 1, cfg.vocab_size)).backward()
    counted = counter.get_total_flops()
    # torch's SDPA backward formula also counts the recomputation of q kᵀ (one
    # score-sized matmul per attention layer), which MFU conventions leave out.
    attention_layers = cfg.pattern.count("*")
    recomputed_scores = attention_layers * 2 * batch * cfg.num_heads * seq * seq * cfg.head_dim
    assert model.flops_per_token(seq) * batch * seq == counted - recomputed_scores
