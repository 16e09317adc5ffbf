"""Context parallelism and packed documents equal one process running whole samples (gloo, CPU workers)."""

import pytest
import torch
from megamix_kernels.linear_attention import linear_attention_full

from megamix.config import load_config
from megamix.errors import ConfigError
from megamix.models import HybridModel
from megamix.parallel import (
    ParallelState,
    record_communication,
    vocab_parallel_cross_entropy,
)
from megamix.parallel.comm import all_reduce
from megamix.parallel.context_parallel import (
    SequenceLayout,
    check_sequence_split,
    document_index,
)
from megamix.parallel.lasp import context_linear_attention
from megamix.testing import full_gradients, run_distributed
from megamix.train import Trainer
from megamix.train.batches import split_micro_batch

BATCH, HEADS, KEY_HEADS, KEY_DIM, VALUE_DIM = 2, 4, 2, 8, 8
EOS = 3
# fp32 chunked kernel vs the fp32 full-matrix reference (sums of up to 64 decayed products)
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def sample_tokens(seq: int, seed: int = 0) -> torch.Tensor:
    """Token rows with documents ending at random places (EOS ids), one of them right before a chunk start."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 50, (BATCH, seq), generator=generator)
    tokens[torch.rand(BATCH, seq, generator=generator) < 0.08] = EOS
    tokens[0, seq // 4 - 1] = EOS  # a document starts exactly at a chunk start under cp=2
    return tokens


def linear_inputs(seq: int, per_token_decay: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = {name: torch.randn(BATCH, seq, heads, dim, generator=generator, dtype=torch.float32)
              for name, heads, dim in [("q", KEY_HEADS, KEY_DIM), ("k", KEY_HEADS, KEY_DIM), ("v", HEADS, VALUE_DIM)]}
    decay_shape = (BATCH, seq, HEADS) if per_token_decay else (HEADS,)
    inputs["log_decay"] = -torch.rand(decay_shape, generator=generator, dtype=torch.float32)
    inputs["grad"] = torch.randn(BATCH, seq, HEADS, VALUE_DIM, generator=generator, dtype=torch.float32)
    return inputs


def reference_linear_attention(inputs: dict, documents: torch.Tensor | None):
    """Whole samples in one process: the full-matrix reference over each document (packed, batch of one)."""
    leaves = {name: inputs[name].clone().requires_grad_() for name in ("q", "k", "v", "log_decay")}
    batch, seq = inputs["v"].shape[:2]
    documents = torch.zeros(batch, seq, dtype=torch.long) if documents is None else documents
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    begins = starts.flatten().nonzero().squeeze(1)
    cu_seqlens = torch.cat([begins, begins.new_tensor([batch * seq])])
    decay = leaves["log_decay"]
    packed = [leaves[name].reshape(1, batch * seq, *leaves[name].shape[2:]) for name in ("q", "k", "v")]
    out, _ = linear_attention_full(*packed, decay if decay.dim() == 1 else decay.reshape(1, batch * seq, -1),
                                   scale=0.5, cu_seqlens=cu_seqlens)
    out = out.view_as(inputs["grad"])
    out.backward(inputs["grad"])
    return out.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def sharded_linear_attention(cp: int, inputs: dict, documents: torch.Tensor | None):
    """This rank's output and input gradients (positions of the full sample first) under cp ranks."""
    parallel = ParallelState.create(cp=cp)
    seq = inputs["v"].shape[1]
    layout = SequenceLayout(seq, parallel.cp, documents)
    local = {name: (layout.shard(t) if t.dim() > 1 else t).clone().requires_grad_()
             for name, t in inputs.items() if name != "grad"}
    with record_communication() as recorder:
        out = context_linear_attention(local["q"], local["k"], local["v"], local["log_decay"], layout, scale=0.5)
        out.backward(layout.shard(inputs["grad"]))
    return layout.positions, out.detach(), {name: t.grad for name, t in local.items()}, recorder.bytes_sent


