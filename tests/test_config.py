"""Config loading, overrides and every validation error."""

from pathlib import Path

import pytest
import yaml

from megamix.cli import main
from megamix.config import Config, DatasetSpec, config_from_dict, load_config, parse_override
from megamix.errors import ConfigError


def test_defaults_and_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"hidden_size": 64, "num_heads": 4}, "train": {"lr": "3e-4"}}))
    config = load_config(path, ["train.steps=7", "model.pattern=*-*-", "parallel.sequence_parallel=true"])
    assert config.model.hidden_size == 64
    assert config.model.head_dim == 16 and config.model.num_kv_heads == 4
    assert config.model.ffn_hidden_size == 192  # 8/3·64 = 170 → next multiple of 64
    assert config.train.lr == pytest.approx(3e-4) and isinstance(config.train.lr, float)
    assert config.train.steps == 7
    assert config.model.pattern == "*-*-"
    assert config.parallel.sequence_parallel is True


def test_round_trip_through_dict():
    config = load_config(None, ["data.datasets=[{path: a, weight: 2}, b]"])
    assert config.data.datasets == [DatasetSpec("a", 2.0), DatasetSpec("b", 1.0)]
    assert config_from_dict(yaml.safe_load(config.to_yaml())) == config


def test_override_values_are_typed_by_the_schema():
    assert load_config(None, ["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)  # YAML 1.1 reads a string
    assert load_config(None, ["model.pattern=-"]).model.pattern == "-"  # YAML would read a list
    assert load_config(None, ["model.pattern=*-*-"]).model.pattern == "*-*-"
    assert load_config(None, ["train.recompute=true"]).train.recompute is True
    assert load_config(None, ["data.tokenizer=null"]).data.tokenizer is None
    assert load_config(None, ["data.tokenizer=tok.model"]).data.tokenizer == "tok.model"
    assert parse_override("train.steps=3")[0] == "train.steps"


@pytest.mark.parametrize("overrides, message", [
    (["trian.steps=3"], "trian: unknown key (did you mean train?)"),
    (["train.stpes=3"], "train.stpes: unknown key (did you mean train.steps?)"),
    (["train.steps=many"], "train.steps: expected an integer, got 'many'"),
    (["train.steps=1.5"], "train.steps: expected an integer"),
    (["train.recompute=3"], "train.recompute: expected true/false"),
    (["train.precision=fp16"], "train.precision: expected one of fp32, bf16"),
    (["model.num_heads=6", "model.num_kv_heads=4", "model.hidden_size=96"],
     "model.num_heads (6) must be divisible by model.num_kv_heads (4)"),
    (["model.pattern=*-X-"], "model.pattern: unknown layer kind 'X' at position 2"),
    (["model.pattern=||"], "model.pattern: needs at least one layer"),
    (["model.head_dim=15"], "model.head_dim must be even"),
    (["model.hidden_size=0"], "model.hidden_size: must be positive"),
    (["train.global_batch_size=12", "train.micro_batch_size=8"],
     "train.global_batch_size (12) must be a multiple of train.micro_batch_size (8)"),
    (["train.warmup_steps=-1"], "train.warmup_steps: must be >= 0"),
    (["train.min_lr=1", "train.lr=0.1"], "train.min_lr in [0, lr]"),
    (["data.datasets=[]"], "data.datasets: needs at least one dataset"),
    (["data.datasets=[{path: a, weight: -1}]"], "data.datasets[0].weight: must be positive"),
    (["data.datasets=[{weight: 1}]"], "data.datasets[0]:"),
    (["data.datasets=[{path: a, wieght: 1}]"], "data.datasets[0].wieght: unknown key (did you mean data.datasets[0].weight?)"),
    (["parallel.tp=0"], "parallel.tp: must be >= 1"),
    (["parallel.zero=3"], "parallel.zero: the builtin engine has 0 (replicated optimizer) or 1"),
    (["train.decay_fraction=0"], "train.decay_fraction: must be in (0, 1]"),
    (["log.interval=0"], "log.interval: must be positive"),
    (["train"], "override 'train': expected section.key=value"),
    (["train.steps.x=1"], "train.steps: expected an integer, got {'x': '1'}"),
])
def test_validation_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_shipped_configs_load():
    names = sorted(path.stem for path in Path("configs").glob("*.yaml"))
    assert {"tiny-dense", "tiny-hybrid", "tiny-moe", "tiny-moh", "llama-1b", "tnl-1b", "mamba2-hybrid-8b",
            "mixtral-8x7b"} <= set(names)
    for name in names:
        assert isinstance(load_config(f"configs/{name}.yaml"), Config)


def test_cli_reports_one_line_error(capsys):
    assert main(["train", "configs/tiny-dense.yaml", "train.steps=zero"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "megamix train: error: train.steps: expected an integer, got 'zero'"


def test_cli_dry_run_prints_resolved_config(capsys):
    assert main(["train", "configs/tiny-dense.yaml", "train.steps=3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert resolved["train"]["steps"] == 3 and resolved["model"]["pattern"] == "*-*-*-*-"
    assert "parameters" in out and "layout" in out


def test_cli_takes_overrides_after_flags(capsys):
    assert main(["train", "configs/tiny-dense.yaml", "--dry-run", "train.steps=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["steps"] == 3
    with pytest.raises(SystemExit):
        main(["train", "configs/tiny-dense.yaml", "--dry-run", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
