"""Image + text: text in the shards, the leakage guard, the audit, the fused model, and real
training runs (1 and 2 processes) of an image+text model with a tiny BERT (random weights, saved
as a user's folder: no download).

The generated IU folder (tests/textgen.py) has IU's report sections: an indication that carries
some of the label (legitimate), and findings/impression that state it (the leak, as IU's do).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from cxr_dist.config import ConfigError, ModelConfig, load_config
from cxr_dist.data.index import load_index
from cxr_dist.data.text import check_text_fields, joined_text, leaky_fields, read_texts
from cxr_dist.eval.text_audit import audit
from cxr_dist.model.classifier import build_model
from tests.conftest import TINY, VENV_BIN, accelerate_launch, run_cmd, tiny_overrides
from tests.textgen import indication_of, make_text_dataset, make_tiny_bert

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(shards, tiny BERT folder, work folder)."""
    tmp = tmp_path_factory.mktemp("text")
    data = make_text_dataset(tmp / "ds")
    shards = tmp / "shards"
    res = run_cmd([str(VENV_BIN / "cxr-dist"), "prepare", "--config", str(TINY), "--data", str(data),
                   "--out", str(shards)], cwd=tmp)
    assert res.returncode == 0, res.stdout + res.stderr
    return shards, make_tiny_bert(tmp / "bert"), tmp


def _cfg(shards: Path, *extra: str):
    return load_config(TINY, ["--data.shards_dir", str(shards), *extra])


# ----------------------------------------------------------------------------- data


def test_the_shards_carry_each_sources_text_fields_and_which_made_the_label(text_data):
    shards, _, _ = text_data
    index = load_index(shards)
    (src,) = index.sources
    assert src.text_fields == ("comparison", "findings", "impression", "indication")
    assert src.label_text_fields == ("findings", "impression")
    texts = read_texts(index, ["train", "val", "test"], ("indication", "comparison"))
    key = next(k for k in texts if k.startswith("1_"))
    assert texts[key] == f"indication: {indication_of(1)} comparison: None."
    empty = [k for k in texts if k.startswith("7_") or k.startswith("14_")]
    assert empty and all(texts[k] == "comparison: None." for k in empty)  # no indication: only the comparison


def test_joined_text_handles_missing_empty_and_broken_values():
    assert joined_text({"indication": "  Chest\n pain. ", "comparison": None}, ("indication", "comparison")) == \
        "indication: Chest pain."
    assert joined_text({"indication": float("nan")}, ("indication",)) == ""
    assert joined_text({}, ("indication",)) == ""
    assert "\ufffd" in joined_text({"indication": b"caf\xe9"}, ("indication",))


def test_the_guard_refuses_a_field_the_label_was_derived_from(text_data):
    shards, _, _ = text_data
    index = load_index(shards)
    assert leaky_fields(index, ("indication", "findings", "impression")) == ["findings", "impression"]
    ok = _cfg(shards, "--model.kind", "image+text")
    assert check_text_fields(ok.loader, True, False, index) == []
    leak = _cfg(shards, "--model.kind", "image+text", "--loader.text_fields", '["indication", "findings"]')
    with pytest.raises(ConfigError, match=r"reads findings, from which the label was derived.*allow_label_leakage"):
        check_text_fields(leak.loader, True, False, index)
    allowed = _cfg(shards, "--loader.text_fields", '["findings"]', "--loader.allow_label_leakage", "true")
    assert check_text_fields(allowed.loader, True, False, index) == ["findings"]
    # Report supervision reads findings and impression, at training time only: allowed.
    assert check_text_fields(_cfg(shards).loader, False, True, index) == []
    with pytest.raises(ConfigError, match=r"text field\(s\) history are not in the shards"):
        check_text_fields(_cfg(shards, "--loader.text_fields", '["history"]').loader, True, False, index)
    # An image model reads no text: nothing to check.
    assert check_text_fields(leak.loader, False, False, index) == []


def test_an_index_without_text_fields_says_prepare_again(text_data, tmp_path):
    shards, _, _ = text_data
    index = load_index(shards)
    old = dataclasses.replace(index, sources=tuple(dataclasses.replace(s, text_fields=(), label_text_fields=())
                                                   for s in index.sources))
    with pytest.raises(ConfigError, match="prepare` again"):
        check_text_fields(_cfg(shards).loader, True, False, old)


