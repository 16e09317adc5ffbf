"""Tensor, sequence and data parallelism equal one process (gloo, CPU worker processes).

Each parallel case runs on a pool of worker ranks (megamix.testing) and is
compared with the same computation in this single process (no process group).
"""

import pytest
import torch

from megamix.config import load_config
from megamix.errors import ConfigError
from megamix.models import HybridModel
from megamix.parallel import ParallelState, check_layout, record_communication, sharding_of
from megamix.parallel import vocab_parallel_cross_entropy
from megamix.parallel.sharding import full_tensor, sum_partial_gradient
from megamix.testing import run_distributed
from megamix.train import Trainer

MODEL = ["model.pattern=*-*-", "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=96", "model.vocab_size=4096"]
TRAIN = [*MODEL, "data.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=8",
         "train.warmup_steps=2", "train.lr=3e-3", "train.steps=5", "log.tensorboard=false"]
RTOL = 1e-5


def full_gradients(model, parallel):
    """Every parameter's global gradient, after the TP sum of partial gradients the optimizer does."""
    grads = {}
    for name, param in model.named_parameters():
        sharding = sharding_of(param, parallel.tp.size)
        if sharding.partial_grads:
            sum_partial_gradient(param.grad, sharding, parallel.tp)
        grads[name] = full_tensor(param.grad, sharding, parallel.tp)
    return grads


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
], ids=["tp2", "tp2-sp", "tp4-kv-replicated", "tp4-sp", "tp2-tied"])
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
    ctx = model.forward_context(seq, x.device)
    with record_communication() as recorder:
        y = x
        for layer in model.layers:
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
    return losses, norms


@pytest.mark.parametrize("world, overrides", [
    (2, ["parallel.tp=2"]),
    (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    (2, []),  # dp=2 with the sharded optimizer (ZeRO-1)
    (2, ["parallel.zero=0"]),  # dp=2, replicated optimizer
    (4, ["parallel.tp=2"]),  # tp=2 × dp=2
], ids=["tp2", "tp2-sp", "dp2-zero1", "dp2-zero0", "tp2xdp2"])
def test_training_equals_one_process(tmp_path, builtin_cache, world, overrides):
    reference_losses, reference_norms = train_run(builtin_cache, tmp_path / "single", [])
    for losses, norms in run_distributed(train_run, world, builtin_cache, tmp_path / "parallel", overrides):
        assert losses == pytest.approx(reference_losses, rel=RTOL)
        assert norms == pytest.approx(reference_norms, rel=RTOL)
