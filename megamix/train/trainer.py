"""The training loop: data → model → loss → optimizer → metrics and checkpoints.

One optimizer step consumes ``global_batch_size`` samples of ``seq_len + 1`` tokens:
data-parallel rank r takes the r-th of dp equal slices and runs it in micro-batches
of ``micro_batch_size`` (gradient accumulation). Sample ``i`` of the run is a pure
function of (seed, i), so the data a step sees never depends on the layout, and the
checkpoint holds the sample counter, optimizer state and RNG: a resumed run
continues bit for bit, and at another layout within fp32 round-off.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import threading
import time
from pathlib import Path

import torch

from megamix import __version__, checkpoint
from megamix.config import Config, config_from_dict
from megamix.data import (
    BlendedSamples,
    IndexedDataset,
    SampleStream,
    Tokenizer,
    default_cache_dir,
    ensure_builtin,
)
from megamix.errors import CheckpointError, ConfigError, TrainingError
from megamix.models import HybridModel
from megamix.nn.moe import MoE
from megamix.parallel import (
    DistributedOptimizer,
    Group,
    ParallelState,
    check_layout,
    init_distributed,
    vocab_parallel_cross_entropy,
)
from megamix.parallel.checkpointing import GlobalPieces
from megamix.parallel.comm import all_reduce
from megamix.parallel.deepspeed_zero import (
    DeepSpeedZero,
    deepspeed_config,
    merge_user_config,
)
from megamix.parallel.pipeline import PipelineSchedule, split_layers, stage_specs
from megamix.train.batches import split_micro_batch
from megamix.train.device import peak_flops, peak_memory_mb, pick_device
from megamix.train.metrics import MetricsLogger
from megamix.train.schedule import learning_rate, set_learning_rate
from megamix.train.stage_costs import measured_layer_costs


def build_parallel_state(config: Config) -> ParallelState:
    """Join the process group (under torchrun) and build the layout's groups."""
    p = config.parallel
    return ParallelState.create(tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep, sequence_parallel=p.sequence_parallel)


def open_training_data(config: Config) -> tuple[SampleStream, int | None]:
    """The blended sample stream of ``data.datasets`` (``builtin`` is prepared on first use) and, with
    ``data.reset_at_eos``, the tokenizer's EOS id that ends each packed document."""
    d = config.data
    cache = d.cache_dir or default_cache_dir()
    prefixes = [ensure_builtin(cache, config.model.vocab_size) if ds.path == "builtin" else ds.path
                for ds in d.datasets]
    tokenizer_path = d.tokenizer or f"{prefixes[0]}.model"
    eos_id = None
    if d.tokenizer is not None or Path(tokenizer_path).is_file():
        tokenizer = Tokenizer.load(tokenizer_path)
        if tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(f"model.vocab_size ({config.model.vocab_size}) is smaller than the vocabulary "
                              f"of tokenizer {tokenizer_path} ({tokenizer.vocab_size}); "
                              f"set model.vocab_size={tokenizer.vocab_size} or more")
        eos_id = tokenizer.eos_id
    if d.reset_at_eos and eos_id is None:
        raise ConfigError(f"data.reset_at_eos=true needs the EOS id of the data's tokenizer, but there is no "
                          f"{tokenizer_path}; set data.tokenizer=PATH.model or data.reset_at_eos=false")
    datasets = [(IndexedDataset(prefix), ds.weight) for prefix, ds in zip(prefixes, d.datasets)]
    stream = SampleStream(BlendedSamples(datasets, d.seq_len, config.train.seed))
    return stream, (eos_id if d.reset_at_eos else None)


