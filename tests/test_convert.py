"""``megamix convert``: HF ⇄ megamix round trips and logit parity for Llama, Mixtral, Mamba-2 and Nemotron-H,
parallel layouts, resharding, continued training, inspection and bad input."""

import json
import math

import pytest
import torch
from conftest import BUILTIN_VOCAB
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megamix.checkpoint.inspect import describe_checkpoint
from megamix.checkpoint.store import read_config, read_meta, read_metadata
from megamix.cli import main
from megamix.config import load_config
from megamix.convert import ARCHITECTURE_NAMES
from megamix.convert.architectures import ARCHITECTURES
from megamix.convert.directions import (
    hf_to_megamix,
    megamix_to_hf,
    read_tensor,
    reshard,
    tensor_entries,
)
from megamix.convert.splice import SplicedTensors, SplicingStream, row_pieces
from megamix.convert.verify import compare, load_megamix_model
from megamix.errors import CheckpointError, ConfigError

transformers = pytest.importorskip("transformers")

ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
MAMBA = {"n_groups": 2, "conv_kernel": 4}
DT_FLOOR = 0.05  # a step floor that the random dt_bias below crosses, so the clamp matters
CONFIGS = {  # tiny random models, built offline from their configs
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=BUILTIN_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, **ATTENTION,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, initializer_range=0.2),
    "llama-tied": lambda: transformers.LlamaConfig(
        vocab_size=BUILTIN_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, **ATTENTION,
        tie_word_embeddings=True, initializer_range=0.2),
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=BUILTIN_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, **ATTENTION,
        num_local_experts=4, num_experts_per_tok=2, initializer_range=0.2),
    "mamba2": lambda: transformers.Mamba2Config(
        vocab_size=BUILTIN_VOCAB, hidden_size=64, num_heads=8, head_dim=16, state_size=16, num_hidden_layers=2,
        expand=2, **MAMBA, initializer_range=0.2, tie_word_embeddings=True, time_step_limit=(DT_FLOOR, float("inf"))),
    "nemotron_h": lambda: transformers.NemotronHConfig(
        vocab_size=BUILTIN_VOCAB, hidden_size=64, hybrid_override_pattern="M*-M-", **ATTENTION,
        intermediate_size=96, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, **MAMBA,
        initializer_range=0.2, time_step_min=DT_FLOOR),
    # Nemotron-H with MoE layers: 8 sigmoid-routed squared-ReLU experts in 4 groups (top-2 of the best 2 groups),
    # scaled combine weights and a shared expert of another width
    "nemotron_h_moe": lambda: transformers.NemotronHConfig(
        vocab_size=BUILTIN_VOCAB, hidden_size=64, hybrid_override_pattern="ME*E-", **ATTENTION,
        intermediate_size=96, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, **MAMBA,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, moe_shared_expert_intermediate_size=80,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, initializer_range=0.2, time_step_min=DT_FLOOR),
}
CLASSES = {"llama": "LlamaForCausalLM", "llama-tied": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
           "mamba2": "Mamba2ForCausalLM", "nemotron_h": "NemotronHForCausalLM",
           "nemotron_h_moe": "NemotronHForCausalLM"}
PATTERNS = {"llama": "*-*-", "llama-tied": "*-*-", "mixtral": "*E*E", "mamba2": "MM", "nemotron_h": "M*-M-",
            "nemotron_h_moe": "ME*E-"}


def save_tiny(kind, directory):
    """A random tiny HF model of ``kind`` saved to ``directory``; norms and the Mamba-2 per-head parameters are
    randomised too, so a misplaced one shows. dt_bias ∈ [−6, 1.5] puts Δ = softplus(dt + dt_bias) on both
    sides of the step floor (DT_FLOOR), which both models must apply alike; the MoE selection bias is random
    too, so that it moves some choices."""
    torch.manual_seed(0)
    model = getattr(transformers, CLASSES[kind])(CONFIGS[kind]())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".dt_bias"):
                param.uniform_(-6.0, 1.5)
            elif "norm" in name or name.endswith(".D"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".A_log"):
                param.uniform_(0.0, 1.5)
        for name, buffer in model.named_buffers():
            if name.endswith(".e_score_correction_bias"):
                buffer.uniform_(-0.1, 0.1)
    model.save_pretrained(directory)
    return model.eval()


