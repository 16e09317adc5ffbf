"""The training loop: data → model → loss → optimizer → metrics and checkpoints.

One optimizer step consumes ``global_batch_size`` samples of ``seq_len + 1`` tokens
in ``global_batch_size / micro_batch_size`` micro-batches (gradient accumulation).
Sample ``i`` of the run is a pure function of (seed, i), and the checkpoint holds
the sample counter, optimizer state and RNG, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megamix import __version__, checkpoint
from megamix.config import Config, config_from_dict
from megamix.data import BlendedSamples, IndexedDataset, SampleStream, Tokenizer, default_cache_dir, ensure_builtin
from megamix.errors import CheckpointError, ConfigError, TrainingError
from megamix.models import HybridModel
from megamix.train.device import peak_flops, peak_memory_mb, pick_device
from megamix.train.metrics import MetricsLogger
from megamix.train.optim import build_optimizer, learning_rate, set_learning_rate


def check_layout(config: Config, world_size: int) -> None:
    """Refuse a layout that this process group cannot hold, before anything is built."""
    p = config.parallel
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ConfigError(f"parallel.tp × parallel.pp × parallel.cp = {p.tp}×{p.pp}×{p.cp} = {model_parallel} "
                          f"does not divide the world size {world_size}; start a multiple of {model_parallel} "
                          f"processes (e.g. torchrun --nproc-per-node {model_parallel})")
    if world_size > 1:
        raise ConfigError(f"world size {world_size}: megamix train runs in one process until the parallel "
                          f"layer library lands; run it without torchrun")


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
    """Single-process trainer; ``run()`` trains to ``train.steps`` and returns the losses of the steps it ran."""

    def __init__(self, config: Config):
        check_layout(config, int(os.environ.get("WORLD_SIZE", "1")))
        self.config = config
        t = config.train
        self.device = pick_device(t.device)
        torch.manual_seed(t.seed)
        self.stream = open_training_data(config)
        self.model = HybridModel(config.model, seed=t.seed, device=self.device)
        self.model.recompute = t.recompute
        self.optimizer = build_optimizer(self.model, t)
        self.micro_batches = t.global_batch_size // t.micro_batch_size
        self.tokens_per_step = t.global_batch_size * config.data.seq_len
        self.step = 0
        self._resume()

    # -- checkpoint state ------------------------------------------------------

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"model": model_state, "optim": optim_state, "rng": rng,
                "train": {"step": self.step, **self.stream.state_dict()}}

    def _load_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        train_state = dict(state["train"])
        self.step = train_state.pop("step")
        self.stream.load_state_dict(train_state)

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
        state = self._state()
        checkpoint.load_checkpoint(path, state)
        self._load_state(state)
        print(f"resumed from {path} at step {self.step}")

    def save(self) -> Path:
        c = self.config
        meta = {"world_size": 1, "layout": vars(c.parallel).copy(), "tokens": self.step * self.tokens_per_step,
                "megamix_version": __version__}
        return checkpoint.save_checkpoint(c.checkpoint_dir, self.step, self._state(), c.to_dict(), meta,
                                          keep=c.checkpoint.keep)

    # -- training --------------------------------------------------------------

    def _autocast(self):
        if self.config.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over all micro-batches; returns (mean loss, grad norm before clipping)."""
        t = self.config.train
        set_learning_rate(self.optimizer, learning_rate(self.step, t))
        total_loss = torch.zeros((), device=self.device)
        for _ in range(self.micro_batches):
            batch = self.stream.next_batch(t.micro_batch_size).to(self.device, non_blocking=True)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with self._autocast():
                logits = self.model(inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            (loss / self.micro_batches).backward()
            total_loss += loss.detach()
        loss = total_loss.item() / self.micro_batches
        if not math.isfinite(loss):
            latest = checkpoint.latest_checkpoint(self.config.checkpoint_dir)
            raise TrainingError(f"loss is {loss} at step {self.step + 1}; stopped without saving; "
                                f"last good checkpoint: {latest or 'none'}. Try a lower train.lr or "
                                f"train.precision=fp32")
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, grad_norm

    def run(self) -> list[float]:
        c = self.config
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
                logger.advance()
                if self.step % c.log.interval == 0 or self.step == c.train.steps:
                    tokens_per_s = self.tokens_per_step / elapsed
                    record = {"step": self.step, "loss": loss, "lr": learning_rate(self.step - 1, c.train),
                              "grad_norm": grad_norm, "tokens": self.step * self.tokens_per_step,
                              "tokens_per_s": tokens_per_s, "step_time_s": elapsed,
                              "mem_peak_mb": peak_memory_mb(self.device)}
                    if peak is not None:
                        record["mfu"] = flops_per_token * tokens_per_s / peak
                    logger.log(record)
                interval = c.checkpoint.interval
                if (interval and self.step % interval == 0) or self.step == c.train.steps:
                    self.save()
        finally:
            logger.close()
        return losses


def train(config: Config) -> list[float]:
    """Train ``config`` to completion in this process; returns the losses of the steps run."""
    return Trainer(config).run()
