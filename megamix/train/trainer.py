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
import math
import time
from pathlib import Path

import torch

from megamix import __version__, checkpoint
from megamix.config import Config, config_from_dict
from megamix.data import BlendedSamples, IndexedDataset, SampleStream, Tokenizer, default_cache_dir, ensure_builtin
from megamix.errors import CheckpointError, ConfigError, TrainingError
from megamix.models import HybridModel
from megamix.parallel import DistributedOptimizer, ParallelState, init_distributed, sharding_of
from megamix.parallel import vocab_parallel_cross_entropy
from megamix.parallel.checkpointing import GlobalPieces
from megamix.parallel.comm import all_reduce
from megamix.train.device import peak_flops, peak_memory_mb, pick_device
from megamix.train.metrics import MetricsLogger
from megamix.train.schedule import learning_rate, set_learning_rate


def build_parallel_state(config: Config) -> ParallelState:
    """Join the process group (under torchrun) and build the layout's groups; refuse what is not built yet."""
    p = config.parallel
    for key, issue in (("pp", "pipeline parallelism"), ("cp", "context parallelism"), ("ep", "expert parallelism")):
        if getattr(p, key) > 1:
            raise ConfigError(f"parallel.{key}={getattr(p, key)}: {issue} is not available yet; use parallel.{key}=1")
    return ParallelState.create(tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep, sequence_parallel=p.sequence_parallel)


def open_training_data(config: Config) -> SampleStream:
    """The blended sample stream of ``data.datasets``; ``builtin`` is prepared on first use."""
    d = config.data
    cache = d.cache_dir or default_cache_dir()
    prefixes = [ensure_builtin(cache, config.model.vocab_size) if ds.path == "builtin" else ds.path
                for ds in d.datasets]
    tokenizer_path = d.tokenizer or f"{prefixes[0]}.model"
    if d.tokenizer is not None or Path(tokenizer_path).is_file():
        vocab = Tokenizer.load(tokenizer_path).vocab_size
        if vocab > config.model.vocab_size:
            raise ConfigError(f"model.vocab_size ({config.model.vocab_size}) is smaller than the vocabulary "
                              f"of tokenizer {tokenizer_path} ({vocab}); set model.vocab_size={vocab} or more")
    datasets = [(IndexedDataset(prefix), ds.weight) for prefix, ds in zip(prefixes, d.datasets)]
    return SampleStream(BlendedSamples(datasets, d.seq_len, config.train.seed))


class Trainer:
    """Trains ``config`` in this process group; ``run()`` trains to ``train.steps`` and returns the losses it ran."""

    def __init__(self, config: Config):
        self.config = config
        t = config.train
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
        self.stream = open_training_data(config)
        self.model = HybridModel(config.model, seed=t.seed, device=self.device, tp=self.tp)
        self.model.recompute = t.recompute
        self.optimizer = DistributedOptimizer(self.model.named_parameters(), self.parallel, lr=t.lr,
                                              betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay,
                                              shard=config.parallel.zero == 1)
        self.step = 0
        self._resume()

    @property
    def is_logging_rank(self) -> bool:
        return self.parallel.rank == 0

    # -- checkpoint state ------------------------------------------------------

    def _checkpoint_entries(self) -> dict:
        """Flat DCP entries: parameters and Adam moments as pieces of global tensors, plus run state."""
        entries = {f"model.{name}": GlobalPieces(sharding_of(p, self.tp.size), p.data)
                   for name, p in self.model.named_parameters()}
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

    def compute_gradients(self) -> float:
        """Forward and backward over this rank's micro-batches; gradients reduced; returns the global mean loss."""
        t = self.config.train
        batch = self.stream.next_batch(t.global_batch_size)
        mine = batch.narrow(0, self.parallel.dp.rank * self.rank_batch, self.rank_batch).to(self.device)
        total_loss = torch.zeros((), device=self.device)
        for micro in mine.split(t.micro_batch_size):
            with self._autocast():
                logits = self.model(micro[:, :-1])
            loss = vocab_parallel_cross_entropy(logits, micro[:, 1:], self.tp).mean()
            (loss / self.micro_batches).backward()
            total_loss += loss.detach()
        total_loss /= self.micro_batches
        all_reduce(total_loss, self.parallel.grad).div_(self.parallel.grad.size)
        self.optimizer.reduce_gradients()
        return total_loss.item()

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
        flops_per_token = self.model.flops_per_token(c.data.seq_len)
        losses = []
        try:
            while self.step < c.train.steps:
                start = time.perf_counter()
                loss, grad_norm = self.train_step()
                elapsed = time.perf_counter() - start
                losses.append(loss)
                if logger is not None:
                    logger.advance()
                    if self.step % c.log.interval == 0 or self.step == c.train.steps:
                        logger.log(self._record(loss, grad_norm, elapsed, flops_per_token, peak))
                interval = c.checkpoint.interval
                if (interval and self.step % interval == 0) or self.step == c.train.steps:
                    self.save()
        finally:
            if logger is not None:
                logger.close()
        return losses

    def _record(self, loss: float, grad_norm: float, elapsed: float, flops_per_token: int,
                peak: float | None) -> dict:
        tokens_per_s = self.tokens_per_step / elapsed
        record = {"step": self.step, "loss": loss, "lr": learning_rate(self.step - 1, self.config.train),
                  "grad_norm": grad_norm, "tokens": self.step * self.tokens_per_step,
                  "tokens_per_s": tokens_per_s, "step_time_s": elapsed, "mem_peak_mb": peak_memory_mb(self.device)}
        if peak is not None:
            record["mfu"] = flops_per_token * tokens_per_s / (peak * self.parallel.world_size)
        return record


def train(config: Config) -> list[float]:
    """Train ``config`` to completion in this process group; returns the losses of the steps run."""
    return Trainer(config).run()