def hf_tensors(directory):
    files = sorted(directory.glob("*.safetensors"))
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    return tensors


def test_cli_lists_every_registered_architecture():
    assert sorted(ARCHITECTURE_NAMES) == sorted(ARCHITECTURES)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_round_trip_is_bit_identical_and_logits_match(tmp_path, kind):
    hf = save_tiny(kind, tmp_path / "hf")
    step = hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt")
    assert step == tmp_path / "ckpt" / "step_0" and (tmp_path / "ckpt" / "latest").read_text().strip() == "step_0"
    assert read_config(step)["model"]["pattern"] == PATTERNS[kind]
    megamix_to_hf(tmp_path / "ckpt", tmp_path / "back")

    before, after = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    original, restored = (transformers.AutoConfig.from_pretrained(tmp_path / d).to_dict() for d in ("hf", "back"))
    ignored = {"_name_or_path", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
               "use_cache", "output_router_logits", "residual_in_fp32", "rescale_prenorm_residual", "time_step_rank",
               "time_step_floor", "chunk_size", "num_logits_to_keep", "mamba_ssm_cache_dtype", "use_mamba_kernels"}
    for field, value in original.items():
        if field not in ignored:
            assert restored.get(field) == value, field

    tokens = torch.randint(0, BUILTIN_VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = hf(tokens).logits, load_megamix_model(step)(tokens)
    assert expected.abs().mean() > 0.1, "logits too small for the tolerance to mean anything"
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)
    agreement = compare(tmp_path / "back", step)
    assert agreement.max_abs_diff < 1e-4 and agreement.kl < 1e-8


def test_sharded_bf16_export_and_sharded_import(tmp_path):
    save_tiny("mixtral", tmp_path / "hf")
    hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt")
    megamix_to_hf(tmp_path / "ckpt", tmp_path / "bf16", torch.bfloat16, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "bf16" / "model.safetensors").exists()
    tensors = hf_tensors(tmp_path / "bf16")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    loaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "bf16")
    assert loaded.config.num_local_experts == 4 and loaded.dtype == torch.bfloat16
    # the sharded directory imports, keeping bf16, and exports the same tensors again
    megamix_to_hf(hf_to_megamix(tmp_path / "bf16", tmp_path / "ckpt-bf16"), tmp_path / "again")
    again = hf_tensors(tmp_path / "again")
    assert sorted(again) == sorted(tensors) and all(torch.equal(again[n], t) for n, t in tensors.items())


