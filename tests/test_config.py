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
    f.write_text('[train]\nseed = 7\nrun_dir = "r"\n[loader]\nbatch_size = 8\n')
    cfg = load_config(f, ["--train.seed", "9", "--loader.num_workers=0"])
    assert (cfg.train.seed, cfg.train.run_dir, cfg.loader.batch_size, cfg.loader.num_workers) == (9, "r", 8, 0)
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
        (["--loader.batch_size", "big"], "loader.batch_size: expected an integer"),
        (["--data.val_frac", "0.6", "--data.test_frac", "0.5"], "sum to less than 1"),
        (["--data.k_folds", "3", "--data.fold", "3"], "data.fold must be in [0, 3)"),
        (["--train.mixed_precision", "fp8"], "train.mixed_precision"),
        (["--loader.input_size", "512"], "cannot exceed data.image_size"),
        (["--train.seed"], "has no value"),
        (["--product.tta_views", "0"], "product.tta_views must be >= 1"),
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
    (["--selection.best_metric", "aurco"], "selection.best_metric = 'aurco' is not a validation metric"),
    (["--schedule.plateau_metric", "los"], "schedule.plateau_metric = 'los' is not a validation metric"),
    (["--selection.best_metric", "source/kermany/auroc"], "is not a validation metric"),  # no such source
    (["--selection.best_mode", "up"], 'selection.best_mode must be "", "min" or "max"'),
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
    cfg = load_config(TINY, ["--selection.best_metric", "view/LATERAL/auroc"])
    assert cfg.selection.best_metric == "view/LATERAL/auroc"


# ----------------------------------------------------------------------------- every number checked


def _numeric_fields():
    """(override path, name in messages, type) of every int/float field, list items included."""
    import dataclasses
    from typing import get_type_hints

    from cxr_dist.config import PhaseConfig

    for section in dataclasses.fields(Config):
        cls = get_type_hints(Config)[section.name]
        for name, tp in get_type_hints(cls).items():
            if tp in (int, float):
                yield f"{section.name}.{name}", f"{section.name}.{name}", tp
    for name, tp in get_type_hints(PhaseConfig).items():
        if tp in (int, float):
            yield f"train.phases.0.{name}", f"train.phases[0].{name}", tp


@pytest.mark.parametrize("path, name, tp", list(_numeric_fields()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_number_is_range_checked(path, name, tp):
    """nan/inf passed validation (--train.phases.0.lr nan trained on NaN); so did a negative weight
    decay, plateau_factor 5, dropout 2.0, input_size 0, model.hidden 0. Every numeric field has a
    range: an absurd value is refused naming the field (a new numeric field needs its range line)."""
    absurd = ["-1000000000"] + (["nan", "inf", "-inf"] if tp is float else [])
    for text in absurd:
        with pytest.raises(ConfigError, match=re.escape(name)) as e:
            load_config(None, [f"--{path}", text])
        if text in ("nan", "inf"):
            assert f"{name} must be a finite number, not {text}" in str(e.value)


@pytest.mark.parametrize("override, message", [
    (["--train.phases.0.lr", "nan"], "train.phases[0].lr must be a finite number, not nan"),
    (["--train.phases.1.backbone_lr", "inf"], "train.phases[1].backbone_lr must be a finite number, not inf"),
    (["--optimizer.weight_decay", "-0.01"], "optimizer.weight_decay must be >= 0"),
    (["--schedule.plateau_factor", "5"], "schedule.plateau_factor must be in (0, 1)"),
    (["--schedule.plateau_factor", "0"], "schedule.plateau_factor must be in (0, 1)"),
    (["--model.dropout", "2.0"], "model.dropout must be in [0, 1)"),
    (["--loader.input_size", "0"], "loader.input_size must be >= 32"),
    (["--model.hidden", "0"], "model.hidden must be >= 1"),
    (["--model.modality_dropout", "1.0"], "model.modality_dropout must be in [0, 1)"),
    (["--model.max_tokens", "0"], "model.max_tokens must be >= 1"),
    (["--model.kind", "video"], "model.kind must be one of 'image', 'text', 'image+text'"),
    (["--model.text_pooling", "max"], "model.text_pooling must be one of 'mean', 'cls', 'last'"),
    (["--model.text_missing", "ignore"], "model.text_missing must be one of 'dropout', 'refuse'"),
    (["--train.phases.0.unfreeze_text_layers", "-1"], "train.phases[0].unfreeze_text_layers must be >= 0"),
    (["--train.phases.1.text_lr", "-1e-5"], "train.phases[1].text_lr must be >= 0"),
    (["--data.seed", "-1"], "data.seed must be >= 0"),
    (["--model.num_classes", "3"], "model.num_classes must be 2"),
])
def test_bad_numbers_and_words_are_refused_by_name(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, override)
    assert message in str(e.value)


def test_nan_in_a_file_and_in_a_source_weight(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[train]\nweight_decay = nan\n[[data.sources]]\nname = "a"\npath = "x"\nweight = inf\n'
                 '[[train.phases]]\nlr = -inf\n')
    with pytest.raises(ConfigError) as e:
        load_config(f)
    text = str(e.value)
    for name in ("optimizer.weight_decay", "data.sources[0].weight", "train.phases[0].lr"):
        assert f"{name} must be a finite number" in text, text
    assert "weight must be > 0" not in text  # one message per problem


def test_every_problem_is_refused_before_any_work(tmp_path):
    """cxr-dist prepare (like train) loads the config first: nothing is read or written."""
    from cxr_dist.data import prepare

    with pytest.raises(ConfigError, match=re.escape("train.phases[0].lr must be a finite number")):
        prepare.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"),
                      "--train.phases.0.lr", "nan"])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- list overrides


