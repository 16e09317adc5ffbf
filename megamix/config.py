"""Typed run configuration: YAML file + dotted ``section.key=value`` overrides.

Every section is a dataclass; the field annotations are the schema. Loading
checks each key and value against it and raises :class:`ConfigError` naming the
key and what is allowed, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megamix.errors import ConfigError


@dataclass
class LightningConfig:
    """``L`` layers (TransNormerLLM token mixer); they use ``model.num_heads`` heads of ``model.head_dim``."""

    decay: Literal["tnl", "alibi"] = "tnl"  # per-head decay schedule, see megamix.nn.lightning.lightning_log_decay


@dataclass
class MambaConfig:
    """``M`` layers (Mamba-2 mixer). d_inner = num_heads · head_dim (default expand · hidden_size)."""

    state_size: int = 128  # N
    head_dim: int = 64  # P
    num_heads: int | None = None  # None: expand · hidden_size / head_dim
    expand: int = 2
    num_groups: int = 1  # G: groups of heads sharing B and C
    conv_kernel: int = 4
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_floor: float = 0.0  # Δ = max(softplus(·), dt_floor): Nemotron-H's time_step_min, Mamba-2's time_step_limit[0]

    @property
    def d_inner(self) -> int:
        return self.num_heads * self.head_dim


@dataclass
class MoEConfig:
    """``E`` layers (mixture-of-experts MLP); each expert is an MLP of ``model.mlp``'s kind and ``ffn_hidden_size``."""

    num_experts: int = 8
    top_k: int = 2
    ffn_hidden_size: int | None = None  # None: model.ffn_hidden_size
    score: Literal["softmax", "sigmoid"] = "softmax"
    normalize_top_k: bool = True  # renormalise the chosen experts' scores to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the chosen experts' combine weights
    num_groups: int = 1  # > 1: group-limited routing (DeepSeek-V3) over this many groups of consecutive experts
    top_k_groups: int = 1  # the groups a token may pick its experts from
    aux_loss_coeff: float = 0.01  # Switch load-balancing loss
    aux_loss_type: Literal["batch", "sequence"] = "batch"  # balance over the micro-batch or per sequence
    z_loss_coeff: float = 0.001  # router z-loss
    bias_update_rate: float = 0.0  # > 0: auxiliary-loss-free balancing by a per-expert selection bias
    shared_experts: int = 0  # experts every token uses
    shared_ffn_hidden_size: int | None = None  # their total width; None: shared_experts × ffn_hidden_size
    capacity_factor: float | None = None  # None: dropless
    drop_policy: Literal["probability", "position"] = "probability"

    @property
    def shared_width(self) -> int:
        """The shared experts' total ffn width (0 without shared experts)."""
        return (self.shared_ffn_hidden_size or self.shared_experts * self.ffn_hidden_size) if self.shared_experts else 0


@dataclass
class MoHConfig:
    """``H`` layers (mixture-of-head attention) over ``model.num_heads`` heads."""

    shared_heads: int = 2  # always active
    routed_top_k: int = 1  # routed heads active per token, chosen from the other heads
    aux_loss_coeff: float = 0.01