def assemble(parts: list[tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
    """Full-sample tensor from each rank's (positions, local tensor along dim 1)."""
    full = torch.zeros_like(like)
    for positions, local in parts:
        full[:, positions] = local
    return full


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("documents", [False, True], ids=["one-document", "documents"])
@pytest.mark.parametrize("per_token_decay", [False, True], ids=["lightning", "mamba2"])
def test_linear_attention_over_cp_ranks_equals_whole_samples(cp, documents, per_token_decay):
    seq = 64
    inputs = linear_inputs(seq, per_token_decay)
    docs = document_index(sample_tokens(seq), EOS) if documents else None
    expected, expected_grads = reference_linear_attention(inputs, docs)
    results = (run_distributed(sharded_linear_attention, cp, cp, inputs, docs) if cp > 1
               else [sharded_linear_attention(1, inputs, docs)])
    torch.testing.assert_close(assemble([(p, out) for p, out, _, _ in results], expected), expected, **TOLERANCE)
    for name, grad in expected_grads.items():
        if name == "log_decay" and not per_token_decay:  # one decay per head: each rank holds part of its gradient
            got = sum(grads[name] for _, _, grads, _ in results)
        else:
            got = assemble([(p, grads[name]) for p, _, grads, _ in results], grad)
        torch.testing.assert_close(got, grad, msg=name, **TOLERANCE)


def test_linear_attention_bytes_per_rank_do_not_grow_with_the_sequence():
    sent = []
    for seq in (64, 128):
        inputs = linear_inputs(seq, per_token_decay=True)
        docs = document_index(sample_tokens(seq), EOS)
        sent.append(run_distributed(sharded_linear_attention, 2, 2, inputs, docs)[0][3])
    assert sent[0] > 0 and sent[1] == sent[0]


def test_layout_chunks_and_positions():
    tokens = torch.tensor([[5, 6, EOS, 7, 8, 9, EOS, 4]])
    documents = document_index(tokens, EOS)
    assert documents.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    layout = SequenceLayout(8, documents=documents)
    assert layout.document_positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert layout.segment_starts().tolist() == [[True, False, False, True, False, False, False, True]]
    with pytest.raises(ConfigError, match="data.seq_len=6 must be a multiple of 2 × parallel.cp = 4"):
        check_sequence_split(6, 2)


# ---------------------------------------------------------------------------------------------
# Whole models

MODEL = ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=96",
         "model.vocab_size=256", "model.mamba.head_dim=16", "model.mamba.state_size=16", "model.mamba.num_groups=2",
         "model.moh.shared_heads=2", "model.moh.routed_top_k=1", "model.moe.num_experts=4",
         "model.moe.ffn_hidden_size=64", "model.moe.z_loss_coeff=0.001"]
HYBRID = "ML*HE-"
RTOL = 1e-5


def model_loss(cp: int, tp: int, pattern: str, packed: bool, seq: int = 64):
    """Per-token losses (with their sample positions), the micro-batch loss and the global gradients (summed
    over the cp ranks, as the optimizer's reduction does) of one forward and backward."""
    parallel = ParallelState.create(tp=tp, cp=cp)
    cfg = load_config(None, [*MODEL, f"model.pattern={pattern}"]).model
    model = HybridModel(cfg, seed=7, tp=parallel.tensor_parallel)
    micro = split_micro_batch(sample_tokens(seq + 1, seed=2), parallel.cp, EOS if packed else None)
    per_token = vocab_parallel_cross_entropy(model(micro.inputs, micro.sequence), micro.targets,
                                             parallel.tensor_parallel)
    share = (per_token * micro.weights).sum()
    share.backward()
    for param in model.parameters():
        all_reduce(param.grad, parallel.cp)
    return (micro.sequence.positions, per_token.detach(), all_reduce(share.detach(), parallel.cp).item(),
            full_gradients(model, parallel))


def assert_model_parity(results, reference):
    _, per_token, loss, grads = reference
    torch.testing.assert_close(assemble([(p, t) for p, t, _, _ in results], per_token), per_token,
                               rtol=RTOL, atol=1e-6)
    for _, _, parallel_loss, parallel_grads in results:
        assert parallel_loss == pytest.approx(loss, rel=RTOL)
        for name, grad in grads.items():
            torch.testing.assert_close(parallel_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("pattern", ["*", "H", "L", "M"])
@pytest.mark.parametrize("cp", [2, 4])
def test_each_mixer_under_cp_equals_one_process(pattern, cp):
    reference = model_loss(1, 1, pattern, packed=True)
    assert_model_parity(run_distributed(model_loss, cp, cp, 1, pattern, True), reference)


@pytest.mark.parametrize("cp, tp, packed", [(2, 1, False), (4, 1, False), (2, 1, True), (2, 2, True)],
                         ids=["cp2", "cp4", "cp2-packed", "cp2xtp2-packed"])
def test_hybrid_model_under_cp_equals_one_process(cp, tp, packed):
    reference = model_loss(1, 1, HYBRID, packed)
    assert_model_parity(run_distributed(model_loss, cp * tp, cp, tp, HYBRID, packed), reference)


def test_packed_documents_equal_running_each_document_alone():
    cfg = load_config(None, [*MODEL, f"model.pattern={HYBRID}"]).model
    model = HybridModel(cfg, seed=7)
    tokens = sample_tokens(64, seed=3)
    documents = document_index(tokens, EOS)
    packed = model(tokens, SequenceLayout(64, documents=documents))
    for row in range(tokens.shape[0]):
        for document in documents[row].unique():
            span = (documents[row] == document).nonzero().squeeze(1)
            alone = model(tokens[row : row + 1, span])
            torch.testing.assert_close(packed[row : row + 1, span], alone, rtol=1e-5, atol=1e-5)


def mixer_bytes(pattern: str, seq: int) -> float:
    """Bytes this rank sends in one forward and backward of a one-layer model under cp=2."""
    parallel = ParallelState.create(cp=2)
    cfg = load_config(None, [*MODEL, f"model.pattern={pattern}"]).model
    model = HybridModel(cfg, seed=7)
    micro = split_micro_batch(sample_tokens(seq + 1, seed=2), parallel.cp, EOS)
    hidden = model.embed(micro.inputs).detach().requires_grad_()
    layer = model.layers["0"]
    with record_communication() as recorder:
        layer(hidden, model.forward_context(micro.sequence, hidden.device)).sum().backward()
    return recorder.bytes_sent


@pytest.mark.parametrize("pattern", ["L", "M"])
def test_linear_mixer_bytes_do_not_grow_with_the_sequence(pattern):
    short, long = (run_distributed(mixer_bytes, 2, pattern, seq)[0] for seq in (64, 128))
    assert short > 0 and long == short


TRAIN = [*MODEL, "model.pattern=M-L*", "data.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=4",
         "train.warmup_steps=2", "train.lr=3e-3", "train.steps=4", "log.tensorboard=false"]


def train_run(cache, log_dir, overrides):
    config = load_config("configs/tiny-dense.yaml", [*TRAIN, "model.vocab_size=4096", f"data.cache_dir={cache}",
                                                     f"log.dir={log_dir}", *overrides])
    trainer = Trainer(config)
    return [trainer.train_step() for _ in range(config.train.steps)]


# MoE layers with auxiliary losses and the loss-free balancing bias, experts split over the 2 cp ranks
MOE = ["model.pattern=*E-E", "model.moe.num_experts=4", "model.moe.ffn_hidden_size=64",
       "model.moe.bias_update_rate=0.01", "parallel.ep=2"]


@pytest.mark.parametrize("world, overrides", [(2, ["parallel.cp=2"]), (4, ["parallel.cp=2", "parallel.tp=2"]),
                                              (4, ["parallel.cp=2", "parallel.pp=2"]),
                                              (4, ["parallel.cp=4", "parallel.cp_comm=all_gather"]),
                                              (2, ["parallel.cp=2", *MOE])],
                         ids=["cp2", "cp2xtp2", "cp2xpp2", "cp4-all-gather", "cp2-moe-ep2"])
def test_training_under_cp_equals_one_process(tmp_path, builtin_cache, world, overrides):
    reference = train_run(builtin_cache, tmp_path / "single", [o for o in overrides if o.startswith("model.")])
    for steps in run_distributed(train_run, world, builtin_cache, tmp_path / "cp", overrides):
        for (loss, norm), (expected_loss, expected_norm) in zip(steps, reference):
            assert loss == pytest.approx(expected_loss, rel=RTOL)
            assert norm == pytest.approx(expected_norm, rel=RTOL)


def resumed_run(cache, log_dir, overrides):
    config = load_config("configs/tiny-dense.yaml", [*TRAIN, "model.vocab_size=4096", f"data.cache_dir={cache}",
                                                     f"log.dir={log_dir}", "train.steps=4", "checkpoint.interval=2",
                                                     "checkpoint.keep=0", *overrides])
    return Trainer(config).run()


def test_cp_checkpoint_resumes_in_one_process(tmp_path, builtin_cache):
    reference = resumed_run(builtin_cache, tmp_path / "single", [])
    run_distributed(resumed_run, 2, builtin_cache, tmp_path / "cp2", ["parallel.cp=2"])
    losses = resumed_run(builtin_cache, tmp_path / "from-cp2", [f"train.resume={tmp_path / 'cp2/checkpoints/step_2'}"])
    assert losses == pytest.approx(reference[2:], rel=RTOL)


def test_bad_context_parallel_configs_are_refused():
    with pytest.raises(ConfigError, match=r"data.seq_len=100 must be a multiple of 2 × parallel.cp = 8"):
        load_config(None, ["parallel.cp=4", "data.seq_len=100"])
    with pytest.raises(ConfigError, match=r"parallel.cp_comm"):
        load_config(None, ["parallel.cp_comm=a2a"])