def test_audit_marks_the_label_fields_and_scores_the_indication(text_data):
    shards, _, _ = text_data
    rows = {tuple(r["fields"]): r for r in audit(load_index(shards), [("indication",), ("impression",), ("findings",)])}
    assert rows[("impression",)]["label_field"] and rows[("impression",)]["leak"]
    assert rows[("findings",)]["label_field"]
    ind = rows[("indication",)]
    assert not ind["label_field"] and ind["train_with_text"] > 10
    # The impression states the label: the text alone reads it.
    assert rows[("impression",)]["auroc"] is not None and rows[("impression",)]["auroc"] > 0.9


def test_audit_text_command(text_data):
    shards, _, tmp = text_data
    res = run_cmd([sys.executable, "-m", "cxr_dist.eval.text_audit", "--shards", str(shards), "--fields", "indication",
                   "comparison", "--json"], cwd=tmp)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["fields"] for r in rows][-1] == ["indication", "comparison"]
    bad = run_cmd([sys.executable, "-m", "cxr_dist.eval.text_audit", "--shards", str(shards), "--fields", "history"],
                  cwd=tmp)
    assert bad.returncode == 2 and "history" in bad.stderr and "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------- the fused model


def _model(bert: Path, kind: str = "image+text", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="efficientnet_b1", pretrained=False, kind=kind, text_encoder=str(bert), **kw))


def test_fused_model_reads_both_and_uses_no_text_where_a_sample_has_none(text_data):
    _, bert, _ = text_data
    model = _model(bert, modality_dropout=0.0).eval()
    assert model.head[0].in_features == 1280 + model.text_encoder.dim
    x = torch.randint(0, 255, (3, 1, 32, 32), dtype=torch.uint8)
    tokens, _ = model.text_encoder.tokenize(["indication: chest pain.", "indication: routine exam.", ""])
    with torch.no_grad():
        model.no_text.fill_(3.0)
        text = {**tokens, "has": torch.tensor([True, True, False])}
        out = model(x, text=text)
        # Sample 2 has no text: its head input is no_text, whatever its tokens say.
        other, _ = model.text_encoder.tokenize(["indication: chest pain.", "indication: routine exam.", "fever"])
        assert torch.allclose(out, model(x, text={**other, "has": text["has"]}))
        assert not torch.allclose(out[:2], model(x, text={**tokens, "has": torch.tensor([False, False, False])})[:2])


def test_late_fusion_adds_a_text_heads_logits_and_keeps_the_image_ranking_without_text(text_data):
    from cxr_dist.config import PhaseConfig
    from cxr_dist.model.classifier import param_groups

    _, bert, _ = text_data
    model = _model(bert, fusion="late", modality_dropout=0.0).eval()
    assert model.head[0].in_features == 1280 and model.text_head[0].in_features == model.text_encoder.dim
    (head_group,) = param_groups(model, PhaseConfig(unfreeze_blocks=0))
    assert set(model.text_head.parameters()) <= set(head_group["params"])  # trains with the head
    torch.manual_seed(1)
    h = torch.randn(4, 1280)  # pooled image features, as the frozen-compute cache gives them
    tokens, _ = model.text_encoder.tokenize(["indication: chest pain.", "indication: cough.", "x", "y"])
    with torch.no_grad():
        for p in model.text_head.parameters():  # a text head that is not ~0 at init
            p.add_(torch.randn_like(p))
        image = model.head(h)
        with_text = model(h, cached=True, text={**tokens, "has": torch.ones(4, dtype=torch.bool)})
        without = model(h, cached=True, text={**tokens, "has": torch.zeros(4, dtype=torch.bool)})
        # the logits are the image head's plus the text head's
        assert torch.allclose(with_text, image + model.text_logits({**tokens, "has": torch.ones(4, dtype=torch.bool)}, 4),
                              atol=1e-5)
        # without text: the image head's logits plus one constant, so the same ranking
        shift = without - image
        assert torch.allclose(shift, shift[:1].expand_as(shift), atol=1e-5)
        assert not torch.allclose(with_text, without)
        margin = lambda logits: logits[:, 1] - logits[:, 0]  # noqa: E731  the log-odds of abnormal
        assert torch.equal(torch.argsort(margin(without)), torch.argsort(margin(image)))