@dataclass
class ModelConfig:
    """Architecture. ``pattern`` has one character per residual layer (DESIGN.md §2)."""

    pattern: str = "*-*-"
    vocab_size: int = 4096
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: equal to num_heads (plain multi-head attention)
    head_dim: int | None = None  # None: hidden_size // num_heads
    ffn_hidden_size: int | None = None  # None: 8/3·hidden rounded up to a multiple of 64 (Llama)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary: bool = True  # false: attention without position embeddings (the Mamba-2-Hybrid models)
    tie_embeddings: bool = False
    init_std: float = 0.02
    # `-` layers: SiLU-gated (Llama), SGLU without activation (TransNormerLLM), or ungated squared ReLU (Nemotron-H)
    mlp: Literal["swiglu", "sglu", "relu2"] = "swiglu"
    lightning: LightningConfig = field(default_factory=LightningConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    moh: MoHConfig = field(default_factory=MoHConfig)

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None and self.num_heads > 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = -(-(8 * self.hidden_size // 3) // 64) * 64
        if self.moe.ffn_hidden_size is None:
            self.moe.ffn_hidden_size = self.ffn_hidden_size
        if self.mamba.num_heads is None and self.mamba.head_dim > 0:
            self.mamba.num_heads = self.mamba.expand * self.hidden_size // self.mamba.head_dim

    @property
    def num_layers(self) -> int:
        return len(self.pattern.replace("|", ""))


@dataclass
class ParallelConfig:
    """Parallel layout. World = pp × dp × cp × tp; dp is derived from the world size."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    cp_comm: Literal["ring", "all_gather"] = "ring"  # how softmax attention gets the other cp ranks' K/V
    ep: int = 1
    sequence_parallel: bool = False
    zero: int = 1  # 0 (builtin only): replicated optimizer state; 1: sharded over dp (ZeRO-1); 2, 3: DeepSpeed
    zero_engine: Literal["builtin", "deepspeed"] = "builtin"
    offload: Literal["none", "optimizer", "params"] = "none"  # DeepSpeed CPU offload
    deepspeed_config: str | None = None  # a DeepSpeed JSON file overriding the generated config


@dataclass
class DatasetSpec:
    """One packed token file (``path`` is the prefix of ``.bin``/``.idx``, or ``builtin``)."""

    path: str
    weight: float = 1.0


@dataclass
class DataConfig:
    seq_len: int = 256
    datasets: list[DatasetSpec] = field(default_factory=lambda: [DatasetSpec("builtin")])
    tokenizer: str | None = None  # None: the ``.model`` beside the first dataset
    reset_at_eos: bool = True  # packed documents: no mixer looks across an EOS, positions restart, loss masked
    cache_dir: str | None = None  # None: $MEGAMIX_CACHE or ~/.cache/megamix (the builtin corpus)


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 1234
    micro_batch_size: int = 8
    global_batch_size: int = 8
    lr: float = 3e-4
    min_lr: float = 3e-5
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # WSD: the final fraction of steps that decays to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    precision: Literal["fp32", "bf16"] = "fp32"
    recompute: bool = False
    resume: str = "auto"  # auto | none | path of a step_<N> checkpoint directory
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None: <log.dir>/checkpoints
    interval: int = 0  # steps between saves; 0 saves only at the end
    keep: int = 2  # newest complete checkpoints kept; 0 keeps all
    save_on_exit: bool = False  # on a stop request (megamix launch: Ctrl-C, SIGTERM) save at the step boundary


@dataclass
class LogConfig:
    dir: str = "runs/default"
    interval: int = 1
    tensorboard: bool = True
    progress: Literal["auto", "always", "never"] = "auto"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.log.dir) / "checkpoints"


# ---------------------------------------------------------------------------
# Building dataclasses from plain data, with errors that name the key.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        keys = ", ".join(f.name for f in dataclasses.fields(tp))
        return f"a mapping with keys {keys}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    if isinstance(value, _OverrideText):
        value = value.value_for(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item_tp,) = typing.get_args(tp)
            return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key)
        if isinstance(value, str) and tp is DatasetSpec:
            return DatasetSpec(path=value)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"{key}: unknown key{hint}; allowed: {', '.join(names)}")
        kwargs[name] = _convert(value, hints[name], key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field (e.g. DatasetSpec.path) is missing
        raise ConfigError(f"{prefix or 'config'}: {e}; expected {_type_name(cls)}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


@dataclass(frozen=True)
class _OverrideText:
    """An override's value before the schema says what type it should be."""

    text: str

    def __repr__(self) -> str:
        return repr(self.text)

    def value_for(self, tp: Any) -> Any:
        """The text itself where a string is expected (a pattern like ``-`` or ``*-*E`` is no valid
        YAML scalar), else the text read as YAML."""
        if tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)
                         and self.text not in ("null", "~")):
            return self.text
        try:
            return yaml.safe_load(self.text) if self.text else ""
        except yaml.YAMLError:
            return self.text


def parse_override(text: str) -> tuple[str, _OverrideText]:
    """``'train.lr=1e-3'`` → ``('train.lr', <text '1e-3'>)``, typed later by the schema."""
    key, sep, raw = text.partition("=")
    if not sep or not key or " " in key:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.steps=100")
    return key, _OverrideText(raw)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    config = _build(Config, tree, "")
    validate(config)
    return config


def config_from_dict(tree: dict[str, Any], overrides: list[str] = ()) -> Config:
    """Rebuild a config saved with :meth:`Config.to_dict` (e.g. from a checkpoint), with dotted
    ``key=value`` overrides applied (``megamix convert``: the target layout)."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    config = _build(Config, tree, "")
    validate(config)
    return config


# ---------------------------------------------------------------------------
# Cross-field validation.

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate_mamba(mb: MambaConfig, tp: int) -> None:
    for key in ("state_size", "head_dim", "num_heads", "num_groups", "conv_kernel"):
        _require(getattr(mb, key) > 0, f"model.mamba.{key}: must be positive, got {getattr(mb, key)}")
    _require(mb.num_heads % mb.num_groups == 0,
             f"model.mamba.num_heads ({mb.num_heads}) must be divisible by model.mamba.num_groups ({mb.num_groups})")
    _require(mb.num_groups % tp == 0,
             f"model.mamba.num_groups ({mb.num_groups}) must be divisible by parallel.tp ({tp}): each tensor-parallel "
             f"rank holds whole groups of heads with their B and C (Megatron-Core's rule)")
    _require(0 < mb.dt_min <= mb.dt_max, f"model.mamba: need 0 < dt_min <= dt_max, got {mb.dt_min}, {mb.dt_max}")
    _require(mb.dt_floor >= 0, f"model.mamba.dt_floor: must be >= 0, got {mb.dt_floor}")


def _validate_moe(moe: MoEConfig, p: ParallelConfig) -> None:
    _require(moe.num_experts > 0 and 0 < moe.top_k <= moe.num_experts,
             f"model.moe: need num_experts > 0 and 0 < top_k <= num_experts, got {moe.num_experts}, {moe.top_k}")
    _require(moe.num_experts % p.ep == 0,
             f"model.moe.num_experts ({moe.num_experts}) must be divisible by parallel.ep ({p.ep})")
    _require(moe.ffn_hidden_size > 0 and moe.ffn_hidden_size % p.tp == 0,
             f"model.moe.ffn_hidden_size ({moe.ffn_hidden_size}) must be positive and divisible by parallel.tp ({p.tp})")
    _require(moe.shared_experts >= 0, f"model.moe.shared_experts: must be >= 0, got {moe.shared_experts}")
    shared = moe.shared_ffn_hidden_size
    _require(shared is None or (moe.shared_experts > 0 and shared > 0 and shared % p.tp == 0),
             f"model.moe.shared_ffn_hidden_size ({shared}) needs model.moe.shared_experts >= 1 and must be positive "
             f"and divisible by parallel.tp ({p.tp})")
    per_group = moe.num_experts // moe.num_groups if moe.num_groups > 0 else 0
    _require(moe.num_groups > 0 and moe.num_experts % moe.num_groups == 0,
             f"model.moe.num_groups ({moe.num_groups}) must be positive and divide num_experts ({moe.num_experts})")
    _require(0 < moe.top_k_groups <= moe.num_groups and moe.top_k <= moe.top_k_groups * per_group,
             f"model.moe.top_k_groups ({moe.top_k_groups}) must be in [1, num_groups={moe.num_groups}] and its "
             f"groups must hold top_k ({moe.top_k}) experts ({per_group} per group)")
    _require(moe.routed_scaling_factor > 0,
             f"model.moe.routed_scaling_factor: must be > 0, got {moe.routed_scaling_factor}")
    _require(moe.capacity_factor is None or moe.capacity_factor > 0,
             f"model.moe.capacity_factor: must be > 0 or null (dropless), got {moe.capacity_factor}")
    for key in ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate"):
        _require(getattr(moe, key) >= 0, f"model.moe.{key}: must be >= 0, got {getattr(moe, key)}")


def _validate_moh(m: ModelConfig, tp: int) -> None:
    moh, routed = m.moh, m.num_heads - m.moh.shared_heads
    _require(0 < moh.shared_heads < m.num_heads and 0 < moh.routed_top_k <= routed,
             f"model.moh: need 1 <= shared_heads < num_heads ({m.num_heads}) and 1 <= routed_top_k <= the "
             f"{routed} routed heads, got shared_heads={moh.shared_heads}, routed_top_k={moh.routed_top_k}")
    _require(moh.shared_heads % tp == 0 and routed % tp == 0,
             f"model.moh: shared heads ({moh.shared_heads}) and routed heads ({routed}) must each be divisible by "
             f"parallel.tp ({tp}): every tensor-parallel rank holds its share of both")
    _require(moh.aux_loss_coeff >= 0, f"model.moh.aux_loss_coeff: must be >= 0, got {moh.aux_loss_coeff}")


def _validate_deepspeed(m: ModelConfig, p: ParallelConfig) -> None:
    """What DeepSpeed's ZeRO cannot combine with (it owns gradient reduction over data parallel)."""
    works = "DeepSpeed runs with parallel.tp, parallel.cp and data parallel; use parallel.zero_engine=builtin for"
    _require(p.zero in (1, 2, 3), f"parallel.zero: DeepSpeed has ZeRO 1, 2 or 3, got {p.zero}")
    _require(p.pp == 1, f"parallel.pp={p.pp} with parallel.zero_engine=deepspeed: our pipeline schedule runs the "
                        f"backward itself, where DeepSpeed must; {works} pipeline parallel (ZeRO-1)")
    _require(p.ep == 1, f"parallel.ep={p.ep} with parallel.zero_engine=deepspeed: expert weights are reduced over "
                        f"other ranks than the rest; {works} expert parallel")
    _require(not p.sequence_parallel, f"parallel.sequence_parallel with parallel.zero_engine=deepspeed: norm "
                                      f"gradients must be summed over TP before DeepSpeed reduces them; {works} SP")
    _require(p.tp == 1 or (m.num_kv_heads % p.tp == 0 and "H" not in m.pattern),
             f"parallel.tp={p.tp} with parallel.zero_engine=deepspeed needs every parameter either split over TP or "
             f"with the same gradient on every TP rank: model.num_kv_heads must be divisible by parallel.tp and no "
             f"'H' (MoH) layers; {works} them")
    _require(p.offload != "params" or p.zero == 3, "parallel.offload=params needs parallel.zero=3")


def validate(c: Config) -> None:
    from megamix.models.hybrid import LAYER_KINDS, describe_layer_kinds

    m, p, t, d = c.model, c.parallel, c.train, c.data
    _require(m.num_layers > 0, "model.pattern: needs at least one layer character, e.g. '*-*-'")
    for i, ch in enumerate(m.pattern):
        _require(ch in LAYER_KINDS or ch == "|",
                 f"model.pattern: unknown layer kind {ch!r} at position {i}; known: {describe_layer_kinds()}")
    for key in ("vocab_size", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size"):
        _require(getattr(m, key) > 0, f"model.{key}: must be positive, got {getattr(m, key)}")
    _require(m.num_heads % m.num_kv_heads == 0,
             f"model.num_heads ({m.num_heads}) must be divisible by model.num_kv_heads ({m.num_kv_heads})")
    _require(m.head_dim % 2 == 0, f"model.head_dim must be even for rotary embeddings, got {m.head_dim}")
    _require(m.norm_eps > 0 and m.init_std > 0 and m.rope_theta > 0,
             "model.norm_eps, model.init_std and model.rope_theta must be positive")

    if "M" in m.pattern:
        _validate_mamba(m.mamba, p.tp)
    if "E" in m.pattern:
        _validate_moe(m.moe, p)
    if "H" in m.pattern:
        _validate_moh(m, p.tp)

    for key in ("tp", "pp", "vpp", "cp", "ep"):
        _require(getattr(p, key) >= 1, f"parallel.{key}: must be >= 1, got {getattr(p, key)}")
    _require(p.vpp == 1 or p.pp > 1, f"parallel.vpp={p.vpp} interleaves pipeline stages: it needs parallel.pp > 1")
    if p.zero_engine == "builtin":
        _require(p.zero in (0, 1), f"parallel.zero: the builtin engine has 0 (replicated optimizer) or 1 (sharded, "
                                   f"ZeRO-1), got {p.zero}; ZeRO-2/3 need parallel.zero_engine=deepspeed")
        _require(p.offload == "none" and p.deepspeed_config is None,
                 "parallel.offload and parallel.deepspeed_config need parallel.zero_engine=deepspeed")
    else:
        _validate_deepspeed(m, p)
    _require(m.num_heads % p.tp == 0, f"model.num_heads ({m.num_heads}) must be divisible by parallel.tp ({p.tp})")
    _require(m.num_kv_heads % p.tp == 0 or p.tp % m.num_kv_heads == 0,
             f"model.num_kv_heads ({m.num_kv_heads}) and parallel.tp ({p.tp}) must divide one another "
             f"(kv heads are split over TP ranks, or replicated when there are fewer than ranks)")
    _require(m.vocab_size % p.tp == 0,
             f"model.vocab_size ({m.vocab_size}) must be divisible by parallel.tp ({p.tp}); "
             f"use {-(-m.vocab_size // p.tp) * p.tp} (padding rows are never predicted)")
    _require(m.ffn_hidden_size % p.tp == 0,
             f"model.ffn_hidden_size ({m.ffn_hidden_size}) must be divisible by parallel.tp ({p.tp})")

    _require(d.seq_len > 0, f"data.seq_len: must be positive, got {d.seq_len}")
    _require(p.cp == 1 or d.seq_len % (2 * p.cp) == 0,
             f"data.seq_len={d.seq_len} must be a multiple of 2 × parallel.cp = {2 * p.cp} (each cp rank holds two "
             f"chunks of every sample)")
    if "M" in m.pattern:
        _require(d.seq_len // (2 * p.cp if p.cp > 1 else 1) >= m.mamba.conv_kernel - 1,
                 f"data.seq_len={d.seq_len}: the chunks of parallel.cp={p.cp} must hold at least "
                 f"model.mamba.conv_kernel − 1 = {m.mamba.conv_kernel - 1} tokens")
    _require(len(d.datasets) > 0, "data.datasets: needs at least one dataset, e.g. [{path: builtin}]")
    for i, ds in enumerate(d.datasets):
        _require(ds.weight > 0, f"data.datasets[{i}].weight: must be positive, got {ds.weight}")

    _require(t.steps > 0, f"train.steps: must be positive, got {t.steps}")
    _require(t.micro_batch_size > 0, f"train.micro_batch_size: must be positive, got {t.micro_batch_size}")
    _require(t.global_batch_size % t.micro_batch_size == 0,
             f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
             f"train.micro_batch_size ({t.micro_batch_size})")
    _require(t.lr > 0 and 0 <= t.min_lr <= t.lr, f"train.lr must be > 0 and train.min_lr in [0, lr]; "
                                                 f"got lr={t.lr}, min_lr={t.min_lr}")
    _require(t.warmup_steps >= 0, f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    _require(0 < t.decay_fraction <= 1, f"train.decay_fraction: must be in (0, 1], got {t.decay_fraction}")
    _require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
    _require(t.grad_clip >= 0, f"train.grad_clip: must be >= 0 (0 disables), got {t.grad_clip}")
    _require(t.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {t.weight_decay}")

    _require(c.checkpoint.interval >= 0, f"checkpoint.interval: must be >= 0, got {c.checkpoint.interval}")
    _require(c.checkpoint.keep >= 0, f"checkpoint.keep: must be >= 0, got {c.checkpoint.keep}")
    _require(c.log.interval > 0, f"log.interval: must be positive, got {c.log.interval}")
