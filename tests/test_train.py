"""The trainer end to end on one CPU process: loss falls, metrics, checkpoints, resume, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megamix import checkpoint
from megamix.cli import main
from megamix.config import load_config
from megamix.errors import CheckpointError, TrainingError
from megamix.train import Trainer, train
from megamix.train.schedule import learning_rate

BASE = "configs/tiny-dense.yaml"
TINY = ["model.pattern=*-*-", "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=128",
        "model.vocab_size=4096", "data.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.warmup_steps=2", "train.lr=3e-3", "log.interval=1", "log.tensorboard=false"]


def tiny_config(tmp_path, cache, *overrides):
    return load_config(BASE, [*TINY, f"data.cache_dir={cache}", f"log.dir={tmp_path / 'run'}", *overrides])


def read_metrics(run_dir):
    """Last record per step (a resumed run logs the steps after its checkpoint again)."""
    records = {}
    for line in Path(run_dir, "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def test_loss_falls_and_metrics_are_logged(tmp_path, builtin_cache):
    config = tiny_config(tmp_path, builtin_cache, "train.steps=40")
    losses = train(config)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5, losses
    records = read_metrics(config.log.dir)
    assert sorted(records) == list(range(1, 41))
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s", "mem_peak_mb"):
        assert key in records[40], key
    assert records[40]["tokens"] == 40 * 8 * 32
    assert records[40]["loss"] == losses[-1]
    assert (Path(config.log.dir) / "config.yaml").is_file()
    # saved at the end, and inspect reads it
    assert checkpoint.latest_checkpoint(config.checkpoint_dir).name == "step_40"


def test_inspect_summarizes_checkpoint(tmp_path, builtin_cache, capsys):
    config = tiny_config(tmp_path, builtin_cache, "train.steps=2")
    trainer = Trainer(config)
    trainer.run()
    assert main(["inspect", str(config.checkpoint_dir), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "step        2 (512 tokens)" in out
    assert f"parameters  {trainer.stages[0].num_parameters():,} in" in out
    assert "layers.0.mixer.qkv_proj.weight" in out


def test_bf16_and_recompute_train(tmp_path, builtin_cache):
    losses = train(tiny_config(tmp_path, builtin_cache, "train.steps=3", "train.precision=bf16",
                               "train.recompute=true"))
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)


def test_keep_prunes_old_checkpoints(tmp_path, builtin_cache):
    config = tiny_config(tmp_path, builtin_cache, "train.steps=6", "checkpoint.interval=2", "checkpoint.keep=2")
    train(config)
    assert [p.name for p in checkpoint.list_checkpoints(config.checkpoint_dir)] == ["step_4", "step_6"]
    assert (config.checkpoint_dir / "latest").read_text().strip() == "step_6"


def test_killed_run_resumes_bit_for_bit(tmp_path, builtin_cache):
    steps = 40
    common = [*TINY, f"data.cache_dir={builtin_cache}", f"train.steps={steps}", "checkpoint.interval=4",
              "checkpoint.keep=0"]
    reference = train(load_config(BASE, [*common, f"log.dir={tmp_path / 'reference'}"]))

    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "megamix", "train", BASE, *common, f"log.dir={run_dir}"]
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = max(read_metrics(run_dir))
    assert killed_at < steps, "the run finished before it could be killed"

    resumed = train(load_config(BASE, [*common, f"log.dir={run_dir}"]))
    resumed_from = steps - len(resumed)
    assert resumed_from >= 4 and resumed_from % 4 == 0
    records = read_metrics(run_dir)
    assert [records[s]["loss"] for s in range(1, steps + 1)] == reference  # bit for bit


def test_nan_loss_stops_with_message_and_saves_nothing(tmp_path, builtin_cache):
    config = tiny_config(tmp_path, builtin_cache, "train.steps=20", "train.lr=1e12", "train.warmup_steps=0",
                         "train.grad_clip=0", "checkpoint.interval=1")
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) \(gradient norm \S+\) at step \d+; stopped without saving") as e:
        train(config)
    bad_step = int(str(e.value).split("at step ")[1].split(";")[0])
    saved = [int(p.name.split("_")[1]) for p in checkpoint.list_checkpoints(config.checkpoint_dir)]
    assert saved and max(saved) == bad_step - 1
    assert not list(config.checkpoint_dir.glob("*.partial"))


def test_resume_errors(tmp_path, builtin_cache):
    config = tiny_config(tmp_path, builtin_cache, "train.steps=1")
    train(config)
    changed = tiny_config(tmp_path, builtin_cache, "train.steps=2", "model.hidden_size=32")
    with pytest.raises(CheckpointError, match=r"different model: model.hidden_size: 64 \(checkpoint\) vs 32"):
        Trainer(changed)
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(tiny_config(tmp_path, builtin_cache, f"train.resume={tmp_path / 'nowhere'}"))
    (config.checkpoint_dir / "latest").write_text("step_99\n")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        Trainer(config)


def test_vocab_smaller_than_tokenizer_is_refused(tmp_path, builtin_cache, capsys):
    args = [*TINY, "model.vocab_size=1000", f"data.cache_dir={builtin_cache}", f"log.dir={tmp_path}"]
    # the builtin corpus is prepared per vocabulary size; point at the 4096 one explicitly
    prefix = next(builtin_cache.glob("builtin-*-4096")) / "stdlib"
    assert main(["train", "configs/tiny-dense.yaml", *args, f"data.datasets=[{prefix}]"]) == 2
    assert "model.vocab_size (1000) is smaller than the vocabulary of tokenizer" in capsys.readouterr().err


def test_layout_needing_more_processes_is_refused(tmp_path, builtin_cache, capsys):
    assert main(["train", "configs/tiny-dense.yaml", "parallel.tp=2", f"log.dir={tmp_path}"]) == 2
    assert "does not divide the world size 1" in capsys.readouterr().err


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules(schedule):
    cfg = load_config(None, [f"train.schedule={schedule}", "train.steps=100", "train.warmup_steps=10",
                             "train.lr=1.0", "train.min_lr=0.1", "train.decay_fraction=0.2"]).train
    lrs = [learning_rate(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    if schedule == "cosine":
        assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
        assert lrs[99] == pytest.approx(0.1, abs=1e-3)
    elif schedule == "wsd":
        assert lrs[10:80] == [1.0] * 70
        assert lrs[90] == pytest.approx(0.55) and lrs[99] == pytest.approx(0.145)
    else:
        assert lrs[10:] == [1.0] * 90