@pytest.mark.parametrize("kind", ["image", "text"])
def test_late_fusion_needs_an_image_text_model(text_data, kind):
    shards, bert, _ = text_data
    with pytest.raises(ConfigError, match=r'fusion = "late".*use kind "image\+text"'):
        _cfg(shards, "--model.kind", kind, "--model.text_encoder", str(bert), "--model.fusion", "late")
    with pytest.raises(ConfigError, match="model.fusion must be one of"):
        _cfg(shards, "--model.kind", "image+text", "--model.fusion", "middle")


def test_modality_dropout_drops_text_in_training_only(text_data):
    _, bert, _ = text_data
    model = _model(bert, modality_dropout=0.999)
    emb = torch.randn(64, model.text_encoder.dim)
    text = {"emb": emb, "has": torch.ones(64, dtype=torch.bool)}
    model.train()
    dropped = model.text_embedding(text, 64)
    assert torch.allclose(dropped, model.no_text.expand_as(dropped))
    model.eval()
    assert not torch.allclose(model.text_embedding(text, 64), model.no_text.expand(64, -1))


def test_a_text_model_never_runs_the_backbone(text_data):
    _, bert, _ = text_data
    model = _model(bert, kind="text").eval()
    assert model.head[0].in_features == model.text_encoder.dim
    emb = {"emb": torch.randn(2, model.text_encoder.dim), "has": torch.ones(2, dtype=torch.bool)}
    with torch.no_grad():
        out = model(torch.zeros(2, 7), text=emb)  # not an image at all: the backbone is not called
    assert out.shape == (2, 2)


def test_phases_unfreeze_text_layers_into_their_own_param_group(text_data):
    from cxr_dist.config import PhaseConfig
    from cxr_dist.model.classifier import param_groups

    _, bert, _ = text_data
    model = _model(bert)
    model.set_phase(0, 0)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert [g["name"] for g in param_groups(model, PhaseConfig(unfreeze_blocks=0))] == ["head"]
    model.set_phase(1, 1)
    groups = {g["name"]: g for g in param_groups(model, PhaseConfig(unfreeze_blocks=1, unfreeze_text_layers=1,
                                                                    text_lr=1e-5))}
    assert set(groups) == {"head", "backbone", "text"} and groups["text"]["lr"] == 1e-5
    last = set(model.text_encoder.layers()[-1].parameters())
    assert last <= set(groups["text"]["params"])
    assert not set(model.text_encoder.layers()[0].parameters()) & set(groups["text"]["params"])
    model.train()
    assert model.text_encoder.layers()[-1].training and not model.text_encoder.layers()[0].training


# ----------------------------------------------------------------------------- real runs


