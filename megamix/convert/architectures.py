"""The HF architectures ``megamix convert`` knows: config fields and tensor names, one registry entry each.

Each :class:`Architecture` says how an HF ``config.json`` becomes a :class:`ModelConfig` (refusing,
with the field named, what megamix cannot represent), how a ModelConfig becomes that ``config.json``,
whether a megamix model fits it, and which HF tensors make up each megamix tensor (:mod:`links`).
Defaults for fields a ``config.json`` leaves out are those of transformers 5.23. Fields that only
steer training or initialisation in transformers (dropouts, router jitter, ``residual_in_fp32``,
``rescale_prenorm_residual``, ``chunk_size``, token ids) are not carried.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megamix.config import MambaConfig, ModelConfig, MoEConfig
from megamix.convert import links
from megamix.convert.links import Link
from megamix.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class Architecture:
    """One HF ``architectures`` entry and its correspondence with megamix.

    ``layer_links(m, i, kind)``: the links of megamix layer ``i`` (pattern character ``kind``), its norm
    included. ``unfit(m)``: why ``m`` cannot be written as this architecture, or None if it can.
    """

    name: str
    embed: str  # HF name of the token embedding; the LM head is ``lm_head.weight``
    final_norm: str
    model_config: Callable[[dict[str, Any], str], ModelConfig]
    hf_config: Callable[[ModelConfig], dict[str, Any]]
    unfit: Callable[[ModelConfig], str | None]
    layer_links: Callable[[ModelConfig, int, str], list[Link]]
    derived: tuple[str, ...] = ()  # suffixes of HF tensors transformers recomputes (old rotary buffers)

    def links(self, m: ModelConfig) -> list[Link]:
        """Every megamix tensor of ``m`` (parameters and saved buffers) with its HF tensors, in model order."""
        h, v = m.hidden_size, m.vocab_size
        result = [Link.stack("embed.weight", (self.embed, (v, h)))]
        for i, kind in enumerate(m.pattern.replace("|", "")):
            result += self.layer_links(m, i, kind)
        result.append(Link.stack("norm.weight", (self.final_norm, (h,))))
        if not m.tie_embeddings:
            result.append(Link.stack("lm_head.weight", ("lm_head.weight", (v, h))))
        return result


def _get(hf: dict[str, Any], key: str, default: Any = None) -> Any:
    value = hf.get(key)
    return default if value is None else value


def _expect(hf: dict[str, Any], source: str, wanted: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse a field whose value megamix cannot represent; ``wanted`` lists the one value it can."""
    for key, value in wanted.items():
        actual = hf.get(key, defaults.get(key, value))
        if actual != value:
            raise ConfigError(f"{source}: {key}={actual!r} is not supported; megamix needs {key}={value!r}")


def _float(value: Any) -> float:
    """A JSON number, or transformers' ``{"__float__": "Infinity"}`` / ``"Infinity"`` spelling of ±inf."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def _rope_theta(hf: dict[str, Any], source: str, default: float) -> float:
    """transformers ≥ 5 nests rope settings in ``rope_parameters``; older configs use ``rope_theta``/``rope_scaling``."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"{source}: rope_type {kind!r} is not supported; supported: 'default'")
    return float(rope.get("rope_theta", hf.get("rope_theta", default)))


