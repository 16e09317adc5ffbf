"""Tensor, sequence and data parallelism equal one process (gloo, CPU worker processes).

Each parallel case runs on a pool of worker ranks (megamix.testing) and is
compared with the same computation in this single process (no process group).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megamix import checkpoint
from megamix.config import load_config
from megamix.errors import ConfigError
from megamix.models import HybridModel
from megamix.parallel import (
    ParallelState,
    check_layout,
    record_communication,
    sharding_of,
    vocab_parallel_cross_entropy,
)
from megamix.parallel.context_parallel import SequenceLayout
from megamix.parallel.sharding import full_tensor
from megamix.testing import full_gradients, run_distributed
from megamix.train import Trainer

MODEL = ["model.pattern=*-*-", "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=96", "model.vocab_size=4096"]
TRAIN = [*MODEL, "data.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=8",
         "train.warmup_steps=2", "train.lr=3e-3", "train.steps=5", "log.tensorboard=false"]
RTOL = 1e-5
# Mamba-2 (8 heads of 16, 2 groups) and Lightning layers beside attention and MLPs
# attention + MoE (4 experts, top 2, with auxiliary losses and the loss-free balancing bias) + MLP
MOE = ["model.pattern=*E*-", "model.moe.num_experts=4", "model.moe.ffn_hidden_size=64",
       "model.moe.bias_update_rate=0.01"]
HYBRID = ["model.pattern=M-L*", "model.mamba.head_dim=16", "model.mamba.state_size=16", "model.mamba.num_groups=2"]


def model_forward_backward(tp, sequence_parallel, overrides):
    """Loss and global gradients of one forward+backward of a tiny model on a fixed batch."""
    parallel = ParallelState.create(tp=tp, sequence_parallel=sequence_parallel)
    cfg = load_config(None, [*MODEL, *overrides]).model
    model = HybridModel(cfg, seed=7, tp=parallel.tensor_parallel)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = vocab_parallel_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], parallel.tensor_parallel).mean()
    loss.backward()
    return loss.item(), full_gradients(model, parallel)


@pytest.mark.parametrize("tp, sequence_parallel, overrides", [
    (2, False, []),
    (2, True, []),
    (4, False, []),  # 2 kv heads on 4 ranks: each kv head replicated on 2 ranks
    (4, True, ["model.num_kv_heads=4"]),
    (2, False, ["model.tie_embeddings=true"]),
    (2, False, HYBRID),
    (2, True, HYBRID),
    (4, False, [*HYBRID, "model.mamba.num_groups=4", "model.num_kv_heads=4"]),
    (2, True, ["model.pattern=H-*E", "model.moh.shared_heads=2", "model.moh.routed_top_k=1",
               "model.moe.num_experts=4", "model.moe.ffn_hidden_size=64"]),
], ids=["tp2", "tp2-sp", "tp4-kv-replicated", "tp4-sp", "tp2-tied", "tp2-hybrid", "tp2-sp-hybrid", "tp4-hybrid",
        "tp2-sp-routed"])
def test_tensor_parallel_loss_and_gradients_equal_one_process(tp, sequence_parallel, overrides):
    reference_loss, reference_grads = model_forward_backward(1, False, overrides)
    for loss, grads in run_distributed(model_forward_backward, tp, tp, sequence_parallel, overrides):
        assert loss == pytest.approx(reference_loss, rel=RTOL)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=RTOL, atol=1e-7, msg=name)


def dense_layer_communication(sequence_parallel):
    """Collectives issued by one dense layer (attention + MLP: pattern ``*-``), forward and backward."""
    parallel = ParallelState.create(tp=2, sequence_parallel=sequence_parallel)
    model = HybridModel(load_config(None, [*MODEL, "model.pattern=*-"]).model, tp=parallel.tensor_parallel)
    seq = 16
    x = torch.randn(2, seq // 2 if sequence_parallel else seq, 64, generator=torch.Generator().manual_seed(0),
                    requires_grad=True)
    ctx = model.forward_context(SequenceLayout(seq), x.device)
    with record_communication() as recorder:
        y = x
        for layer in model.layers.values():
            y = layer(y, ctx)
        forward = recorder.kinds()
        y.sum().backward()
    return dict(forward), dict(recorder.kinds() - forward), recorder.bytes_sent


def test_dense_layer_issues_exactly_the_megatron_collectives():
    activation_bytes = 2 * 16 * 64 * 4  # [batch, seq, hidden] fp32
    ring = 2 * (2 - 1) / 2  # all-reduce sends 2(p-1)/p of the payload per rank
    for forward, backward, sent in run_distributed(dense_layer_communication, 2, False):
        assert forward == {"all_reduce": 2} and backward == {"all_reduce": 2}
        assert sent == 4 * ring * activation_bytes
    for forward, backward, sent in run_distributed(dense_layer_communication, 2, True):
        assert forward == {"all_gather": 2, "reduce_scatter": 2}
        assert backward == {"all_gather": 2, "reduce_scatter": 2}
        assert sent == 4 * ring * activation_bytes  # the same bytes as without SP


def train_run(cache, log_dir, overrides):
    """Losses and gradient norms of a short training run (every rank returns them)."""
    config = load_config("configs/tiny-dense.yaml", [*TRAIN, f"data.cache_dir={cache}", f"log.dir={log_dir}",
                                                     *overrides])
    trainer = Trainer(config)
    losses, norms = [], []
    while trainer.step < config.train.steps:
        loss, norm = trainer.train_step()
        losses.append(loss)
        norms.append(norm)
        if trainer.pipeline is not None:  # the schedule's idle fraction (pp_bubble), the optimizer step excluded
            assert 0.0 < trainer.pipeline.busy < trainer.pipeline.elapsed and 0.0 < trainer.pipeline.bubble() < 1.0
    return losses, norms


@pytest.mark.parametrize("world, model, overrides", [
    (2, [], ["parallel.tp=2"]),
    (2, [], ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    (2, [], []),  # dp=2 with the sharded optimizer (ZeRO-1)
    (2, [], ["parallel.zero=0"]),  # dp=2, replicated optimizer
    (4, [], ["parallel.tp=2"]),  # tp=2 × dp=2
    (2, MOE, ["parallel.ep=2"]),  # each rank holds 2 of the 4 experts
    (2, MOE, ["parallel.ep=2", "parallel.zero=0"]),
    (4, MOE, ["parallel.ep=2", "parallel.tp=2", "parallel.sequence_parallel=true"]),
], ids=["tp2", "tp2-sp", "dp2-zero1", "dp2-zero0", "tp2xdp2", "moe-ep2", "moe-ep2-zero0", "moe-ep2xtp2-sp"])
def test_training_equals_one_process(tmp_path, builtin_cache, world, model, overrides):
    reference_losses, reference_norms = train_run(builtin_cache, tmp_path / "single", model)
    for losses, norms in run_distributed(train_run, world, builtin_cache, tmp_path / "parallel", [*model, *overrides]):
        assert losses == pytest.approx(reference_losses, rel=RTOL)
        assert norms == pytest.approx(reference_norms, rel=RTOL)


def data_parallel_gradients(cache, log_dir, overrides):
    """Global gradients of the first step, after the optimizer's reduction (replicated optimizer)."""
    config = load_config("configs/tiny-dense.yaml", [*TRAIN, f"data.cache_dir={cache}", f"log.dir={log_dir}",
                                                     "parallel.zero=0", *overrides])
    trainer = Trainer(config)
    trainer.compute_gradients()
    return {name: full_tensor(p.grad, sharding_of(p, trainer.tp.size), trainer.parallel.tp)
            for name, p in trainer.named_parameters()}