def parallel_logits(checkpoints, layout):
    """Logits ``[2, 24, vocab]`` of each checkpoint's model built at ``layout`` (tp=2 or pp=2 on 2 ranks), every
    rank reading its own pieces of the checkpoint."""
    import torch.distributed as dist

    from megamix.checkpoint.store import read_config as read
    from megamix.config import config_from_dict
    from megamix.convert.directions import load_weights
    from megamix.models import HybridModel
    from megamix.parallel import ParallelState
    from megamix.parallel.pipeline import StageSpec

    results = []
    for checkpoint in checkpoints:
        cfg = config_from_dict(read(checkpoint)).model
        tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
        rank = dist.get_rank()
        if layout == "tp":
            parallel = ParallelState.create(tp=2)
            model = HybridModel(cfg, device="cpu", tp=parallel.tensor_parallel)
            load_weights(checkpoint, model)
            with torch.no_grad():
                shard = model.eval()(tokens)  # this rank's vocabulary half
            pieces = [torch.empty_like(shard) for _ in range(2)]
            dist.all_gather(pieces, shard.contiguous())
            results.append(torch.cat(pieces, dim=-1))
        else:
            layers = len(cfg.pattern)
            stage = StageSpec(rank, 2, tuple(range(layers // 2)) if rank == 0 else tuple(range(layers // 2, layers)))
            model = HybridModel(cfg, device="cpu", stage=stage).eval()
            load_weights(checkpoint, model)
            with torch.no_grad():
                if rank == 0:
                    dist.send(model(tokens), 1)
                    results.append(None)
                else:
                    hidden = torch.empty(2, 24, cfg.hidden_size)
                    dist.recv(hidden, 0)
                    results.append(model(hidden))
    return results


KINDS = ("llama", "mixtral", "mamba2", "nemotron_h", "nemotron_h_moe")


def test_imported_checkpoints_give_the_same_logits_at_tp2_and_pp2(tmp_path):
    from megamix.testing import run_distributed

    checkpoints, expected = [], []
    tokens = torch.randint(0, BUILTIN_VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    for kind in KINDS:
        hf = save_tiny(kind, tmp_path / kind)
        # the target layout goes into the checkpoint's config; the tensors are whole in any case
        checkpoints.append(hf_to_megamix(tmp_path / kind, tmp_path / f"{kind}-ckpt", ["parallel.tp=2"]))
        assert read_config(checkpoints[-1])["parallel"]["tp"] == 2
        with torch.no_grad():
            expected.append(hf(tokens).logits)
    for layout in ("tp", "pp"):
        ranks = run_distributed(parallel_logits, 2, checkpoints, layout)
        logits = ranks[0] if layout == "tp" else ranks[1]
        if layout == "tp":
            for other, mine in zip(ranks[1], logits):
                assert torch.equal(other, mine)
        for kind, actual, reference in zip(KINDS, logits, expected):
            torch.testing.assert_close(actual, reference, rtol=0, atol=1e-4, msg=f"{kind} at {layout}=2")


@pytest.mark.parametrize("kind", ["llama", "nemotron_h_moe"])
def test_converted_checkpoint_continues_training(tmp_path, builtin_cache, kind):
    from megamix.train import Trainer

    hf = save_tiny(kind, tmp_path / "hf")
    step = hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt")
    config = load_config(step / "config.yaml", [
        f"train.resume={step}", f"data.cache_dir={builtin_cache}", "data.seq_len=32", "train.steps=2",
        "train.micro_batch_size=2", "train.global_batch_size=2", "train.device=cpu", f"log.dir={tmp_path / 'run'}",
        "log.tensorboard=false", "log.progress=never",
    ])
    trainer = Trainer(config)
    assert trainer.step == 0
    parameters = dict(trainer.named_parameters())
    embedding = hf.get_input_embeddings().weight
    assert torch.equal(parameters["embed.weight"], embedding)  # resumed, not initialised
    losses = trainer.run()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def train_steps(checkpoint, cache, log_dir, steps, *overrides):
    """Resume ``checkpoint`` with its own config.yaml and train to ``steps``; every rank returns the losses."""
    from megamix.train import Trainer

    config = load_config(f"{checkpoint}/config.yaml", [
        f"train.resume={checkpoint}", f"data.cache_dir={cache}", f"train.steps={steps}", "train.device=cpu",
        f"log.dir={log_dir}", f"checkpoint.dir={log_dir}/checkpoints", "log.tensorboard=false",
        "log.progress=never", *overrides])
    return Trainer(config).run()


def test_weights_only_import_exports_and_becomes_trainable_by_model_only_reshard(tmp_path, builtin_cache, capsys):
    save_tiny("mamba2", tmp_path / "hf")
    assert main(["convert", "hf-to-megamix", str(tmp_path / "hf"), str(tmp_path / "weights"), "--weights-only"]) == 0
    weights = tmp_path / "weights" / "step_0"
    assert not any(key.startswith("optim.") for key in tensor_entries(weights))
    assert "optimizer   none" in describe_checkpoint(weights)
    megamix_to_hf(weights, tmp_path / "back")
    before, after = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert sorted(before) == sorted(after) and all(torch.equal(after[n], t) for n, t in before.items())

    assert main(["convert", "reshard", str(weights), str(tmp_path / "ckpt"), "--model-only"]) == 0
    losses = train_steps(tmp_path / "ckpt" / "step_0", builtin_cache, tmp_path / "run", 1, "data.seq_len=32",
                         "train.micro_batch_size=2", "train.global_batch_size=2")
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses)).all()
    assert main(["convert", "reshard", str(weights), str(tmp_path / "x"), "--weights-only"]) == 2
    assert "--weights-only is for hf-to-megamix" in capsys.readouterr().err


def test_reshard_carries_everything_and_resumes_at_the_new_layout(tmp_path, builtin_cache):
    from megamix.testing import run_distributed
    from megamix.train import Trainer

    config = load_config(None, [
        "model.pattern=M*-E", "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=96", f"model.vocab_size={BUILTIN_VOCAB}", "model.mamba.head_dim=16",
        "model.mamba.state_size=16", "model.mamba.num_groups=2", "model.moe.num_experts=4",
        "model.moe.ffn_hidden_size=64", "model.moe.bias_update_rate=0.01", f"data.cache_dir={builtin_cache}",
        "data.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=2",
        "train.device=cpu", f"log.dir={tmp_path / 'run'}", "log.tensorboard=false", "log.progress=never"])
    Trainer(config).run()
    source = config.checkpoint_dir / "step_2"
    target = reshard(source, tmp_path / "tp2", ["parallel.tp=2", "model.pattern=M*|-E"])
    assert target.name == "step_2" and read_meta(target)["step"] == 2
    assert read_config(target)["parallel"]["tp"] == 2 and read_config(target)["model"]["pattern"] == "M*|-E"
    entries = tensor_entries(source)
    assert set(tensor_entries(target)) == set(entries) and any(k.startswith("optim.") for k in entries)
    for key, entry in entries.items():
        assert torch.equal(read_tensor(target, key, entry), read_tensor(source, key, entry)), key
    assert read_tensor(target, "model.layers.3.mixer.expert_bias", entries["model.layers.3.mixer.expert_bias"]).any()

    # two more steps: at tp=2 from the resharded copy, and in one process from the original, agree
    reference = train_steps(source, builtin_cache, tmp_path / "one", 4)
    for losses in run_distributed(train_steps, 2, target, builtin_cache, tmp_path / "two", 4):
        assert losses == pytest.approx(reference, rel=1e-5)

    fresh = reshard(source, tmp_path / "weights", ["parallel.pp=2"], model_only=True)
    assert fresh.name == "step_0" and read_meta(fresh)["tokens"] == 0
    moments = read_tensor(fresh, "optim.embed.weight.exp_avg", tensor_entries(fresh)["optim.embed.weight.exp_avg"])
    assert not moments.any()
    assert torch.equal(read_tensor(fresh, "model.embed.weight", entries["model.embed.weight"]),
                       read_tensor(source, "model.embed.weight", entries["model.embed.weight"]))
    with pytest.raises(ConfigError, match=r"keeps the model.*model\.hidden_size"):
        reshard(source, tmp_path / "bad", ["model.hidden_size=128"])
    with pytest.raises(ConfigError, match=r"model\.mamba\.num_groups \(2\) must be divisible by parallel\.tp \(3\)"):
        reshard(source, tmp_path / "bad", ["parallel.tp=3"])
    # its MoE selection bias was learned: Mixtral has no place for it; the hybrid pattern has no HF equivalent
    with pytest.raises(ConfigError, match=r"no Hugging Face equivalent.*MixtralForCausalLM: only pure '\*E'"):
        megamix_to_hf(source, tmp_path / "hf")


def train_from_scratch(overrides):
    from megamix.train import Trainer

    Trainer(load_config(None, overrides)).run()


def test_export_of_a_tensor_parallel_training_checkpoint(tmp_path, builtin_cache):
    """A tp=2 run's checkpoint holds each tensor in pieces (vocabulary rows, q/k/v row blocks, down_proj column
    blocks, views of larger storages): rows kept whole are copied file to file, the rest read; every exported
    tensor equals the global tensor DCP reassembles, and the file holds the moments as holes."""
    from megamix.testing import run_distributed

    overrides = [
        "model.pattern=*-*-", "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=96", f"model.vocab_size={BUILTIN_VOCAB}", "parallel.tp=2",
        f"data.cache_dir={builtin_cache}", "data.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=2",
        "train.steps=1", "train.device=cpu", f"log.dir={tmp_path / 'run'}", "log.tensorboard=false",
        "log.progress=never"]
    run_distributed(train_from_scratch, 2, overrides)
    source = tmp_path / "run" / "checkpoints" / "step_1"
    metadata = read_metadata(source)
    assert row_pieces(source, metadata, "model.embed.weight") is not None  # vocabulary halves: rows
    assert row_pieces(source, metadata, "model.layers.1.mixer.down_proj.weight") is None  # column halves
    megamix_to_hf(source, tmp_path / "hf")
    exported, entries = hf_tensors(tmp_path / "hf"), tensor_entries(source)
    m = load_config(None, overrides).model
    for link in ARCHITECTURES["LlamaForCausalLM"].links(m):
        whole, start = read_tensor(source, f"model.{link.name}", entries[f"model.{link.name}"]), 0
        for name, shape in link.parts:
            assert torch.equal(exported[name], whole[start:start + shape[0]]), name
            start += shape[0]


def test_imported_moments_are_holes_that_read_as_zeros(tmp_path):
    save_tiny("llama", tmp_path / "hf")
    step = hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt")
    entries = tensor_entries(step)
    moments = [key for key in entries if key.startswith("optim.") and key.endswith(("exp_avg", "exp_avg_sq"))]
    assert moments and all(not read_tensor(step, key, entries[key]).any() for key in moments)
    data = next(step.glob("*.distcp")).stat()
    moment_bytes = sum(4 * math.prod(entries[key].size) for key in moments)
    assert data.st_blocks * 512 < data.st_size - moment_bytes // 2  # the moments take (almost) no disk space


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "fallback"])
def test_splicing_stream_writes_file_ranges_and_holes(tmp_path, monkeypatch, kernel_copy):
    import errno
    import os

    if not kernel_copy:  # as across file systems that refuse copy_file_range
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    source = tmp_path / "source"
    source.write_bytes(bytes(range(256)) * 4)
    spliced = SplicedTensors()
    tensor = spliced.placeholder((3, 4), torch.uint8, [(source, 10, 5), (None, 0, 4), (source, 300, 3)])
    zeros = spliced.zeros((8,), torch.uint8)
    with SplicingStream(open(tmp_path / "out", "wb"), spliced) as stream:  # the stream closes the file
        stream.write(b"head")
        stream.write(tensor.numpy().data)
        stream.write(torch.arange(3, dtype=torch.uint8).numpy().data)  # not a placeholder: written as is
        stream.write(zeros.numpy().data)  # a trailing hole still counts in the file's size
    spliced.check_written()
    expected = b"head" + bytes(range(10, 15)) + bytes(4) + bytes(range(44, 47)) + bytes([0, 1, 2]) + bytes(8)
    assert (tmp_path / "out").read_bytes() == expected