class Trainer:
    """Trains ``config`` in this process group; ``run()`` trains to ``train.steps`` and returns the losses it ran.

    ``stop``: an event another thread may set (``megamix launch`` does on Ctrl-C) to end the run at the
    next step boundary, after a checkpoint when ``checkpoint.save_on_exit`` is set.
    """

    def __init__(self, config: Config, stop: threading.Event | None = None):
        self.config = config
        self.stop = stop
        t = config.train
        p = config.parallel
        # refuse a layout that does not fit the processes before any process group starts
        check_layout(int(os.environ.get("WORLD_SIZE", "1")), p.tp, p.pp, p.cp, p.ep)
        self.device = pick_device(t.device)
        init_distributed(self.device)
        self.parallel = build_parallel_state(config)
        self.tp = self.parallel.tensor_parallel
        dp = self.parallel.dp
        if t.global_batch_size % (t.micro_batch_size * dp.size):
            raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                              f"train.micro_batch_size × dp = {t.micro_batch_size}×{dp.size}")
        self.rank_batch = t.global_batch_size // dp.size
        self.micro_batches = self.rank_batch // t.micro_batch_size
        self.tokens_per_step = t.global_batch_size * config.data.seq_len
        torch.manual_seed(t.seed)
        self.stream, self.eos_id = open_training_data(config)
        self.stages, self.pipeline = self._build_model()
        self.optimizer = self._build_optimizer()
        self.forward_model = getattr(self.optimizer, "engine", self.stages[0])
        self.step = 0
        self.aux_metrics: dict[str, float] = {}
        self._aux_names: list[str] | None = None
        self._resume()

    def _build_model(self) -> tuple[list[HybridModel], PipelineSchedule | None]:
        """The model, or under pipeline parallelism this rank's stages and their schedule."""
        c, t = self.config, self.config.train
        build = functools.partial(HybridModel, c.model, seed=t.seed, device=self.device, tp=self.tp,
                                  ep=self.parallel.ep)
        if self.parallel.pp.size == 1:
            stages, pipeline = [build()], None
        else:
            world = Group(torch.distributed.group.WORLD, self.parallel.rank, self.parallel.world_size)
            costs = measured_layer_costs(c.model, t.micro_batch_size, c.data.seq_len, self.device, world)
            split = split_layers(c.model.pattern, c.parallel.pp * c.parallel.vpp, costs)
            specs = stage_specs(split, self.parallel)
            stages = [build(stage=spec) for spec in specs]
            pipeline = PipelineSchedule(stages, specs, self.parallel, self.device, self.micro_batches,
                                        loss_fn=self._pipeline_loss)
        for stage in stages:
            stage.recompute = t.recompute
            # auxiliary losses are weighted like each micro-batch's loss: divided by the number of
            # micro-batches here, by the pipeline schedule's gradient scaling under pp; times cp, as
            # each context-parallel rank's share of the loss (see _loss)
            stage.aux.grad_scale = self.parallel.cp.size * (1.0 if pipeline is not None else 1.0 / self.micro_batches)
        return stages, pipeline

    def _build_optimizer(self) -> DistributedOptimizer | DeepSpeedZero:
        """The builtin data-parallel AdamW (ZeRO-0/1), or DeepSpeed's ZeRO-1/2/3 (``parallel.zero_engine``)."""
        c, t, p = self.config, self.config.train, self.config.parallel
        adamw = {"lr": t.lr, "betas": (t.beta1, t.beta2), "eps": t.eps, "weight_decay": t.weight_decay}
        if p.zero_engine == "builtin":
            return DistributedOptimizer(self.named_parameters(), self.parallel, shard=p.zero == 1, **adamw)
        ds_config = deepspeed_config(p.zero, p.offload, t.micro_batch_size, self.micro_batches,
                                     self.parallel.grad.size, t.grad_clip)
        if p.deepspeed_config is not None:
            ds_config, changed = merge_user_config(ds_config, p.deepspeed_config)
            if self.is_logging_rank and changed:
                print("deepspeed config overrides:\n  " + "\n  ".join(changed))
        if self.is_logging_rank:
            run_dir = Path(c.log.dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1))
        return DeepSpeedZero(self.stages[0], self.named_parameters(), self.parallel, self.device, ds_config, **adamw)

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """This rank's parameters by their global names (the same under every layout)."""
        return [item for stage in self.stages for item in stage.named_parameters()]

    def saved_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """This rank's persistent buffers (e.g. MoE's expert bias), the same on every rank that holds them."""
        return [(name, value) for stage in self.stages for name, value in stage.state_dict().items()
                if name not in dict(stage.named_parameters())]

    @property
    def is_logging_rank(self) -> bool:
        return self.parallel.rank == 0

    # -- checkpoint state ------------------------------------------------------

    def _checkpoint_entries(self) -> dict:
        """Flat DCP entries: parameters and Adam moments as pieces of global tensors, plus run state."""
        entries = {f"model.{name}": GlobalPieces(sharding, value)
                   for name, sharding, value in self.optimizer.parameter_tensors()}
        entries |= {f"model.{name}": buffer for name, buffer in self.saved_buffers()}
        entries |= self.optimizer.checkpoint_state()
        entries["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            entries["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        entries["train.step"] = self.step
        entries |= {f"data.{key}": value for key, value in self.stream.state_dict().items()}
        return entries

    def _resume(self) -> None:
        mode = self.config.train.resume
        if mode == "none":
            return
        if mode == "auto":
            path = checkpoint.latest_checkpoint(self.config.checkpoint_dir)
            if path is None:
                return
        else:
            path = checkpoint.resolve_checkpoint(mode)
        saved = config_from_dict(checkpoint.read_config(path))
        if saved.model != self.config.model:
            diff = [f"model.{k}: {v} (checkpoint) vs {getattr(self.config.model, k)} (now)"
                    for k, v in vars(saved.model).items() if getattr(self.config.model, k) != v]
            raise CheckpointError(f"checkpoint {path} holds a different model: {'; '.join(diff)}; "
                                  f"use train.resume=none or another checkpoint.dir")
        entries = self._checkpoint_entries()
        if "rng.cuda" not in checkpoint.read_metadata(path).state_dict_metadata:
            entries.pop("rng.cuda", None)  # saved on a CPU (or converted): keep this GPU's generator as seeded
        checkpoint.load_checkpoint(path, entries)
        self.optimizer.after_checkpoint_load()
        torch.set_rng_state(entries["rng.cpu"])
        if "rng.cuda" in entries:
            torch.cuda.set_rng_state(entries["rng.cuda"], self.device)
        self.step = entries["train.step"]
        self.stream.load_state_dict({key[len("data."):]: value for key, value in entries.items()
                                     if key.startswith("data.")})
        if self.is_logging_rank:
            print(f"resumed from {path} at step {self.step}")

    def save(self) -> Path:
        c = self.config
        meta = {"world_size": self.parallel.world_size, "layout": vars(c.parallel).copy(),
                "tokens": self.step * self.tokens_per_step, "megamix_version": __version__}
        return checkpoint.save_checkpoint(c.checkpoint_dir, self.step, self._checkpoint_entries(), c.to_dict(),
                                          meta, keep=c.checkpoint.keep)

    # -- training --------------------------------------------------------------

    def _autocast(self):
        if self.config.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """This rank's share of a micro-batch's mean next-token cross-entropy (vocabulary-parallel under TP),
        times cp: gradients are averaged over dp × cp ranks, and the cp ranks' shares add up to the loss."""
        return self.parallel.cp.size * (vocab_parallel_cross_entropy(logits, targets, self.tp) * weights).sum()

    def _pipeline_loss(self, logits: torch.Tensor, targets_and_weights: torch.Tensor) -> torch.Tensor:
        """:meth:`_loss` of the last stage, whose targets and weights travel as one ``[batch, seq, 2]`` fp64 tensor
        (the schedule splits a single target tensor into micro-batches; token ids are exact in fp64)."""
        targets, weights = targets_and_weights.unbind(-1)
        return self._loss(logits, targets.long(), weights.float())

    def compute_gradients(self) -> float:
        """Forward and backward over this rank's micro-batches; gradients reduced; returns the global mean loss."""
        t = self.config.train
        batch = self.stream.next_batch(t.global_batch_size)
        mine = batch.narrow(0, self.parallel.dp.rank * self.rank_batch, self.rank_batch).to(self.device)
        micros = [split_micro_batch(micro, self.parallel.cp, self.eos_id, self.config.parallel.cp_comm)
                  for micro in mine.split(t.micro_batch_size)]
        if self.pipeline is not None:
            targets = torch.cat([torch.stack([m.targets.double(), m.weights.double()], dim=-1) for m in micros])
            with self._autocast():
                total_loss = self.pipeline.step(torch.cat([m.inputs for m in micros]), targets,
                                                [m.sequence for m in micros])
            total_loss = torch.tensor(total_loss, device=self.device)
        else:
            total_loss = torch.zeros((), device=self.device)
            for micro in micros:
                with self._autocast():
                    logits = self.forward_model(micro.inputs, micro.sequence)
                loss = self._loss(logits, micro.targets, micro.weights)
                self.optimizer.backward(loss / self.micro_batches)
                total_loss += loss.detach()
            total_loss /= self.micro_batches
        # each rank holds cp × its share: the sum over dp × cp ranks / (dp · cp) is the mean over dp
        all_reduce(total_loss, self.parallel.grad).div_(self.parallel.grad.size)
        self.optimizer.reduce_gradients()
        self._update_expert_biases()
        self.aux_metrics = self._pop_aux_metrics()
        return total_loss.item()

    def _update_expert_biases(self) -> None:
        """Auxiliary-loss-free balancing: each MoE layer moves its expert bias by the step's load
        over all data-parallel ranks, so every replica keeps the same bias."""
        layers = [m for stage in self.stages for m in stage.modules() if isinstance(m, MoE) and m.bias_update_rate > 0]
        if layers:
            counts = all_reduce(torch.stack([m.tokens_per_expert for m in layers]), self.parallel.grad)
            for layer, layer_counts in zip(layers, counts):
                layer.update_expert_bias(layer_counts)

    def _pop_aux_metrics(self) -> dict[str, float]:
        """The mean of each auxiliary value (MoE/MoH losses, load statistics) recorded this step,
        over every layer and rank that recorded it (stages differ in which layers they hold)."""
        local = [stage.aux.pop() for stage in self.stages]
        if self._aux_names is None:  # the same every step: the model's routed layers record them
            names = sorted({name for values in local for name in values})
            if self.parallel.world_size > 1:
                gathered = [None] * self.parallel.world_size
                torch.distributed.all_gather_object(gathered, names)
                names = sorted(set().union(*gathered))
            self._aux_names = names
        names = self._aux_names
        if not names:
            return {}
        sums = torch.zeros(2, len(names), dtype=torch.float64, device=self.device)
        for values in local:
            for i, name in enumerate(names):
                if name in values:
                    sums[0, i] += values[name].item()
                    sums[1, i] += 1
        world = Group(torch.distributed.group.WORLD, self.parallel.rank, self.parallel.world_size)
        sums = all_reduce(sums, world)
        return {name: (sums[0, i] / sums[1, i]).item() for i, name in enumerate(names)}

    def train_step(self) -> tuple[float, float]:
        """One optimizer step; returns (mean loss, gradient norm before clipping)."""
        t = self.config.train
        set_learning_rate(self.optimizer, learning_rate(self.step, t))
        loss = self.compute_gradients()
        grad_norm = self.optimizer.clip_grad_norm(t.grad_clip)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            latest = checkpoint.latest_checkpoint(self.config.checkpoint_dir)
            raise TrainingError(f"loss is {loss} (gradient norm {grad_norm}) at step {self.step + 1}; stopped "
                                f"without saving; last good checkpoint: {latest or 'none'}. Try a lower train.lr "
                                f"or train.precision=fp32")
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.step += 1
        return loss, grad_norm

    def run(self) -> list[float]:
        c = self.config
        logger = None
        if self.is_logging_rank:
            run_dir = Path(c.log.dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(c.to_yaml())
            logger = MetricsLogger(run_dir, c.train.steps, self.step, c.log.tensorboard, c.log.progress)
        peak = peak_flops(self.device, c.train.precision)
        flops_per_token = HybridModel(c.model, device=torch.device("meta")).flops_per_token(c.data.seq_len)
        losses = []
        try:
            while self.step < c.train.steps:
                start = time.perf_counter()
                loss, grad_norm = self.train_step()
                elapsed = time.perf_counter() - start
                bubble = self.pipeline.bubble() if self.pipeline is not None else None
                losses.append(loss)
                if logger is not None:
                    logger.advance()
                    if self.step % c.log.interval == 0 or self.step == c.train.steps:
                        logger.log(self._record(loss, grad_norm, elapsed, flops_per_token, peak, bubble))
                interval = c.checkpoint.interval
                saved = (interval and self.step % interval == 0) or self.step == c.train.steps
                if saved:
                    self.save()
                if self._stop_agreed():
                    if c.checkpoint.save_on_exit and not saved:
                        self.save()
                    break
        finally:
            if logger is not None:
                logger.close()
        return losses

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop: all ranks get the same answer, so they leave at the same step."""
        if self.stop is None:
            return False
        flag = torch.tensor([float(self.stop.is_set())], device=self.device)
        world = Group(torch.distributed.group.WORLD, self.parallel.rank, self.parallel.world_size)
        return bool(all_reduce(flag, world, op=torch.distributed.ReduceOp.MAX).item())

    def _record(self, loss: float, grad_norm: float, elapsed: float, flops_per_token: int,
                peak: float | None, bubble: float | None) -> dict:
        tokens_per_s = self.tokens_per_step / elapsed
        record = {"step": self.step, "loss": loss, "lr": learning_rate(self.step - 1, self.config.train),
                  "grad_norm": grad_norm, "tokens": self.step * self.tokens_per_step,
                  "tokens_per_s": tokens_per_s, "step_time_s": elapsed, "mem_peak_mb": peak_memory_mb(self.device)}
        if bubble is not None:
            record["pp_bubble"] = bubble
        record |= self.aux_metrics
        if peak is not None:
            record["mfu"] = flops_per_token * tokens_per_s / (peak * self.parallel.world_size)
        return record


def train(config: Config, stop: threading.Event | None = None) -> list[float]:
    """Train ``config`` to completion (or until ``stop`` is set) in this process group; returns the losses run."""
    return Trainer(config, stop).run()