def _heads(hf: dict[str, Any], default_head_dim: int | None = None) -> dict[str, int]:
    heads = hf["num_attention_heads"]
    return {"num_heads": heads, "num_kv_heads": _get(hf, "num_key_value_heads", heads),
            "head_dim": _get(hf, "head_dim", default_head_dim or hf["hidden_size"] // heads)}


def _rotary_fields(m: ModelConfig) -> dict[str, Any]:
    # both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta
    return {"rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}, "rope_theta": m.rope_theta}


def _attention_fields(m: ModelConfig) -> dict[str, Any]:
    return {"num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
            "attention_bias": False}


def _repeats(m: ModelConfig, unit: str) -> bool:
    pattern = m.pattern.replace("|", "")
    return len(pattern) % len(unit) == 0 and pattern == unit * (len(pattern) // len(unit))


# -- Llama and Mixtral: a decoder block is two megamix layers, attention then MLP or MoE -------------

_LLAMA_DEFAULTS = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
                   "rms_norm_eps": 1e-6, "rope_theta": 10000.0}


def _block_model(hf: dict[str, Any], source: str, unit: str, defaults: dict[str, Any], **extra: Any) -> ModelConfig:
    return ModelConfig(
        pattern=unit * hf["num_hidden_layers"], vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        **_heads(hf), norm_eps=_get(hf, "rms_norm_eps", defaults["rms_norm_eps"]),
        rope_theta=_rope_theta(hf, source, defaults["rope_theta"]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=_get(hf, "initializer_range", ModelConfig.init_std), **extra)


def _llama_config(hf: dict[str, Any], source: str) -> ModelConfig:
    _expect(hf, source, {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
            _LLAMA_DEFAULTS)
    return _block_model(hf, source, "*-", _LLAMA_DEFAULTS, ffn_hidden_size=hf["intermediate_size"])


def _llama_hf_config(m: ModelConfig) -> dict[str, Any]:
    return {"model_type": "llama", "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers // 2,
            **_attention_fields(m), "hidden_act": "silu", "rms_norm_eps": m.norm_eps, **_rotary_fields(m),
            "mlp_bias": False}


def _llama_unfit(m: ModelConfig) -> str | None:
    if not _repeats(m, "*-"):
        return "only pure '*-' repeats (attention, MLP) are Llama blocks"
    if not m.rotary or m.mlp != "swiglu":
        return f"Llama needs rotary attention and SwiGLU MLPs (model.rotary={m.rotary}, model.mlp={m.mlp})"
    return None


def _block_layer(second: Callable[[ModelConfig, str, str], list[Link]]):
    """Layer links of Llama-style blocks: layer 2i is block i's attention, 2i+1 its ``second`` mixer."""
    def layer_links(m: ModelConfig, i: int, kind: str) -> list[Link]:
        hf, mx = f"model.layers.{i // 2}", f"layers.{i}"
        if i % 2 == 0:
            return [Link.stack(f"{mx}.norm.weight", (f"{hf}.input_layernorm.weight", (m.hidden_size,))),
                    *links.attention(m, mx, f"{hf}.self_attn")]
        return [Link.stack(f"{mx}.norm.weight", (f"{hf}.post_attention_layernorm.weight", (m.hidden_size,))),
                *second(m, mx, hf)]
    return layer_links


def _swiglu(m: ModelConfig, mx: str, hf: str) -> list[Link]:
    return links.gated_mlp(f"{mx}.mixer", f"{hf}.mlp", m.hidden_size, m.ffn_hidden_size, "gate_proj", "up_proj",
                           "down_proj")


_MIXTRAL_DEFAULTS = {**_LLAMA_DEFAULTS, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001, "sliding_window": None}


def _mixtral_config(hf: dict[str, Any], source: str) -> ModelConfig:
    _expect(hf, source, {"hidden_act": "silu", "sliding_window": None}, _MIXTRAL_DEFAULTS)
    top_k = _get(hf, "num_experts_per_tok", 2)
    # Mixtral's balancing loss is E·Σ f_i P_i with Σ f_i = k; megamix's Switch loss divides by k
    moe = MoEConfig(num_experts=_get(hf, "num_local_experts", 8), top_k=top_k, ffn_hidden_size=hf["intermediate_size"],
                    score="softmax", normalize_top_k=True,
                    aux_loss_coeff=_get(hf, "router_aux_loss_coef", 0.001) * top_k, z_loss_coeff=0.0)
    return _block_model(hf, source, "*E", _MIXTRAL_DEFAULTS, ffn_hidden_size=hf["intermediate_size"], moe=moe)


def _mixtral_hf_config(m: ModelConfig) -> dict[str, Any]:
    return {"model_type": "mixtral", "intermediate_size": m.moe.ffn_hidden_size, "num_hidden_layers": m.num_layers // 2,
            **_attention_fields(m), "hidden_act": "silu", "rms_norm_eps": m.norm_eps, **_rotary_fields(m),
            "num_local_experts": m.moe.num_experts, "num_experts_per_tok": m.moe.top_k,
            "router_aux_loss_coef": m.moe.aux_loss_coeff / m.moe.top_k, "sliding_window": None}


def _mixtral_unfit(m: ModelConfig) -> str | None:
    moe = m.moe
    if not _repeats(m, "*E"):
        return "only pure '*E' repeats (attention, MoE) are Mixtral blocks"
    if not m.rotary:
        return "Mixtral needs rotary attention (model.rotary=false)"
    if moe.score != "softmax" or not moe.normalize_top_k or moe.shared_experts:
        return (f"Mixtral routes by softmax, renormalised over the top k, without shared experts "
                f"(model.moe.score={moe.score}, normalize_top_k={moe.normalize_top_k}, "
                f"shared_experts={moe.shared_experts})")
    return None


# -- Mamba-2 and Nemotron-H: one HF layer per megamix layer, under ``backbone.`` -------------------

_MAMBA2_DEFAULTS = {"hidden_act": "silu", "use_bias": False, "use_conv_bias": True, "layer_norm_epsilon": 1e-5,
                    "expand": 2, "conv_kernel": 4, "n_groups": 8, "time_step_min": 0.001, "time_step_max": 0.1,
                    "initializer_range": 0.1}


def _mamba(hf: dict[str, Any], defaults: dict[str, Any], heads: str, head_dim: str, state: str,
           dt_floor: float = 0.0) -> MambaConfig:
    return MambaConfig(state_size=hf[state], head_dim=hf[head_dim], num_heads=hf[heads], dt_floor=dt_floor,
                       expand=_get(hf, "expand", defaults["expand"]), num_groups=_get(hf, "n_groups", defaults["n_groups"]),
                       conv_kernel=_get(hf, "conv_kernel", defaults["conv_kernel"]),
                       dt_min=_get(hf, "time_step_min", defaults["time_step_min"]),
                       dt_max=_get(hf, "time_step_max", defaults["time_step_max"]))


def _mamba2_config(hf: dict[str, Any], source: str) -> ModelConfig:
    _expect(hf, source, {"hidden_act": "silu", "use_bias": False, "use_conv_bias": True}, _MAMBA2_DEFAULTS)
    limit = [_float(v) for v in hf.get("time_step_limit", (0.0, math.inf))]
    if limit[1] != math.inf:
        raise ConfigError(f"{source}: time_step_limit={limit} is not supported; megamix clamps Δ from below only "
                          f"(model.mamba.dt_floor; needs [floor, inf])")
    mamba = _mamba(hf, _MAMBA2_DEFAULTS, "num_heads", "head_dim", "state_size", dt_floor=limit[0])
    if mamba.d_inner != mamba.expand * hf["hidden_size"]:
        raise ConfigError(f"{source}: num_heads × head_dim = {mamba.d_inner} must equal expand × hidden_size = "
                          f"{mamba.expand * hf['hidden_size']} (as transformers requires)")
    # no attention layers: the attention fields only need to pass validation for any tp the groups allow
    return ModelConfig(pattern="M" * hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
                       hidden_size=hf["hidden_size"], num_heads=mamba.num_heads, head_dim=mamba.head_dim,
                       norm_eps=_get(hf, "layer_norm_epsilon", 1e-5), rotary=False,
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                       init_std=_get(hf, "initializer_range", _MAMBA2_DEFAULTS["initializer_range"]), mamba=mamba)


def _mamba_fields(m: ModelConfig) -> dict[str, Any]:
    mb = m.mamba
    return {"n_groups": mb.num_groups, "conv_kernel": mb.conv_kernel, "time_step_min": mb.dt_min,
            "time_step_max": mb.dt_max, "use_bias": False, "use_conv_bias": True, "layer_norm_epsilon": m.norm_eps}


def _mamba2_hf_config(m: ModelConfig) -> dict[str, Any]:
    mb = m.mamba
    return {"model_type": "mamba2", "num_hidden_layers": m.num_layers, "num_heads": mb.num_heads,
            "head_dim": mb.head_dim, "state_size": mb.state_size, "expand": mb.d_inner // m.hidden_size,
            "hidden_act": "silu", "time_step_limit": [mb.dt_floor, math.inf], **_mamba_fields(m)}


def _mamba2_unfit(m: ModelConfig) -> str | None:
    if set(m.pattern.replace("|", "")) != {"M"}:
        return "only pure 'M' patterns are Mamba-2 models"
    if m.mamba.d_inner % m.hidden_size:
        return (f"transformers' Mamba-2 needs d_inner = mamba.num_heads × head_dim ({m.mamba.d_inner}) to be a "
                f"multiple of hidden_size ({m.hidden_size})")
    return None


def _backbone_layer(m: ModelConfig, i: int, kind: str) -> list[Link]:
    hf, mx = f"backbone.layers.{i}", f"layers.{i}"
    mixer = {"M": links.mamba2, "*": links.attention, "-": links.nemotron_h_mlp, "E": links.nemotron_h_moe}[kind]
    return [Link.stack(f"{mx}.norm.weight", (f"{hf}.norm.weight", (m.hidden_size,))), *mixer(m, mx, f"{hf}.mixer")]


_NEMOTRON_H_KINDS = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
_NEMOTRON_H_DEFAULTS = {**_MAMBA2_DEFAULTS, "mamba_hidden_act": "silu", "mlp_hidden_act": "relu2",
                        "attention_bias": False, "mlp_bias": False, "sliding_window": None,
                        "num_nextn_predict_layers": 0, "n_groups": 8, "initializer_range": 0.02,
                        "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 7688,
                        "moe_shared_expert_intermediate_size": 7688, "routed_scaling_factor": 1.0, "n_group": 1,
                        "topk_group": 1, "norm_topk_prob": True}


def _nemotron_h_pattern(hf: dict[str, Any], source: str) -> str:
    """The pattern of ``layers_block_type`` (transformers 5) or ``hybrid_override_pattern`` (older configs)."""
    listed = hf.get("layers_block_type")
    if listed is not None:
        unknown = sorted(set(listed) - set(_NEMOTRON_H_KINDS))
        if unknown:
            raise ConfigError(f"{source}: layers_block_type has unknown kinds {unknown}; "
                              f"known: {sorted(_NEMOTRON_H_KINDS)}")
        pattern = "".join(_NEMOTRON_H_KINDS[kind] for kind in listed)
    else:
        pattern = hf.get("hybrid_override_pattern")
        if not pattern:
            raise ConfigError(f"{source}: needs layers_block_type or hybrid_override_pattern")
    override = hf.get("hybrid_override_pattern")
    if override is not None and override != pattern:
        raise ConfigError(f"{source}: hybrid_override_pattern {override!r} disagrees with layers_block_type "
                          f"({pattern!r})")
    if set(pattern) - set("M*-E"):
        raise ConfigError(f"{source}: hybrid_override_pattern {pattern!r} has characters other than M, *, -, E")
    layers = hf.get("num_hidden_layers")
    if layers is not None and layers != len(pattern):
        raise ConfigError(f"{source}: num_hidden_layers={layers}, but the pattern {pattern!r} has {len(pattern)}")
    return pattern


# Nemotron-H's MoE fields in config.json ↔ model.moe's
_NEMOTRON_H_MOE_FIELDS = {"n_routed_experts": "num_experts", "num_experts_per_tok": "top_k",
                          "moe_intermediate_size": "ffn_hidden_size", "norm_topk_prob": "normalize_top_k",
                          "routed_scaling_factor": "routed_scaling_factor", "n_group": "num_groups",
                          "topk_group": "top_k_groups", "moe_shared_expert_intermediate_size": "shared_ffn_hidden_size"}


def _nemotron_h_moe(hf: dict[str, Any]) -> MoEConfig:
    """Nemotron-H's MoE: sigmoid scores, group-limited top-k with a selection bias, scaled combine weights, one
    shared MLP; all squared-ReLU. Training coefficients (not in config.json) are DeepSeek-V3's: bias update
    rate 1e-3 and a sequence-wise balance loss of 1e-4."""
    fields = {ours: _get(hf, theirs, _NEMOTRON_H_DEFAULTS[theirs]) for theirs, ours in _NEMOTRON_H_MOE_FIELDS.items()}
    fields["routed_scaling_factor"] = float(fields["routed_scaling_factor"])
    return MoEConfig(**fields, score="sigmoid", shared_experts=1, aux_loss_coeff=1e-4, aux_loss_type="sequence",
                     z_loss_coeff=0.0, bias_update_rate=1e-3)


def _nemotron_h_config(hf: dict[str, Any], source: str) -> ModelConfig:
    pattern = _nemotron_h_pattern(hf, source)
    wanted = {"attention_bias": False, "mlp_bias": False, "use_bias": False, "sliding_window": None,
              "num_nextn_predict_layers": 0}
    if "M" in pattern:
        wanted |= {"mamba_hidden_act": "silu", "use_conv_bias": True}
    if "-" in pattern or "E" in pattern:
        wanted["mlp_hidden_act"] = "relu2"
    if "E" in pattern:
        wanted["moe_latent_size"] = None
    _expect(hf, source, wanted, _NEMOTRON_H_DEFAULTS)
    # transformers' Nemotron-H clamps Δ at time_step_min
    mamba = _mamba(hf, _NEMOTRON_H_DEFAULTS, "mamba_num_heads", "mamba_head_dim", "ssm_state_size",
                   dt_floor=_get(hf, "time_step_min", _NEMOTRON_H_DEFAULTS["time_step_min"]))
    # without attention layers the attention fields only need to pass validation (as for Mamba-2)
    heads = (_heads(hf, default_head_dim=128) if "*" in pattern else
             {"num_heads": mamba.num_heads, "head_dim": mamba.head_dim})
    # transformers 5.23's NemotronHForCausalLM never ties lm_head to the embeddings, whatever the config says
    return ModelConfig(pattern=pattern, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], **heads,
                       ffn_hidden_size=_get(hf, "intermediate_size", 21504),
                       norm_eps=_get(hf, "layer_norm_epsilon", 1e-5), rotary=False, tie_embeddings=False,
                       init_std=_get(hf, "initializer_range", 0.02), mlp="relu2", mamba=mamba,
                       moe=_nemotron_h_moe(hf) if "E" in pattern else MoEConfig())


def _nemotron_h_hf_config(m: ModelConfig) -> dict[str, Any]:
    mb, pattern = m.mamba, m.pattern.replace("|", "")
    kinds = {char: kind for kind, char in _NEMOTRON_H_KINDS.items()}
    # layers_block_type for transformers 5, hybrid_override_pattern and num_hidden_layers for older readers
    return {"model_type": "nemotron_h", "layers_block_type": [kinds[c] for c in pattern],
            "hybrid_override_pattern": pattern, "num_hidden_layers": len(pattern), **_attention_fields(m),
            "intermediate_size": m.ffn_hidden_size, "mlp_hidden_act": "relu2", "mlp_bias": False,
            "mamba_num_heads": mb.num_heads, "mamba_head_dim": mb.head_dim, "ssm_state_size": mb.state_size,
            "expand": mb.expand, "mamba_hidden_act": "silu", "num_nextn_predict_layers": 0, **_mamba_fields(m),
            **(_nemotron_h_moe_fields(m.moe) if "E" in pattern else {})}


def _nemotron_h_moe_fields(moe: MoEConfig) -> dict[str, Any]:
    return {**{theirs: getattr(moe, ours) for theirs, ours in _NEMOTRON_H_MOE_FIELDS.items()},
            "moe_shared_expert_intermediate_size": moe.shared_width, "moe_latent_size": None}


def _nemotron_h_unfit(m: ModelConfig) -> str | None:
    pattern = m.pattern.replace("|", "")
    if set(pattern) - set("M*-E"):
        return f"Nemotron-H layers are M, *, - and E; the pattern has {''.join(sorted(set(pattern) - set('M*-E')))}"
    if "*" in pattern and m.rotary:
        return "Nemotron-H attention has no position embeddings (needs model.rotary=false)"
    if ("-" in pattern or "E" in pattern) and m.mlp != "relu2":
        return f"Nemotron-H MLPs and experts are squared-ReLU (needs model.mlp=relu2, not {m.mlp})"
    moe = m.moe
    if "E" in pattern and (moe.score != "sigmoid" or not moe.shared_experts or moe.capacity_factor is not None):
        return (f"Nemotron-H MoE layers route by sigmoid scores, dropless, with shared experts (model.moe.score="
                f"{moe.score}, shared_experts={moe.shared_experts}, capacity_factor={moe.capacity_factor})")
    if m.tie_embeddings:
        return "transformers' NemotronHForCausalLM does not tie lm_head to the embeddings (model.tie_embeddings)"
    if "M" in pattern and m.mamba.dt_floor != m.mamba.dt_min:
        return (f"Nemotron-H clamps the Mamba step at time_step_min = model.mamba.dt_min ({m.mamba.dt_min}); "
                f"needs model.mamba.dt_floor equal to it, not {m.mamba.dt_floor}")
    return None


ARCHITECTURES: dict[str, Architecture] = {arch.name: arch for arch in (
    Architecture("LlamaForCausalLM", "model.embed_tokens.weight", "model.norm.weight", _llama_config,
                 _llama_hf_config, _llama_unfit, _block_layer(_swiglu), derived=(".rotary_emb.inv_freq",)),
    Architecture("MixtralForCausalLM", "model.embed_tokens.weight", "model.norm.weight", _mixtral_config,
                 _mixtral_hf_config, _mixtral_unfit,
                 _block_layer(lambda m, mx, hf: links.mixtral_moe(m, mx, f"{hf}.block_sparse_moe")),
                 derived=(".rotary_emb.inv_freq",)),
    Architecture("Mamba2ForCausalLM", "backbone.embeddings.weight", "backbone.norm_f.weight", _mamba2_config,
                 _mamba2_hf_config, _mamba2_unfit, _backbone_layer),
    Architecture("NemotronHForCausalLM", "backbone.embeddings.weight", "backbone.norm_f.weight",
                 _nemotron_h_config, _nemotron_h_hf_config, _nemotron_h_unfit, _backbone_layer),
)}


def architecture_of_hf(hf: dict[str, Any], source: str) -> Architecture:
    """The registry entry named by a ``config.json``'s ``architectures``."""
    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise ConfigError(f"{source}: architectures {names} are not supported; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[names[0]]


def architecture_for(m: ModelConfig, name: str | None = None) -> Architecture:
    """The architecture ``name``, or the first that fits ``m``; an error says why each does not."""
    if name is not None:
        if name not in ARCHITECTURES:
            raise ConfigError(f"architecture {name!r} is not supported; supported: {sorted(ARCHITECTURES)}")
        candidates = [ARCHITECTURES[name]]
    else:
        candidates = list(ARCHITECTURES.values())
    reasons = {arch.name: arch.unfit(m) for arch in candidates}
    for arch in candidates:
        if reasons[arch.name] is None:
            return arch
    raise ConfigError(f"model.pattern {m.pattern!r} has no Hugging Face equivalent: "
                      + "; ".join(f"{arch}: {why}" for arch, why in reasons.items()))


def hf_config(arch: Architecture, m: ModelConfig, dtype: torch.dtype, max_positions: int) -> dict[str, Any]:
    """The ``config.json`` of ``m`` written as ``arch`` with tensors of ``dtype``."""
    return {"architectures": [arch.name], **arch.hf_config(m), "vocab_size": m.vocab_size,
            "hidden_size": m.hidden_size, "max_position_embeddings": max_positions,
            "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std, "dtype": str(dtype).removeprefix("torch.")}


def state_from_hf(arch: Architecture, m: ModelConfig, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """In memory: the megamix tensors of ``m`` from HF tensors fetched by ``get(hf_name)`` (shapes checked)."""
    state = {}
    for link in arch.links(m):
        parts = []
        for name, shape in link.parts:
            tensor = get(name)
            if tuple(tensor.shape) != shape:
                raise CheckpointError(f"tensor {name}: shape {list(tensor.shape)}, but the config implies {list(shape)}")
            parts.append(tensor)
        state[link.name] = torch.cat(parts) if parts else torch.zeros(link.shape)
    return state
