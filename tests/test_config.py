"""The typed config: defaults, file, overrides, validation messages, round trip."""
import re
from pathlib import Path

import pytest

from cxr_dist.config import Config, ConfigError, dump_toml, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"


def test_defaults_are_the_original_experiment():
    cfg = load_config()
    assert cfg.model.backbone == "efficientnet_b1" and cfg.model.hidden == 256 and cfg.model.dropout == 0.5
    assert [(p.epochs, p.unfreeze_blocks, p.lr) for p in cfg.train.phases] == [(15, 0, 1e-3), (25, 1, 1e-3)]
    assert cfg.train.total_epochs == 40


def test_precedence_cli_over_file_over_defaults(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[train]\nseed = 7\nrun_dir = "r"\n[data]\nbatch_size = 8\n')
    cfg = load_config(f, ["--train.seed", "9", "--data.num_workers=0"])
    assert (cfg.train.seed, cfg.train.run_dir, cfg.data.batch_size, cfg.data.num_workers) == (9, "r", 8, 0)
    assert cfg.data.image_size == 256  # untouched default


def test_phase_list_from_file_and_indexed_override(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(
        '[[train.phases]]\nname = "a"\nepochs = 2\n'
        '[[train.phases]]\nname = "b"\nepochs = 3\nunfreeze_blocks = 1\n'
        '[[train.phases]]\nname = "c"\nepochs = 1\nunfreeze_blocks = 3\nbackbone_lr = 1e-5\n'
    )
    cfg = load_config(f, ["--train.phases.1.epochs", "4"])
    assert [p.name for p in cfg.train.phases] == ["a", "b", "c"]
    assert cfg.train.total_epochs == 7 and cfg.train.phases[2].backbone_lr == 1e-5
    # an indexed override also works on the default list
    assert load_config(None, ["--train.phases.0.epochs", "2"]).train.total_epochs == 27


def test_list_override_parses_toml():
    assert parse_overrides(["--tracking.tags", '["fold=3"]']) == [("tracking.tags", ["fold=3"])]
    assert load_config(None, ["--tracking.tags", '["fold=3"]']).tracking.tags == ("fold=3",)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--train.nope", "1"], "unknown config key(s) train.nope"),
        (["--data.batch_size", "big"], "data.batch_size: expected an integer"),
        (["--data.val_frac", "0.6", "--data.test_frac", "0.5"], "sum to less than 1"),
        (["--data.k_folds", "3", "--data.fold", "3"], "data.fold must be in [0, 3)"),
        (["--train.mixed_precision", "fp8"], "train.mixed_precision"),
        (["--data.input_size", "512"], "cannot exceed data.image_size"),
        (["--train.seed"], "has no value"),
        (["--train.tta_views", "0"], "train.tta_views must be >= 1"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["--train.phases.1.unfreeze_blocks", "2", "--tracking.tags", '["a=b"]'])
    f = tmp_path / "resolved.toml"
    f.write_text(dump_toml(cfg))
    assert load_config(f) == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("override, message", [
    (["--train.log_every", "0"], "train.log_every must be >= 1"),  # divided by zero at the first step
    (["--train.best_metric", "aurco"], "train.best_metric = 'aurco' is not a validation metric"),
    (["--train.plateau_metric", "los"], "train.plateau_metric = 'los' is not a validation metric"),
    (["--train.best_metric", "source/kermany/auroc"], "is not a validation metric"),  # no such source
    (["--train.best_mode", "up"], 'train.best_mode must be "", "min" or "max"'),
])
def test_training_settings_are_checked_when_the_config_loads(override, message):
    """These failed only after a whole epoch (or divided by zero at the first step)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TINY, override)


def test_best_metric_mode_follows_the_metric():
    """best_metric = "loss" used to keep the *worst* epoch (always 'higher is better')."""
    from cxr_dist.train.loop import improved, metric_mode

    assert metric_mode("loss") == "min" and metric_mode("auroc") == "max" and metric_mode("loss", "max") == "max"
    assert improved(0.4, 0.5, "min") and not improved(0.6, 0.5, "min") and improved(0.6, 0.5, "max")
    assert improved(0.1, float("-inf"), "min")  # nothing yet: any defined value is the best so far
    assert not improved(float("nan"), float("-inf"), "max")
    cfg = load_config(TINY, ["--train.best_metric", "view/LATERAL/auroc"])
    assert cfg.train.best_metric == "view/LATERAL/auroc"
