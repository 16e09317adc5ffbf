"""ZeRO-1/2/3 and CPU offload through DeepSpeed (``parallel.zero_engine: deepspeed``).

DeepSpeed wraps our model and an AdamW with the same parameter groups as the builtin optimizer
(:class:`~megamix.parallel.optimizer.DistributedOptimizer`) and shards optimizer state (ZeRO-1), gradients
(ZeRO-2) and parameters (ZeRO-3) over the data-parallel ranks only: it is told our process groups through
its model-parallel-unit interface (:class:`ModelParallelUnit`), so tensor-parallel layers keep their
shards and their collectives, and parameters split over TP are marked ``tensor_model_parallel`` so the
gradient norm counts every element once.

The meaning of a step is the builtin one: gradients averaged over dp × cp, clipped to ``train.grad_clip``
by the global norm, AdamW with weight decay on matrices only, the learning rate set by our schedule, bf16
as autocast over fp32 weights, ``micro_batches`` micro-batches accumulated. Checkpoints stay in our
format: full (TP-local) fp32 parameters and Adam moments are collected from DeepSpeed's partitions when
saving and pushed back into them when loading, so runs move between engines and layouts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megamix.errors import ConfigError
from megamix.parallel.sharding import Sharding, sharding_of
from megamix.parallel.state import Group, ParallelState

# Derived from the megamix config: a DeepSpeed config file may not change them.
DERIVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def import_deepspeed(device: torch.device):
    """``deepspeed``, on its CPU accelerator when training on CPU (it must know before its first import)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError("parallel.zero_engine=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]' "
                          "(or use parallel.zero_engine=builtin)") from e
    return deepspeed


# DeepSpeed's mpu accessor stems (get_<stem>_group / _rank / _world_size) → our groups
MPU_GROUPS = {"data_parallel": "grad", "model_parallel": "model", "tensor_model_parallel": "tp",
              "pipeline_model_parallel": "pp"}


class ModelParallelUnit:
    """DeepSpeed's ``mpu`` interface over a :class:`ParallelState`: data parallel = the dp × cp gradient
    group, model parallel = tp × pp (:data:`MPU_GROUPS`). DeepSpeed needs a process group even where ours has
    one rank, so single-rank groups are made for those (collectively, in the same order on every rank)."""

    def __init__(self, parallel: ParallelState):
        groups: dict[str, Group] = {stem: getattr(parallel, ours) for stem, ours in MPU_GROUPS.items()}
        alone = dist.group.WORLD
        if parallel.world_size > 1 and any(group.size == 1 for group in groups.values()):
            for rank in range(parallel.world_size):
                group = dist.new_group([rank])
                alone = group if rank == parallel.rank else alone
        for stem, group in groups.items():
            torch_group = group.group if group.size > 1 else alone
            setattr(self, f"get_{stem}_group", lambda g=torch_group: g)
            setattr(self, f"get_{stem}_rank", lambda r=group.rank: r)
            setattr(self, f"get_{stem}_world_size", lambda n=group.size: n)


def deepspeed_config(zero: int, offload: str, micro_batch_size: int, micro_batches: int, data_parallel: int,
                     grad_clip: float) -> dict:
    """The DeepSpeed JSON config of a megamix run. ``data_parallel``: the ranks gradients are averaged
    over (dp × cp), which DeepSpeed counts in its batch size."""
    zero_section: dict = {"stage": zero}
    if offload in ("optimizer", "params"):
        zero_section["offload_optimizer"] = {"device": "cpu"}
    if offload == "params":
        zero_section["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": micro_batch_size * micro_batches * data_parallel,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero_section,
        # our AdamW (the builtin's math), also where the optimizer state is offloaded
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }


