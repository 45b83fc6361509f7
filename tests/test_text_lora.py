"""LoRA adapters in the text encoder (model.text_lora_rank, a phase's text_lora; peft).

Tiny random BERT (encoder) and GPT-2 (decoder) folders, as a user's save_pretrained folders: the
adapters leave the embedding unchanged until trained, a text_lora phase trains them and nothing
else of the encoder, a real 2-process run trains them in step on both ranks, and the product
rebuilds the same model from the checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxr_dist.config import (
    ConfigError,
    ModelConfig,
    PhaseConfig,
    from_dict,
    load_config,
    section,
)
from cxr_dist.model.classifier import build_model, count_trainable, param_groups
from cxr_dist.model.text_encoder import build_text_encoder
from tests.conftest import TINY, VENV_BIN, accelerate_launch, run_cmd, tiny_overrides
from tests.textgen import WORDS, make_text_dataset, make_tiny_bert, make_tiny_gpt2

TEXTS = ["indication: chest pain. comparison: none.", "indication: routine exam.", "fever and cough", ""]
# peft's default targets for the two families (what model.text_lora_targets = [] means).
DEFAULT_TARGETS = {"bert": ("query", "value"), "gpt2": ("c_attn",)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("lora_models")
    return {"bert": make_tiny_bert(tmp / "bert"), "gpt2": make_tiny_gpt2(tmp / "gpt2", [" ".join(WORDS)] * 3 + TEXTS)}


def adapter_size(encoder, rank: int, targets: tuple[str, ...]) -> int:
    """What LoRA adds for `rank`: rank * (fan_in + fan_out) per targeted projection (A: rank x in,
    B: out x rank), from the shapes of the encoder's own modules (GPT-2's Conv1D stores (in, out))."""
    total = 0
    for name, module in encoder.model.named_modules():
        if name.split(".")[-1] in targets:
            w = module.weight
            fan_in, fan_out = (w.shape[1], w.shape[0]) if isinstance(module, torch.nn.Linear) else w.shape
            total += rank * (fan_in + fan_out)
    assert total > 0
    return total


def _model(folder: Path, kind: str = "text", **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(pretrained=False, kind=kind, text_encoder=str(folder), **kw))


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_adapters_leave_the_pooled_embedding_unchanged(folders, family):
    enc = build_text_encoder(str(folders[family]))
    before, _ = enc.encode(TEXTS)
    enc.add_lora(4, 8.0)
    after, _ = enc.encode(TEXTS)
    assert torch.allclose(before, after, atol=1e-6)
    names = [n for n, _ in enc.model.named_parameters() if ".lora_" in n]
    assert {n.split(".lora_")[0].split(".")[-1] for n in names} == set(DEFAULT_TARGETS[family])
    assert sum(p.numel() for p in enc.lora_parameters()) == adapter_size(enc, 4, DEFAULT_TARGETS[family])
    assert not any(p.requires_grad for p in enc.parameters())  # injected frozen, as the rest
    # B = 0 is why nothing changed: the adapters are in the forward pass.
    with torch.no_grad():
        for n, p in enc.model.named_parameters():
            if ".lora_B." in n:
                p.fill_(0.1)
    assert not torch.allclose(before, enc.encode(TEXTS)[0], atol=1e-3)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_text_lora_phase_trains_the_adapters_and_nothing_else_of_the_encoder(folders, family):
    plain, lora = _model(folders[family]), _model(folders[family], text_lora_rank=4, text_lora_alpha=8.0)
    enc = lora.text_encoder
    adapters = {id(p) for p in enc.lora_parameters()}
    phase = PhaseConfig(text_lora=True, text_lr=1e-3)
    lora.set_phase(0, 0, text_lora=True)
    plain.set_phase(0)
    assert {id(p) for p in enc.parameters() if p.requires_grad} == adapters
    assert count_trainable(lora) == count_trainable(plain) + adapter_size(enc, 4, DEFAULT_TARGETS[family])
    groups = {g["name"]: g for g in param_groups(lora, phase)}
    assert set(groups) == {"head", "text"} and groups["text"]["lr"] == 1e-3
    assert {id(p) for p in groups["text"]["params"]} == adapters
    # Gradients reach the adapters (B first: A's gradient is zero while B is) and no other encoder weight.
    lora.train()
    batch, _ = enc.tokenize(TEXTS)
    text = {**batch, "has": torch.tensor([True] * len(TEXTS))}
    lora(torch.zeros(len(TEXTS), 1), text=text).sum().backward()
    with_grad = {id(p) for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and with_grad <= adapters
    # Combined with unfreeze_text_layers: the last layer trains whole, the other layers' adapters too.
    lora.set_phase(0, 1, text_lora=True)
    last = {id(p) for p in enc.layers()[-1].parameters()}
    norm = {id(p) for p in enc.final_norm().parameters()} if enc.final_norm() is not None else set()
    assert {id(p) for p in enc.parameters() if p.requires_grad} == adapters | last | norm
    # A phase without text_lora leaves the adapters frozen.
    lora.set_phase(0, 0)
    assert not any(p.requires_grad for p in enc.parameters())
    assert [g["name"] for g in param_groups(lora, PhaseConfig())] == ["head"]


def test_named_targets_and_all_linear(folders):
    enc = build_text_encoder(str(folders["bert"]))
    enc.add_lora(2, 4.0, ("query", "key", "value"))
    assert sum(p.numel() for p in enc.lora_parameters()) == adapter_size(enc, 2, ("query", "key", "value"))
    every = build_text_encoder(str(folders["gpt2"]))
    every.add_lora(2, 4.0, ("all-linear",))
    assert sum(p.numel() for p in every.lora_parameters()) == adapter_size(every, 2, ("c_attn", "c_proj", "c_fc"))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides, message", [
    (["--train.phases.1.text_lora", "true", "--model.kind", "text"],
     "train.phases[1].text_lora needs adapters to train: set model.text_lora_rank > 0"),
    (["--train.phases.1.text_lora", "true", "--model.text_lora_rank", "4"],
     "train.phases[1].text_lora trains the text encoder's adapters, but model.kind = 'image' reads no text"),
    (["--model.text_lora_rank", "4"], "model.text_lora_rank = 4 adds adapters to a text encoder, but model.kind"),
    (["--model.text_lora_rank", "-1", "--model.kind", "text"], "model.text_lora_rank must be >= 0"),
    (["--model.text_lora_alpha", "0", "--model.kind", "text"], "model.text_lora_alpha must be > 0"),
])
def test_bad_lora_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert message in str(e.value)


def test_lora_on_a_model_without_adapters_or_targets_is_refused(folders):
    enc = build_text_encoder(str(folders["bert"]))
    with pytest.raises(ConfigError, match="no LoRA adapters to train"):
        enc.set_trainable_layers(0, lora=True)
    with pytest.raises(ConfigError, match=r"text_lora_targets=\['no_such_module'\].*all-linear"):
        enc.add_lora(4, 8.0, ("no_such_module",))
    with pytest.raises(ConfigError, match="text_lora_rank"):
        enc.add_lora(0, 8.0)
    image = build_model(ModelConfig(pretrained=False))
    with pytest.raises(ConfigError, match="text_lora needs a model that reads text"):
        image.set_phase(0, 0, text_lora=True)


def test_configs_and_checkpoints_without_the_lora_fields_load_with_defaults():
    old = {"model": {"kind": "text", "text_encoder": "x"}, "train": {"phases": [{"name": "head", "epochs": 2}]}}
    m = section(old, ModelConfig)
    assert (m.text_lora_rank, m.text_lora_alpha, m.text_lora_targets) == (0, 16.0, ())
    assert from_dict(PhaseConfig, {"name": "head", "unfreeze_text_layers": 1}).text_lora is False


# ----------------------------------------------------------------------------- a real run


@pytest.mark.slow
def test_two_processes_train_the_adapters_in_step_and_the_product_loads_them(tmp_path, folders):
    """kind text, 2 processes (DDP, gloo): phase 1 the head on cached embeddings, phase 2 the
    adapters (tokens from then on). The adapters leave zero, identically on both ranks, the rest of
    the encoder stays as loaded, and Product.load rebuilds the trained model from the checkpoint."""
    from safetensors.torch import load_file

    from cxr_dist.product.inference import Product

    shards = tmp_path / "shards"
    res = run_cmd([str(VENV_BIN / "cxr-dist"), "prepare", "--config", str(TINY), "--data",
                   str(make_text_dataset(tmp_path / "ds", n_uids=24)), "--out", str(shards)], cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    bert, run_dir = folders["bert"], tmp_path / "lora"
    res = accelerate_launch(["-m", "tests.rank_probe", str(tmp_path / "params"),
                             *tiny_overrides(shards, run_dir, "--model.kind", "text", "--model.text_encoder", str(bert),
                                             "--model.text_lora_rank", "4", "--train.phases.0.epochs", "1",
                                             "--train.phases.1.unfreeze_blocks", "0", "--train.phases.1.text_lora",
                                             "true", "--train.phases.1.text_lr", "1e-2", "--tracking.enabled", "false",
                                             "--product.cam_images", "0")], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    a, b = (load_file(str(tmp_path / "params" / f"rank{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys()
    for k in a:
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(a[k], b[k]), k
    lora_b = [k for k in a if ".lora_B." in k]
    assert len(lora_b) == 4 and all(a[k].abs().sum() > 0 for k in lora_b), "the adapters did not train"
    loaded = build_text_encoder(str(bert)).model.state_dict()  # the encoder as loaded: frozen but for LoRA
    base = {k.removeprefix("text_encoder.model.").replace(".base_layer.", "."): k for k in a
            if k.startswith("text_encoder.") and ".lora_" not in k}
    assert base.keys() == loaded.keys()
    assert all(torch.equal(a[base[k]], loaded[k]) for k in loaded)

    product = Product.load(run_dir / "checkpoints" / "latest", device=torch.device("cpu"))
    assert product.model_config.text_lora_rank == 4
    trained = build_model(product.model_config)
    trained.load_state_dict(a)
    trained.eval()
    batch, _ = product.model.text_encoder.tokenize(TEXTS)
    text = {**batch, "has": torch.tensor([True, True, True, False])}
    with torch.no_grad():
        got, want = product.model(torch.zeros(4, 1), text=text), trained(torch.zeros(4, 1), text=text)
        assert torch.allclose(got, want, atol=1e-6)
        for k in lora_b:  # and the adapters are what makes the difference
            trained.get_parameter(k).zero_()
        assert not torch.allclose(got[:3], trained(torch.zeros(4, 1), text=text)[:3], atol=1e-5)
    Product.load(run_dir, device=torch.device("cpu"))  # the best checkpoint loads too