@pytest.mark.parametrize("override, message", [
    (["--train.phases.5.lr", "0.1"], "override --train.phases.5.lr: there is no train.phases entry 5: it has 2 "
                                     "entries (0..1)"),
    (["--data.sources.0.path", "x"], "override --data.sources.0.path: there is no data.sources entry 0: it has none"),
    (["--train.phases.x.lr", "0.1"], "'x' is not an entry number"),
    (["--train.phases.-1.lr", "0.1"], "is not an entry number"),
    (["--tracking.tags.0", "a=b"], "give the whole list instead"),
    (["--train.seed.x", "1"], "train.seed is a single value"),
])
def test_an_override_of_a_missing_list_entry_is_a_clear_error(override, message):
    """These crashed with IndexError (a traceback) before."""
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert message in str(e.value)
    if "no train.phases entry" in message or "no data.sources entry" in message:
        assert "TOML file" in str(e.value) and "[[" in str(e.value)


def test_an_override_reaches_an_entry_of_the_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[[data.sources]]\nname = "a"\npath = "x"\n[[data.sources]]\nname = "b"\npath = "y"\n'
                 '[[train.phases]]\nname = "only"\nepochs = 2\n')
    cfg = load_config(f, ["--data.sources.1.path", "z", "--train.phases.0.lr", "0.01"])
    assert [s.path for s in cfg.data.sources] == ["x", "z"] and cfg.train.phases[0].lr == 0.01
    with pytest.raises(ConfigError, match=r"no train.phases entry 1: it has 1 entry \(0..0\)"):
        load_config(f, ["--train.phases.1.lr", "0.01"])


def test_help_and_examples_show_overrides_that_exist():
    """--train.lr does not exist (a learning rate belongs to a phase); the docstring (--help) says
    how list entries are overridden and where new ones go."""
    import cxr_dist.config as config

    assert "--train.lr" in config.__doc__ and "no ``--train.lr``" in config.__doc__
    assert "[[train.phases]]" in config.__doc__ and "TOML file" in config.__doc__
    for line in (ROOT / "slurm" / "train.sh").read_text().splitlines():
        assert not re.search(r"--train\.lr\b", line), line
    with pytest.raises(ConfigError) as e:
        parse_overrides(["train.seed"])
    assert "--train.lr " not in str(e.value)
    load_config(None, ["--train.phases.0.lr", "3e-4", "--data.shards_dir", "S"])  # the example loads


