"""ZeRO through DeepSpeed (``parallel.zero_engine=deepspeed``) trains like the builtin engine (gloo, CPU workers).

DeepSpeed builds a small communication op on its first use (cached under ~/.cache/torch_extensions), so
the cases are few and each checks several things.
"""

import json

import pytest

from megamix.config import load_config
from megamix.errors import ConfigError
from megamix.parallel.deepspeed_zero import deepspeed_config, merge_user_config
from megamix.testing import run_distributed
from megamix.train import Trainer

TRAIN = ["model.pattern=*-*-", "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=96", "model.vocab_size=4096", "data.seq_len=32", "train.micro_batch_size=2",
         "train.global_batch_size=8", "train.warmup_steps=2", "train.lr=3e-3", "train.steps=4",
         "checkpoint.interval=2", "checkpoint.keep=0", "log.tensorboard=false"]
DEEPSPEED = ["parallel.zero_engine=deepspeed"]
# Mamba-2, Lightning, attention and MoE layers with a tied embedding: ZeRO-3 gathers what each layer reads
HYBRID = ["model.pattern=M-L*E", "model.tie_embeddings=true", "model.mamba.head_dim=16", "model.mamba.state_size=16",
          "model.mamba.num_groups=2", "model.moe.num_experts=4", "model.moe.ffn_hidden_size=64"]
RTOL = 1e-5


def train_run(cache, log_dir, overrides):
    """(loss, gradient norm) of each step of a short run; checkpoints at steps 2 and 4."""
    config = load_config("configs/tiny-dense.yaml", [*TRAIN, f"data.cache_dir={cache}", f"log.dir={log_dir}",
                                                     *overrides])
    trainer = Trainer(config)
    steps = []
    while trainer.step < config.train.steps:
        steps.append(trainer.train_step())
        if trainer.step % config.checkpoint.interval == 0:
            trainer.save()
    return steps


def assert_same_run(steps, reference):
    assert [loss for loss, _ in steps] == pytest.approx([loss for loss, _ in reference], rel=RTOL)
    assert [norm for _, norm in steps] == pytest.approx([norm for _, norm in reference], rel=RTOL)


@pytest.mark.parametrize("world, overrides, model", [
    (2, ["parallel.zero=1"], []),
    (2, ["parallel.zero=2", "parallel.offload=optimizer"], []),
    (4, ["parallel.zero=3", "parallel.tp=2"], HYBRID),
], ids=["zero1-dp2", "zero2-dp2-offload", "zero3-tp2xdp2-hybrid"])
def test_deepspeed_trains_like_the_builtin_engine(tmp_path, builtin_cache, world, overrides, model):
    reference = train_run(builtin_cache, tmp_path / "builtin", model)
    run_dir = tmp_path / "deepspeed"
    for steps in run_distributed(train_run, world, builtin_cache, run_dir, [*DEEPSPEED, *overrides, *model],
                                 timeout=600):
        assert_same_run(steps, reference)
    saved = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert saved["zero_optimization"]["stage"] == int(overrides[0][-1])
    assert saved["train_batch_size"] == 8 and saved["gradient_clipping"] == 1.0


def test_runs_resume_across_engines(tmp_path, builtin_cache):
    reference = train_run(builtin_cache, tmp_path / "builtin", [])
    # builtin step 2 → DeepSpeed ZeRO-3 on 2 ranks
    from_builtin = [*DEEPSPEED, "parallel.zero=3", f"train.resume={tmp_path / 'builtin/checkpoints/step_2'}"]
    for steps in run_distributed(train_run, 2, builtin_cache, tmp_path / "to-deepspeed", from_builtin, timeout=600):
        assert_same_run(steps, reference[2:])
    # DeepSpeed ZeRO-2 step 2 → builtin in one process
    run_distributed(train_run, 2, builtin_cache, tmp_path / "deepspeed", [*DEEPSPEED, "parallel.zero=2"], timeout=600)
    steps = train_run(builtin_cache, tmp_path / "to-builtin", [f"train.resume={tmp_path / 'deepspeed/checkpoints/step_2'}"])
    assert_same_run(steps, reference[2:])


def test_user_deepspeed_config_overrides_and_conflicts(tmp_path):
    generated = deepspeed_config(2, "none", micro_batch_size=2, micro_batches=2, data_parallel=2, grad_clip=1.0)
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_clipping": 0.5, "zero_optimization": {"stage": 2,
                                                                                 "overlap_comm": True}}))
    merged, changed = merge_user_config(generated, str(user))
    assert merged["gradient_clipping"] == 0.5 and merged["zero_optimization"]["overlap_comm"]
    assert any(line.startswith("gradient_clipping: 1.0 (megamix) -> 0.5") for line in changed)
    user.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match="sets train_batch_size=64, but megamix derives 8"):
        merge_user_config(generated, str(user))


@pytest.mark.parametrize("overrides, message", [
    (["parallel.zero=3"], "parallel.zero: the builtin engine has 0 (replicated optimizer) or 1"),
    (["parallel.offload=optimizer"], "parallel.offload and parallel.deepspeed_config need parallel.zero_engine"),
    ([*DEEPSPEED, "parallel.zero=3", "parallel.pp=2"], "parallel.pp=2 with parallel.zero_engine=deepspeed"),
    ([*DEEPSPEED, "parallel.ep=2", "model.pattern=*E"], "parallel.ep=2 with parallel.zero_engine=deepspeed"),
    ([*DEEPSPEED, "parallel.tp=2", "parallel.sequence_parallel=true"], "parallel.sequence_parallel with"),
    ([*DEEPSPEED, "parallel.tp=4", "model.num_kv_heads=2"], "model.num_kv_heads must be divisible by parallel.tp"),
    ([*DEEPSPEED, "parallel.zero=2", "parallel.offload=params"], "parallel.offload=params needs parallel.zero=3"),
    ([*DEEPSPEED, "parallel.zero=0"], "parallel.zero: DeepSpeed has ZeRO 1, 2 or 3, got 0"),
], ids=["zero3-builtin", "offload-builtin", "pp", "ep", "sp", "replicated-kv", "offload-params-zero2", "zero0"])
def test_combinations_deepspeed_cannot_do_are_refused(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)