@pytest.mark.parametrize("world, overrides", [(2, []), (4, ["parallel.tp=2", "parallel.sequence_parallel=true"])],
                         ids=["dp2", "tp2-sp-xdp2"])
def test_data_parallel_gradients_equal_one_process(tmp_path, builtin_cache, world, overrides):
    reference = data_parallel_gradients(builtin_cache, tmp_path / "single", [])
    for grads in run_distributed(data_parallel_gradients, world, builtin_cache, tmp_path / "parallel", overrides):
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], rtol=RTOL, atol=1e-8, msg=name)


def optimizer_state_bytes(cache, log_dir, zero):
    config = load_config("configs/tiny-dense.yaml", [*TRAIN, f"data.cache_dir={cache}", f"log.dir={log_dir}",
                                                     f"parallel.zero={zero}", "train.steps=1"])
    trainer = Trainer(config)
    trainer.train_step()
    return sum(t.numel() * t.element_size() for state in trainer.optimizer.adamw.state.values()
               for t in state.values() if t.ndim > 0)


def test_sharded_optimizer_keeps_one_dp_share_of_the_state(tmp_path, builtin_cache):
    replicated = run_distributed(optimizer_state_bytes, 2, builtin_cache, tmp_path / "zero0", 0)
    sharded = run_distributed(optimizer_state_bytes, 2, builtin_cache, tmp_path / "zero1", 1)
    assert replicated[0] == replicated[1]
    for share in sharded:  # rows are split evenly, so each rank holds half, up to one row per tensor
        assert share / replicated[0] == pytest.approx(0.5, abs=0.01)
    assert sum(sharded) == replicated[0]