# ----------------------------------------------------------------------------- sections by concern


def test_every_field_lives_in_one_section_and_moved_names_exist():
    """The sections split the settings: no field name appears in two of them (an old key moves to
    exactly one place), and every entry of MOVED names a field of its new section."""
    import dataclasses

    from cxr_dist.config import MOVED

    sections = {f.name: {g.name for g in dataclasses.fields(f.type if not isinstance(f.type, str) else
                                                              type(getattr(Config(), f.name)))}
                for f in dataclasses.fields(Config)}
    for old, fields in MOVED.items():
        for name, new in fields.items():
            assert name in sections[new] and name not in sections[old], (old, name, new)
    baked = {"image_size", "resize", "intensity", "seed", "val_frac", "test_frac", "k_folds", "no_indexing",
             "samples_per_shard", "findings"}
    assert baked <= sections["data"]  # what prepare bakes in stays in [data]
    assert {"batch_size", "input_size", "text_fields", "decode_on"} <= sections["loader"]


def test_old_keys_load_into_their_sections_with_a_deprecation_message(tmp_path, caplog):
    f = tmp_path / "old.toml"
    f.write_text('[data]\nimage_size = 128\ninput_size = 96\nbatch_size = 8\ntext_fields = ["indication"]\n'
                 '[train]\nseed = 3\nbest_metric = "auroc"\nweight_decay = 0.01\nplateau_patience = 5\n'
                 'tta_views = 4\nearly_stop_patience = 2\n')
    with caplog.at_level("WARNING", logger="cxr_dist.config"):
        cfg = load_config(f, ["--data.num_workers", "0", "--train.cam_images", "0"])
    assert (cfg.data.image_size, cfg.loader.input_size, cfg.loader.batch_size, cfg.loader.num_workers) == (128, 96, 8, 0)
    assert cfg.loader.text_fields == ("indication",) and cfg.train.seed == 3
    assert (cfg.selection.best_metric, cfg.selection.early_stop_patience) == ("auroc", 2)
    assert (cfg.optimizer.weight_decay, cfg.schedule.plateau_patience) == (0.01, 5)
    assert (cfg.product.tta_views, cfg.product.cam_images) == (4, 0)
    said = caplog.text
    assert "data.batch_size -> loader.batch_size" in said and "train.best_metric -> selection.best_metric" in said
    assert "--data.num_workers is an old name" in said and "--loader.num_workers" in said
    # The same config in the new layout loads to the same Config, and says nothing.
    caplog.clear()
    new = tmp_path / "new.toml"
    new.write_text(dump_toml(cfg))
    with caplog.at_level("WARNING", logger="cxr_dist.config"):
        assert load_config(new) == cfg
    assert "old" not in caplog.text


def test_an_old_and_a_new_key_for_one_setting_is_refused(tmp_path):
    f = tmp_path / "both.toml"
    f.write_text("[data]\nbatch_size = 8\n[loader]\nbatch_size = 16\n")
    with pytest.raises(ConfigError, match="data.batch_size and loader.batch_size are the same setting"):
        load_config(f)


def test_a_checkpoint_of_the_old_layout_reads_section_by_section():
    """A checkpoint's meta["config"] from before the sections: `section` finds each setting."""
    from cxr_dist.config import LoaderConfig, ProductConfig, SelectionConfig, DataConfig, section, to_dict

    old = to_dict(Config())
    for name in ("loader", "optimizer", "schedule", "selection", "product"):
        moved = old.pop(name)
        (old["data"] if name == "loader" else old["train"]).update(moved)
    old["data"].update(input_size=96, text_fields=["indication"])
    old["train"].update(tta_views=5, best_metric="auroc")
    assert section(old, LoaderConfig) == LoaderConfig(input_size=96, text_fields=("indication",))
    assert section(old, ProductConfig).tta_views == 5 and section(old, SelectionConfig).best_metric == "auroc"
    assert section(old, DataConfig) == DataConfig()
