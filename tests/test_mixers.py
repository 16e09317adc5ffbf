"""Lightning (``L``) and Mamba-2 (``M``) mixers: generation equals the parallel form, Mamba-2's
initialisation, the decay schedules; the hybrid and routed tiny configs train."""

import json
import math

import pytest
import torch

from megamix.config import load_config
from megamix.errors import ConfigError
from megamix.models import HybridModel
from megamix.nn.lightning import lightning_log_decay
from megamix.parallel.context_parallel import SequenceLayout
from megamix.train import train

HYBRID = ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=96",
          "model.vocab_size=4096", "model.mamba.head_dim=16", "model.mamba.state_size=16",
          "model.mamba.num_groups=2"]


def model(kind: str, *overrides: str) -> HybridModel:
    return HybridModel(load_config(None, [*HYBRID, f"model.pattern={kind}", *overrides]).model, seed=3)


def mixer(kind: str, *overrides: str):
    return model(kind, *overrides).layers["0"].mixer


@pytest.mark.parametrize("kind", ["L", "M"])
def test_generation_steps_equal_the_parallel_form(kind):
    whole = model(kind)
    layer = whole.layers["0"].mixer
    x = torch.randn(2, 19, 64, generator=torch.Generator().manual_seed(0))
    parallel = layer(x, whole.forward_context(SequenceLayout(19), x.device))
    state = layer.initial_state(2, "cpu")
    steps = []
    for t in range(x.shape[1]):
        y, state = layer.step(x[:, t], state)
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, dim=1), parallel, rtol=1e-4, atol=1e-5)


def test_causal_conv_equals_torch_depthwise_conv():
    conv = mixer("M").conv1d
    x = torch.randn(2, 9, conv.weight.shape[0], generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=conv.kernel - 1,
                                          groups=x.shape[-1])[..., :9].transpose(1, 2)
    torch.testing.assert_close(conv(x, SequenceLayout(9)), expected)


def test_mamba2_initialisation_follows_the_paper():
    layer = mixer("M", "model.mamba.dt_min=0.002", "model.mamba.dt_max=0.05")
    dt = torch.nn.functional.softplus(layer.dt_bias)
    assert dt.min() >= 0.002 - 1e-6 and dt.max() <= 0.05 + 1e-6
    a = layer.A_log.exp()
    assert a.min() >= 1 and a.max() <= 16
    assert torch.equal(layer.D, torch.ones_like(layer.D))
    assert torch.equal(layer.norm.weight, torch.ones_like(layer.norm.weight))
    bound = 1 / math.sqrt(layer.conv1d.kernel)
    assert layer.conv1d.weight.abs().max() <= bound


def test_lightning_decay_schedules():
    tnl = lightning_log_decay("tnl", 4, layer=1, num_layers=4)
    assert tnl == pytest.approx([-(8 * h / 4) * (1 - 1 / 4) for h in (1, 2, 3, 4)])
    alibi = lightning_log_decay("alibi", 8, layer=5, num_layers=6)
    assert alibi == pytest.approx([-(2 ** (-h)) for h in range(1, 9)])
    assert mixer("L", "model.lightning.decay=alibi").log_decay == pytest.approx(lightning_log_decay("alibi", 4, 0, 1))


def test_mamba_layouts_that_split_a_group_are_refused():
    with pytest.raises(ConfigError, match=r"model.mamba.num_groups \(2\) must be divisible by parallel.tp \(4\)"):
        load_config(None, [*HYBRID, "model.pattern=M-", "parallel.tp=4"])
    with pytest.raises(ConfigError, match=r"model.mamba.num_heads \(8\) must be divisible by model.mamba.num_groups"):
        load_config(None, [*HYBRID, "model.pattern=M-", "model.mamba.num_groups=3"])


def test_tiny_hybrid_config_trains(tmp_path, builtin_cache):
    """configs/tiny-hybrid.yaml, shortened: the loss falls."""
    losses = train(short_run("configs/tiny-hybrid.yaml", tmp_path, builtin_cache))
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


def short_run(config_path, tmp_path, cache, steps=30):
    return load_config(config_path, [
        f"train.steps={steps}", "data.seq_len=64", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.warmup_steps=3", f"data.cache_dir={cache}", f"log.dir={tmp_path}", "log.tensorboard=false",
    ])


def test_tiny_moe_config_trains_and_logs_router_metrics(tmp_path, builtin_cache):
    config = short_run("configs/tiny-moe.yaml", tmp_path, builtin_cache)
    losses = train(config)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["moe_aux_loss"] >= 1.0 - 1e-4  # E/k · Σ f_i P_i is 1 at perfect balance, more otherwise
    assert last["moe_z_loss"] > 0
    for layer in (1, 3, 5, 7):
        assert last[f"moe_load_imbalance/layers.{layer}"] >= 1.0


def test_tiny_moh_config_trains_and_logs_head_metrics(tmp_path, builtin_cache):
    losses = train(short_run("configs/tiny-moh.yaml", tmp_path, builtin_cache))
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["moh_active_heads"] == pytest.approx(4 / 8)  # 2 shared + 2 of the 6 routed
    assert last["moh_aux_loss"] >= 1.0 - 1e-4  # r · Σ f_j P_j is 1 at uniform routing