def resumed_losses(cache, log_dir, overrides):
    config = load_config("configs/tiny-dense.yaml", [*TRAIN, f"data.cache_dir={cache}", f"log.dir={log_dir}",
                                                     "train.steps=6", "checkpoint.interval=3", "checkpoint.keep=0",
                                                     *overrides])
    return Trainer(config).run()


def test_checkpoint_resumes_at_another_layout(tmp_path, builtin_cache):
    reference = resumed_losses(builtin_cache, tmp_path / "single", [])
    run_distributed(resumed_losses, 2, builtin_cache, tmp_path / "tp2", ["parallel.tp=2"])
    step_3 = tmp_path / "tp2" / "checkpoints" / "step_3"
    for layout, world in ((["parallel.tp=1"], 2), (["parallel.tp=2", "parallel.sequence_parallel=true"], 2)):
        for losses in run_distributed(resumed_losses, world, builtin_cache, tmp_path / f"from-tp2-{world}",
                                      [*layout, f"train.resume={step_3}"]):
            assert losses == pytest.approx(reference[3:], rel=RTOL)
    # and in one process, from the sharded optimizer state of dp=2
    run_distributed(resumed_losses, 2, builtin_cache, tmp_path / "dp2", [])
    losses = resumed_losses(builtin_cache, tmp_path / "from-dp2", [f"train.resume={tmp_path / 'dp2/checkpoints/step_3'}"])
    assert losses == pytest.approx(reference[3:], rel=RTOL)


def test_expert_parallel_checkpoint_resumes_in_one_process(tmp_path, builtin_cache):
    """Experts saved by their global index from ep=2 (with the balancing bias) load at ep=1, and back."""
    reference = resumed_losses(builtin_cache, tmp_path / "single", MOE)
    run_distributed(resumed_losses, 2, builtin_cache, tmp_path / "ep2", [*MOE, "parallel.ep=2"])
    saved = checkpoint.read_metadata(tmp_path / "ep2/checkpoints/step_3").state_dict_metadata
    assert {"model.layers.1.mixer.expert_bias", "model.layers.1.mixer.experts.3.down_proj.weight"} <= saved.keys()
    losses = resumed_losses(builtin_cache, tmp_path / "from-ep2", [*MOE, f"train.resume={tmp_path / 'ep2/checkpoints/step_3'}"])
    assert losses == pytest.approx(reference[3:], rel=RTOL)
    for losses in run_distributed(resumed_losses, 2, builtin_cache, tmp_path / "to-ep2",
                                  [*MOE, "parallel.ep=2", f"train.resume={tmp_path / 'single/checkpoints/step_3'}"]):
        assert losses == pytest.approx(reference[3:], rel=RTOL)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=3", "model.num_heads=4"], "model.num_heads (4) must be divisible by parallel.tp (3)"),
    (["parallel.tp=4", "model.num_kv_heads=6", "model.num_heads=12", "model.hidden_size=96"],
     "model.num_kv_heads (6) and parallel.tp (4) must divide one another"),
    (["parallel.tp=2", "model.vocab_size=4095"], "model.vocab_size (4095) must be divisible by parallel.tp (2); use 4096"),
    (["parallel.tp=2", "model.ffn_hidden_size=99"], "model.ffn_hidden_size (99) must be divisible by parallel.tp (2)"),
])
def test_layouts_the_model_cannot_take_are_refused(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*MODEL, *overrides])
    assert message in str(e.value)