def test_learned_selection_bias_cannot_be_exported_to_mixtral(tmp_path):
    from megamix.checkpoint.store import save_checkpoint

    save_tiny("mixtral", tmp_path / "hf")
    step = hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt")
    entries = tensor_entries(step)
    state = {key: read_tensor(step, key, entry) for key, entry in entries.items()}
    state["model.layers.1.mixer.expert_bias"][0] = 0.5
    save_checkpoint(tmp_path / "biased", 0, state | {"train.step": 0, "data.consumed": 0}, read_config(step), {})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mixer\.expert_bias is not zero"):
        megamix_to_hf(tmp_path / "biased", tmp_path / "out")


def test_cli_converts_both_ways_verifies_and_inspects(tmp_path, capsys):
    save_tiny("mixtral", tmp_path / "hf")
    assert main(["convert", "hf-to-megamix", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "parallel.ep=2",
                 "--verify"]) == 0
    assert main(["convert", "megamix-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "back"), "--dtype", "fp32",
                 "--verify"]) == 0
    assert main(["convert", "reshard", str(tmp_path / "ckpt"), str(tmp_path / "pp2"), "parallel.pp=2"]) == 0
    assert main(["inspect", str(tmp_path / "pp2"), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert out.count("verify: max |Δlogit|") == 2 and "pattern     '*E*E'" in out
    assert "model       MixtralForCausalLM (converted from" in out and "pp=2" in out
    # embed + head 2·4096·64, per block attention 4·64·64 (q, o) + 2·2·16·64 (k, v) + norms 2·64, router 4·64,
    # 4 experts of 3·64·96 of which 2 run per token, final norm 64
    per_block_dense = 64 * 64 * 2 + 2 * 16 * 64 * 2 + 2 * 64 + 4 * 64
    total = 2 * 4096 * 64 + 2 * (per_block_dense + 4 * 3 * 64 * 96) + 64
    active = 2 * 4096 * 64 + 2 * (per_block_dense + 2 * 3 * 64 * 96) + 64
    assert f"parameters  {total:,} in 31 tensors (float32); {active:,} active per token (top 2 of 4 experts)" in out
    assert "layers.1.mixer.experts.3.gate_up_proj.weight" in out


@pytest.mark.parametrize("kind, change, error", [
    ("llama", {"architectures": ["GPT2LMHeadModel"]},
     r"GPT2LMHeadModel.*supported: \['LlamaForCausalLM', 'Mamba2ForCausalLM', 'MixtralForCausalLM', 'Nemo"),
    ("llama", {"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported; megamix needs hidden_act='silu'"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, r"rope_type 'yarn' is not supported"),
    ("mixtral", {"sliding_window": 4096}, r"sliding_window=4096 is not supported"),
    ("mamba2", {"time_step_limit": [0.01, 10.0]}, r"time_step_limit=\[0\.01, 10\.0\] is not supported"),
    ("mamba2", {"use_conv_bias": False}, r"use_conv_bias=False is not supported"),
    ("nemotron_h_moe", {"moe_latent_size": 32}, r"moe_latent_size=32 is not supported; megamix needs moe_latent_size=None"),
    ("nemotron_h_moe", {"n_group": 3}, (r"config.json: megamix cannot build the model it describes: "
                                        r"model.moe.num_groups \(3\) must be positive and divide num_experts \(8\)")),
    ("nemotron_h", {"mlp_hidden_act": "silu"}, r"mlp_hidden_act='silu' is not supported"),
    ("nemotron_h", {"hybrid_override_pattern": "M*"}, r"hybrid_override_pattern 'M\*' disagrees"),
], ids=["architecture", "llama-act", "llama-rope", "mixtral-window", "mamba2-dt-limit", "mamba2-conv-bias",
        "nemotron-latent", "nemotron-groups", "nemotron-act", "nemotron-pattern"])
def test_unsupported_config_fields_are_named(tmp_path, capsys, kind, change, error):
    save_tiny(kind, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(ConfigError, match=error):
        hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt")
    assert main(["convert", "hf-to-megamix", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "ckpt").exists()


def test_leftover_and_misshapen_tensors_are_errors(tmp_path):
    save_tiny("nemotron_h", tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    save_file(tensors | {"backbone.layers.1.mixer.q_proj.bias": torch.zeros(64)}, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 tensors do not belong.*q_proj\.bias"):
        hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt")
    tensors["backbone.layers.0.mixer.in_proj.weight"] = torch.zeros(100, 64)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.0\.mixer\.in_proj\.weight: shape \[100, 64\], "
                                              r"but config\.json implies \[328, 64\]"):
        hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt")
    del tensors["backbone.layers.0.mixer.in_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"has no tensor backbone\.layers\.0\.mixer\.in_proj\.weight"):
        hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_megamix_only_models_are_refused_with_every_reason(tmp_path):
    from megamix.checkpoint.store import save_checkpoint
    from megamix.config import Config, ModelConfig
    from megamix.models import HybridModel

    model = ModelConfig(pattern="*--", hidden_size=32, num_heads=2, vocab_size=64)
    state = {f"model.{n}": p.detach() for n, p in HybridModel(model).named_parameters()}
    save_checkpoint(tmp_path / "ckpt", 0, state, Config(model=model).to_dict(), {})
    with pytest.raises(ConfigError, match=r"'\*--' has no Hugging Face equivalent: LlamaForCausalLM: only pure "
                                          r"'\*-' repeats.*NemotronHForCausalLM: Nemotron-H attention has no position"):
        megamix_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"MixtralForCausalLM: only pure '\*E' repeats"):
        megamix_to_hf(tmp_path / "ckpt", tmp_path / "hf", architecture="MixtralForCausalLM")
    assert "model       megamix; no Hugging Face equivalent" in describe_checkpoint(tmp_path / "ckpt")