def merge_user_config(generated: dict, path: str) -> tuple[dict, list[str]]:
    """``generated`` overridden by the DeepSpeed JSON file ``path``; returns it and one line per key the
    file changes. Keys megamix derives from the batch settings may not change."""
    try:
        user = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"parallel.deepspeed_config: cannot read {path} as JSON: {e}") from e
    if not isinstance(user, dict):
        raise ConfigError(f"parallel.deepspeed_config: {path} must hold a JSON object")
    changed = []
    for key, value in user.items():
        if key in DERIVED_KEYS and value != generated[key]:
            raise ConfigError(f"parallel.deepspeed_config: {path} sets {key}={value}, but megamix derives "
                              f"{generated[key]} from train.micro_batch_size and train.global_batch_size; "
                              f"remove {key} from the file or change those settings")
        if key in generated and generated[key] != value:
            changed.append(f"{key}: {json.dumps(generated[key])} (megamix) -> {json.dumps(value)} ({path})")
    return generated | user, changed


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW parameter groups of the builtin optimizer: weight decay on matrices, none on vectors."""
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


class DeepSpeedZero:
    """The trainer's optimizer interface over a DeepSpeed engine of ``model`` (one pipeline stage).

    Per micro-batch, :meth:`backward` runs DeepSpeed's backward and its ``step``, which accumulates and,
    after the last micro-batch of the optimizer step, reduces, clips and updates; :meth:`clip_grad_norm`
    then reports the norm it clipped by, and :meth:`reduce_gradients`, :meth:`step` and :meth:`zero_grad`
    have nothing left to do.
    """

    def __init__(self, model: nn.Module, named_parameters: list[tuple[str, nn.Parameter]], parallel: ParallelState,
                 device: torch.device, ds_config: dict, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float):
        self.deepspeed = deepspeed = import_deepspeed(device)
        from deepspeed.utils import set_z3_leaf_modules

        from megamix.models.hybrid import ResidualLayer

        self.named = named_parameters
        # read now: ZeRO-3 leaves each parameter an empty tensor
        self.shardings = {name: sharding_of(param, parallel.tp.size) for name, param in named_parameters}
        for name, param in named_parameters:
            # TP-split parameters count on every TP rank in the gradient norm, replicated ones on one
            param.tensor_model_parallel = self.shardings[name].global_shape != tuple(param.shape)
        if ds_config["zero_optimization"]["stage"] == 3:
            # gather each layer's parameters as a whole: mixers read their projections' weights directly
            set_z3_leaf_modules(model, [ResidualLayer])
            if getattr(model, "lm_head", 0) is None:  # the tied head reads the embedding outside its module
                deepspeed.zero.register_external_parameter(model, model.embed.weight)
        params = [p for _, p in named_parameters]
        optimizer = torch.optim.AdamW(decay_groups(params, weight_decay), lr=lr, betas=betas, eps=eps)
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                       auto_mpi_discovery=False, verbose=False)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, mpu=ModelParallelUnit(parallel))
        self._loaded: dict[str, torch.Tensor] = {}

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's share of the step's loss (already divided by the micro-batches)."""
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def reduce_gradients(self) -> None:
        """Done by DeepSpeed during backward and its step."""

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global gradient norm before clipping (DeepSpeed clipped to ``gradient_clipping`` = max_norm)."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def step(self) -> None:
        """Done by DeepSpeed at the last micro-batch's backward."""

    def zero_grad(self) -> None:
        """Done by DeepSpeed after its step."""

    # -- checkpoint: our format, collected from DeepSpeed's partitions ---------------------------

    def parameter_tensors(self) -> list[tuple[str, Sharding, torch.Tensor]]:
        """(name, sharding, full TP-local fp32 value) of each parameter: for saving, or loaded into and then
        pushed back by :meth:`after_checkpoint_load`. Collective: every rank calls it."""
        from deepspeed.utils import safe_get_full_fp32_param

        tensors = [(name, self.shardings[name], safe_get_full_fp32_param(param).clone()) for name, param in self.named]
        self._loaded = {f"model.{name}": value for name, _, value in tensors}
        return tensors

    def checkpoint_state(self) -> dict:
        """Flat DCP entries as :meth:`DistributedOptimizer.checkpoint_state` writes them."""
        from deepspeed.utils import safe_get_full_optimizer_state

        from megamix.parallel.checkpointing import GlobalPieces

        self._create_state()
        entries = {}
        for name, param in self.named:
            for key in ("exp_avg", "exp_avg_sq"):
                value = safe_get_full_optimizer_state(param, key).clone()
                self._loaded[f"optim.{name}.{key}"] = value
                entries[f"optim.{name}.{key}"] = GlobalPieces(self.shardings[name], value)
        entries["optim.step"] = self._step_tensors()[0].clone()
        self._loaded["optim.step"] = entries["optim.step"]
        return entries

    def after_checkpoint_load(self) -> None:
        """Push the loaded parameters, moments and step count into DeepSpeed's partitions."""
        from deepspeed.utils import (
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        for name, param in self.named:
            value = self._loaded[f"model.{name}"]
            safe_set_full_fp32_param(param, value)  # the fp32 master copy the optimizer steps
            with self.deepspeed.zero.GatheredParameters([param], modifier_rank=0):  # the weights forward reads
                param.data.copy_(value)
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(param, self._loaded[f"optim.{name}.{key}"], key)
        for step in self._step_tensors():
            step.copy_(self._loaded["optim.step"])

    def _flat_partitions(self) -> list[torch.Tensor]:
        """The fp32 flat partitions the wrapped AdamW steps (ZeRO-3 hands them to it only while stepping)."""
        z3 = getattr(self.optimizer, "fp32_partitioned_groups_flat", None)
        return z3 if z3 is not None else self.optimizer.single_partition_of_fp32_groups

    def _create_state(self) -> None:
        """AdamW state exists after the first step only: make the zero state now, to read or load into."""
        state = self.optimizer.optimizer.state
        for flat in self._flat_partitions():
            if not state[flat]:
                state[flat].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat),
                                   exp_avg_sq=torch.zeros_like(flat))
        if hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO-1/2 link each parameter to its slice of the state once, after stepping the first parameter
            # group — when the other groups have no state yet (DeepSpeed 0.19): link them all again now
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def _step_tensors(self) -> list[torch.Tensor]:
        return [self.optimizer.optimizer.state[flat]["step"] for flat in self._flat_partitions()]
