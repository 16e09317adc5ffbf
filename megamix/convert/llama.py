"""HF Llama ↔ megamix: config fields and tensor names.

A Llama block ``i`` is two megamix layers (pattern ``*-``): layer ``2i`` is the
attention (``input_layernorm`` + q/k/v/o) and ``2i+1`` the MLP
(``post_attention_layernorm`` + gate/up/down). megamix fuses q, k, v into one
``qkv_proj`` (rows ``[q heads | k heads | v heads]``) and gate, up into one
``gate_up_proj`` (rows ``[gate | up]``). HF's rotary is the rotate-half form
megamix uses too, so q and k rows need no permutation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megamix.config import ModelConfig
from megamix.errors import CheckpointError, ConfigError

ARCHITECTURE = "LlamaForCausalLM"
# Non-persistent rotary buffers that old checkpoints stored; megamix recomputes them.
DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)


def _rope_theta(hf: dict[str, Any], source: str) -> float:
    """transformers ≥ 5 nests rope settings in ``rope_parameters``; older configs use ``rope_theta``/``rope_scaling``."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"{source}: rope_type {kind!r} is not supported; supported: 'default'")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    """The ModelConfig of an HF ``config.json`` dict (``source`` names the file in errors)."""
    architectures = hf.get("architectures") or []
    if architectures != [ARCHITECTURE]:
        raise ConfigError(f"{source}: architectures {architectures} are not supported; supported: ['{ARCHITECTURE}']")
    unsupported = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    for key, wanted in unsupported.items():
        if hf.get(key, wanted) != wanted:
            raise ConfigError(f"{source}: {key}={hf[key]!r} is not supported; megamix Llama layers need {wanted!r}")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        pattern="*-" * hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        ffn_hidden_size=hf["intermediate_size"],
        norm_eps=hf["rms_norm_eps"],
        rope_theta=_rope_theta(hf, source),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", ModelConfig.init_std),
    )


def check_llama_pattern(m: ModelConfig) -> None:
    """Only attention/MLP pairs with rotary embeddings and SwiGLU map onto Llama blocks; ``|`` (a pipeline
    boundary) does not matter."""
    pattern = m.pattern.replace("|", "")
    if pattern != "*-" * (len(pattern) // 2):
        raise ConfigError(f"model.pattern {m.pattern!r} is not a Llama model; only pure '*-' repeats convert to "
                          f"{ARCHITECTURE}")
    if not m.rotary or m.mlp != "swiglu":
        raise ConfigError(f"model.rotary={m.rotary}, model.mlp={m.mlp}: {ARCHITECTURE} needs rotary embeddings "
                          f"and SwiGLU MLPs")


def hf_config_from_model(m: ModelConfig, dtype: torch.dtype, max_positions: int) -> dict[str, Any]:
    """LlamaConfig fields for ``m``."""
    check_llama_pattern(m)
    pattern = m.pattern.replace("|", "")
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": len(pattern) // 2,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": m.norm_eps,
        # both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "rope_theta": m.rope_theta,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": m.init_std,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _block_names(block: int) -> dict[str, list[str]]:
    """megamix name → the HF names concatenated (along rows) into it, for one Llama block."""
    hf, attention, mlp = f"model.layers.{block}", f"layers.{2 * block}", f"layers.{2 * block + 1}"
    return {
        f"{attention}.norm.weight": [f"{hf}.input_layernorm.weight"],
        f"{attention}.mixer.qkv_proj.weight": [f"{hf}.self_attn.{p}_proj.weight" for p in "qkv"],
        f"{attention}.mixer.out_proj.weight": [f"{hf}.self_attn.o_proj.weight"],
        f"{mlp}.norm.weight": [f"{hf}.post_attention_layernorm.weight"],
        f"{mlp}.mixer.gate_up_proj.weight": [f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"],
        f"{mlp}.mixer.down_proj.weight": [f"{hf}.mlp.down_proj.weight"],
    }


def name_map(m: ModelConfig) -> dict[str, list[str]]:
    """Every megamix parameter name of a Llama-shaped ``m`` → its HF tensor names, in row order."""
    names = {"embed.weight": ["model.embed_tokens.weight"]}
    for block in range(m.num_layers // 2):
        names |= _block_names(block)
    names["norm.weight"] = ["model.norm.weight"]
    if not m.tie_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    return names


def expected_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name → shape for ``m``, so a wrong-sized tensor is named before anything is written."""
    q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    per_kind = {"input_layernorm": (m.hidden_size,), "post_attention_layernorm": (m.hidden_size,),
                "q_proj": (q, m.hidden_size), "k_proj": (kv, m.hidden_size), "v_proj": (kv, m.hidden_size),
                "o_proj": (m.hidden_size, q), "gate_proj": (m.ffn_hidden_size, m.hidden_size),
                "up_proj": (m.ffn_hidden_size, m.hidden_size), "down_proj": (m.hidden_size, m.ffn_hidden_size)}
    shapes = {"model.embed_tokens.weight": (m.vocab_size, m.hidden_size), "model.norm.weight": (m.hidden_size,),
              "lm_head.weight": (m.vocab_size, m.hidden_size)}
    layer_names = [n for hf_names in name_map(m).values() for n in hf_names if n.startswith("model.layers.")]
    return shapes | {name: per_kind[name.split(".")[-2]] for name in layer_names}


def megamix_from_hf(m: ModelConfig, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """megamix parameters built from HF tensors fetched one by one with ``get(hf_name)``."""
    shapes = expected_shapes(m)
    state = {}
    for name, hf_names in name_map(m).items():
        parts = []
        for hf_name in hf_names:
            tensor = get(hf_name)
            if tuple(tensor.shape) != shapes[hf_name]:
                raise CheckpointError(f"tensor {hf_name}: shape {list(tensor.shape)}, but config.json implies "
                                      f"{list(shapes[hf_name])}")
            parts.append(tensor)
        state[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return state


def hf_from_megamix(m: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Llama tensors split out of megamix parameters (the inverse of :func:`megamix_from_hf`)."""
    shapes = expected_shapes(m)
    tensors = {}
    for name, hf_names in name_map(m).items():
        if name not in state:
            raise CheckpointError(f"checkpoint has no tensor model.{name}")
        rows = [shapes[n][0] for n in hf_names]
        if state[name].shape[0] != sum(rows):
            raise CheckpointError(f"tensor model.{name}: {state[name].shape[0]} rows, but the config implies "
                                  f"{sum(rows)}")
        pieces = torch.split(state[name], rows) if len(hf_names) > 1 else [state[name]]
        # clone: a split is a view, and safetensors refuses tensors sharing storage
        tensors |= {n: p.clone() if len(hf_names) > 1 else p for n, p in zip(hf_names, pieces)}
    return tensors