def test_training_refuses_the_leak_before_any_work(text_data):
    shards, bert, tmp = text_data
    run_dir = tmp / "leak"
    res = run_cmd([sys.executable, "-m", "cxr_dist.train", *tiny_overrides(shards, run_dir),
                   "--model.kind", "image+text", "--model.text_encoder", str(bert),
                   "--loader.text_fields", '["impression"]'], cwd=tmp)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "impression, from which the label was derived" in res.stderr and "Traceback" not in res.stderr
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["early", "late"])
def test_two_processes_train_an_image_text_model_in_step(text_data, fusion):
    """2 processes (DDP, gloo), phase 2 unfreezing a text layer and a CNN block: the ranks end
    with identical parameters (text encoder included, and late fusion's text head), and the run
    is evaluated."""
    import mlflow
    from safetensors.torch import load_file

    shards, bert, tmp = text_data
    params, run_dir = tmp / f"params-{fusion}", tmp / f"fused-{fusion}"
    res = accelerate_launch(["-m", "tests.rank_probe", str(params),
                             *tiny_overrides(shards, run_dir, "--model.kind", "image+text", "--model.fusion", fusion,
                                             "--model.text_encoder", str(bert), "--train.phases.1.unfreeze_text_layers",
                                             "1", "--model.report_supervision", "0.5",
                                             "--tracking.experiment", f"fused-{fusion}")], cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    a, b = (load_file(str(params / f"rank{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    assert any(k.startswith("text_head.") for k in a) == (fusion == "late")
    for k in a:
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(a[k], b[k]), k
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["test"]["image_level"]["n"] > 0
    client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(f"fused-{fusion}").experiment_id])
    # rank_probe does not tag (loop.main does); the tags are checked on the one-process run below.
    assert run.data.params["model.kind"] == "image+text" and run.data.params["model.fusion"] == fusion
    # the product rebuilds the model from the checkpoint (late fusion: its text head too)
    res = run_cmd([str(VENV_BIN / "cxr-dist"), "evaluate", "--checkpoint", str(run_dir), "--shards", str(shards),
                   "--split", "test"], cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads(res.stdout)["image_level"]["auroc"]
    assert again == pytest.approx(evaluation["test"]["image_level"]["auroc"], abs=1e-4)


@pytest.fixture(scope="module")
def text_run(text_data) -> Path:
    """One process, image+text with the tiny BERT, the frozen-compute cache: the run folder."""
    shards, bert, tmp = text_data
    run_dir = tmp / "tagged"
    res = run_cmd([sys.executable, "-m", "cxr_dist.train", *tiny_overrides(shards, run_dir), "--model.kind", "image+text",
                   "--model.text_encoder", str(bert), "--tracking.experiment", "text-tags",
                   "--train.cache_views", "1"], cwd=tmp, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "text embeddings (input)" in res.stderr + res.stdout
    return run_dir


@pytest.mark.slow
def test_one_process_run_is_tagged_and_reads_cached_text(text_data, text_run):
    import mlflow

    _, _, tmp = text_data
    assert list((text_run / "cache").glob("text-input-*.safetensors"))
    client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("text-tags").experiment_id])
    assert run.data.tags["model.kind"] == "image+text"
    assert run.data.tags["text_fields"] == "indication,comparison"
    assert run.data.tags["label_leakage"] == "false" and run.data.tags["fusion"] == "early"
    card = (text_run / "MODEL_CARD.md").read_text()
    assert "Reads text besides the film (indication, comparison)" in card


def _films(tmp: Path) -> list[Path]:
    return sorted((tmp / "ds" / "images" / "images_normalized").glob("1_*.png"))[:1] + \
        sorted((tmp / "ds" / "images" / "images_normalized").glob("4_*.png"))[:1]


@pytest.mark.slow
def test_predict_reads_the_text_it_is_given_and_works_without(text_data, text_run):
    _, _, tmp = text_data
    films = [str(f) for f in _films(tmp)]
    cmd = [str(VENV_BIN / "cxr-dist"), "predict", "--checkpoint", str(text_run), "--json"]
    with_text = run_cmd([*cmd, "--text", "indication=Chest pain.", "--text", "comparison=None.", *films], cwd=tmp)
    without = run_cmd([*cmd, *films], cwd=tmp)
    assert with_text.returncode == 0 and without.returncode == 0, with_text.stderr[-2000:] + without.stderr[-2000:]
    a = [json.loads(line) for line in with_text.stdout.splitlines()]
    b = [json.loads(line) for line in without.stdout.splitlines()]
    assert [r["text"] for r in a] == [True, True] and [r["text"] for r in b] == [False, False]
    assert [r["prob_uncalibrated"] for r in a] != [r["prob_uncalibrated"] for r in b]
    # A CSV of films and their texts: one with an indication, one without (empty cell).
    csv_file = tmp / "films.csv"
    csv_file.write_text("image,indication,comparison\n" + f"{films[0]},Chest pain.,None.\n{films[1]},,\n")
    rows = [json.loads(line) for line in run_cmd([*cmd, "--csv", str(csv_file)], cwd=tmp).stdout.splitlines()]
    assert [r["text"] for r in rows] == [True, False]
    assert rows[0]["prob_uncalibrated"] == pytest.approx(a[0]["prob_uncalibrated"], abs=1e-6)
    assert rows[1]["prob_uncalibrated"] == pytest.approx(b[1]["prob_uncalibrated"], abs=1e-6)
    # A text field the model does not read, and a very long text (cut at max_tokens, and said so).
    bad = run_cmd([*cmd, "--text", "history=x", "--text", "indication=y", films[0]], cwd=tmp)
    assert bad.returncode == 2 and "history" in bad.stderr and "Traceback" not in bad.stderr
    long = run_cmd([*cmd, "--text", "chest pain " * 400, films[0]], cwd=tmp)
    assert long.returncode == 0 and json.loads(long.stdout)["text_truncated"] is True
    # Not UTF-8 (a surrogate-escaped argument): read with replacement characters, no crash.
    odd = run_cmd([*cmd, "--text", "indication=caf\udce9", films[0]], cwd=tmp)
    assert odd.returncode == 0 and json.loads(odd.stdout)["text"] is True, odd.stderr[-2000:]


@pytest.mark.slow
def test_evaluate_export_and_the_served_model_with_text(text_data, text_run):
    import base64
    from types import SimpleNamespace

    import pandas as pd

    from cxr_dist.product.serve import CXRPyfunc, input_schema

    shards, _, tmp = text_data
    res = run_cmd([str(VENV_BIN / "cxr-dist"), "evaluate", "--checkpoint", str(text_run), "--shards", str(shards),
                   "--split", "test"], cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    test = json.loads(res.stdout)
    final = json.loads((text_run / "evaluation.json").read_text())["test"]
    assert test["image_level"]["auroc"] == pytest.approx(final["image_level"]["auroc"], abs=1e-4)
    out = run_cmd([str(VENV_BIN / "cxr-dist"), "export", "--checkpoint", str(text_run), "--format", "onnx",
                   "--out", str(tmp / "m.onnx")], cwd=tmp)
    assert out.returncode == 2 and "reads text" in out.stderr and "Traceback" not in out.stderr
    # The served model (the pyfunc itself, without a server: tests/test_product.py serves one for real).
    model = CXRPyfunc()
    model.load_context(SimpleNamespace(artifacts={"checkpoint": str(text_run / "checkpoints" / "best")}))
    films = [base64.b64encode(f.read_bytes()).decode() for f in _films(tmp)]
    got = model.predict(None, pd.DataFrame({"image": films, "indication": ["Chest pain.", None]}))
    assert list(got["text"]) == [True, False]
    plain = model.predict(None, pd.DataFrame({"image": films, "text": ["Chest pain.", None]}))
    assert plain["prob_abnormal"].tolist() == pytest.approx(got["prob_abnormal"].tolist(), abs=1e-6)
    assert [c.name for c in input_schema(("indication", "comparison")).inputs] == ["image", "text", "indication",
                                                                                   "comparison"]


@pytest.mark.slow
def test_deepspeed_zero2_trains_the_text_encoder_in_step(text_data):
    """DeepSpeed ZeRO-2 (2 processes on the CPU, gloo): phase 2 trains a text layer too, and both
    ranks end with identical parameters, the text encoder's included."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    shards, bert, tmp = text_data
    res = accelerate_launch(["-m", "tests.rank_probe", str(tmp / "ds-params"),
                             *tiny_overrides(shards, tmp / "ds", "--model.kind", "image+text", "--model.text_encoder",
                                             str(bert), "--train.phases.1.unfreeze_text_layers", "1",
                                             "--tracking.enabled", "false")],
                            cwd=tmp, config="deepspeed_zero2.yaml")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    a, b = (load_file(str(tmp / "ds-params" / f"rank{r}.safetensors")) for r in (0, 1))
    layer = [k for k in a if k.startswith("text_encoder.") and ".layer.1." in k]
    assert layer
    for k in a:
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(a[k], b[k]), k
    torch.manual_seed(0)
    init = build_model(ModelConfig(pretrained=False, kind="image+text", text_encoder=str(bert))).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in layer), "the unfrozen text layer did not train"


def test_training_refuses_shards_prepared_with_other_settings(text_data):
    """Issue 23 item 8: image_size / resize / intensity are baked into the shards by prepare; a run
    whose config says otherwise would train on one preprocessing and predict with another."""
    shards, _, tmp = text_data
    for override in (["--data.image_size", "64"], ["--data.resize", "squash"], ["--data.intensity", "equalize"]):
        res = run_cmd([sys.executable, "-m", "cxr_dist.train", *tiny_overrides(shards, tmp / "other"), *override],
                      cwd=tmp)
        assert res.returncode == 2, res.stderr[-2000:]
        assert f"data.{override[0].split('.')[-1]}" in res.stderr and "the shards have" in res.stderr
        assert "Traceback" not in res.stderr and not (tmp / "other").exists()