def test_layout_must_divide_the_world_size():
    with pytest.raises(ConfigError, match=r"2×1×1 = 2 does not divide the world size 3"):
        check_layout(3, tp=2)
    with pytest.raises(ConfigError, match=r"parallel.ep=4 must divide dp × cp = 2×1 = 2"):
        check_layout(4, tp=2, ep=4)
    assert check_layout(8, tp=2, pp=2) == 2


@pytest.mark.parametrize("model, layout", [
    ([], ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    (MOE, ["parallel.ep=2"]),
], ids=["tp2-sp", "moe-ep2"])
def test_torchrun_trains_like_one_process(tmp_path, builtin_cache, model, layout):
    """The documented command: ``torchrun --nproc-per-node N -m megamix train CONFIG parallel.tp=2``."""
    overrides = [*TRAIN, f"data.cache_dir={builtin_cache}", "log.interval=1", *model]
    reference = Trainer(load_config("configs/tiny-dense.yaml", [*overrides, f"log.dir={tmp_path / 'single'}"])).run()
    run_dir = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "megamix", "train", "configs/tiny-dense.yaml", *overrides, *layout, f"log.dir={run_dir}"]
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(reference, rel=RTOL)
    assert json.loads((run_dir / "checkpoints" / "step_5" / "meta.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("world, overrides", [
    (2, ["parallel.pp=2"]),  # 1F1B
    (2, ["parallel.pp=2", "parallel.vpp=2"]),  # interleaved 1F1B, 4 stages of one layer
    (4, ["parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true"]),
    (2, ["parallel.pp=2", "model.tie_embeddings=true"]),  # embedding on stage 0, head on stage 1
    (2, ["parallel.pp=2", "model.pattern=*-*|-"]),  # stages at the marks
    (2, ["parallel.pp=2", *MOE]),  # MoE auxiliary losses on both stages
], ids=["pp2-1f1b", "pp2-interleaved", "pp2xtp2-sp", "pp2-tied", "pp2-marked", "pp2-moe"])
def test_pipeline_training_equals_one_process(tmp_path, builtin_cache, world, overrides):
    model = [o for o in overrides if o.startswith("model.")]
    reference_losses, reference_norms = train_run(builtin_cache, tmp_path / "single",
                                                  [o.replace("|", "") for o in model])
    for losses, norms in run_distributed(train_run, world, builtin_cache, tmp_path / "pipeline", overrides):
        assert losses == pytest.approx(reference_losses, rel=RTOL)
        assert norms == pytest.approx(reference_norms, rel=RTOL)


def test_checkpoints_move_between_pipeline_layouts(tmp_path, builtin_cache):
    reference = resumed_losses(builtin_cache, tmp_path / "single", [])
    run_distributed(resumed_losses, 2, builtin_cache, tmp_path / "pp2", ["parallel.pp=2"])
    losses = resumed_losses(builtin_cache, tmp_path / "from-pp2", [f"train.resume={tmp_path / 'pp2/checkpoints/step_3'}"])
    assert losses == pytest.approx(reference[3:], rel=RTOL)
    resumed = run_distributed(resumed_losses, 2, builtin_cache, tmp_path / "to-pp2",
                              ["parallel.pp=2", f"train.resume={tmp_path / 'single/checkpoints/step_3'}"])
    assert resumed[0] == pytest.approx(reference[3:], rel=RTOL)
