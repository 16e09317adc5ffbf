"""``megamix convert``: HF Llama → megamix → HF round trip, logit parity, resuming training, bad input."""

import json

import pytest
import torch
from conftest import BUILTIN_VOCAB
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megamix.cli import main
from megamix.config import load_config
from megamix.convert.directions import hf_to_megamix, megamix_to_hf
from megamix.convert.verify import compare, load_megamix_model
from megamix.errors import CheckpointError, ConfigError

transformers = pytest.importorskip("transformers")


def save_tiny_llama(directory, tie: bool = False):
    """A random GQA LlamaForCausalLM (norm weights randomised too, so a misplaced one shows) saved to ``directory``."""
    config = transformers.LlamaConfig(
        vocab_size=BUILTIN_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, tie_word_embeddings=tie,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory, safe_serialization=True)
    return model.eval()


def tensors_of(directory):
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_is_bit_identical(tmp_path, tie):
    save_tiny_llama(tmp_path / "hf", tie)
    step = hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt")
    assert step == tmp_path / "ckpt" / "step_0" and (tmp_path / "ckpt" / "latest").read_text().strip() == "step_0"
    megamix_to_hf(tmp_path / "ckpt", tmp_path / "back")

    before, after = tensors_of(tmp_path / "hf"), tensors_of(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    original = transformers.LlamaConfig.from_pretrained(tmp_path / "hf")
    restored = transformers.LlamaConfig.from_pretrained(tmp_path / "back")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
                  "hidden_act", "architectures"):
        assert getattr(restored, field) == getattr(original, field), field


def test_megamix_logits_match_transformers(tmp_path):
    hf = save_tiny_llama(tmp_path / "hf")
    step = hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt")
    tokens = torch.randint(0, BUILTIN_VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = hf(tokens).logits, load_megamix_model(step)(tokens)
    assert expected.abs().mean() > 0.1, "logits too small for the tolerance to mean anything"
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)
    agreement = compare(tmp_path / "hf", step)
    assert agreement.max_abs_diff < 1e-4 and agreement.kl < 1e-8


def test_bf16_export_loads_in_transformers(tmp_path):
    save_tiny_llama(tmp_path / "hf")
    hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt")
    megamix_to_hf(tmp_path / "ckpt", tmp_path / "bf16", torch.bfloat16)
    assert {t.dtype for t in tensors_of(tmp_path / "bf16").values()} == {torch.bfloat16}
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16")
    assert loaded.config.num_key_value_heads == 2


def test_converted_checkpoint_continues_training(tmp_path, builtin_cache):
    from megamix.train import Trainer

    hf = save_tiny_llama(tmp_path / "hf")
    step = hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt")
    config = load_config(step / "config.yaml", [
        f"train.resume={step}", f"data.cache_dir={builtin_cache}", "data.seq_len=32", "train.steps=2",
        "train.micro_batch_size=2", "train.global_batch_size=2", "train.device=cpu", f"log.dir={tmp_path / 'run'}",
        "log.tensorboard=false", "log.progress=never",
    ])
    trainer = Trainer(config)
    assert trainer.step == 0
    parameters = dict(trainer.named_parameters())
    assert torch.equal(parameters["embed.weight"], hf.model.embed_tokens.weight)  # resumed, not initialised
    losses = trainer.run()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_cli_converts_both_ways_and_verifies(tmp_path, capsys):
    save_tiny_llama(tmp_path / "hf")
    assert main(["convert", "hf-to-megamix", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--verify"]) == 0
    assert main(["convert", "megamix-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "back"), "--dtype", "fp32"]) == 0
    assert main(["inspect", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "verify: max |Δlogit|" in out and "pattern     '*-*-'" in out


def test_unsupported_architecture_is_named(tmp_path, capsys):
    save_tiny_llama(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"architectures": ["MixtralForCausalLM"]}))
    with pytest.raises(ConfigError, match=r"MixtralForCausalLM.*supported: \['LlamaForCausalLM'\]"):
        hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt")
    assert main(["convert", "hf-to-megamix", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "ckpt").exists()


def test_leftover_and_misshapen_tensors_are_errors(tmp_path):
    save_tiny_llama(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    save_file(tensors | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 tensors do not belong.*q_proj\.bias"):
        hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: shape \[96, 64\]"):
        hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt")


def test_sharded_checkpoint_converts(tmp_path):
    save_tiny_llama(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard in shards.items():
        save_file({n: tensors[n] for n in shard}, tmp_path / "hf" / file, metadata={"format": "pt"})
    index = {"weight_map": {n: file for file, shard in shards.items() for n in shard}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    megamix_to_hf(hf_to_megamix(tmp_path / "hf", tmp_path / "ckpt"), tmp_path / "back")
    after = tensors_of(tmp_path / "back")
    assert all(torch.equal(after[n], t) for n, t in tensors.items()) and len(after) == len(tensors)


def test_non_llama_pattern_cannot_be_exported(tmp_path):
    from megamix.checkpoint.store import save_checkpoint
    from megamix.config import Config, ModelConfig
    from megamix.models import HybridModel

    model = ModelConfig(pattern="*--", hidden_size=32, num_heads=2, vocab_size=64)
    state = {f"model.{n}": p.detach() for n, p in HybridModel(model).named_parameters()}
    save_checkpoint(tmp_path / "ckpt", 0, state, Config(model=model).to_dict(), {})
    with pytest.raises(ConfigError, match=r"'\*--' is not a Llama model"):
        megamix_to_hf(tmp_path / "ckpt", tmp_path / "hf")
