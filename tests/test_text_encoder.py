"""The text encoder (cxr_dist/model/text_encoder.py) on real transformers models.

Two tiny models with random weights, a BERT (encoder) and a GPT-2 (decoder without a pad token),
are saved with their tokenizers into folders, as a user's `save_pretrained` folder would be, and
loaded through `build_text_encoder(folder)`. The offline default (the package of the `text` extra)
is loaded when installed and must place related sentences closer than unrelated ones.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from cxr_dist.config import ConfigError  # noqa: E402
from cxr_dist.data.text import clean  # noqa: E402
from tests.textgen import make_tiny_gpt2  # noqa: E402
from cxr_dist.model.text_encoder import (  # noqa: E402
    DEFAULT_MODULE,
    TEXT_ENCODER_DEFAULT,
    TextEncoder,
    build_text_encoder,
)

SENTENCES = [
    "the heart size is normal and the lungs are clear",
    "no focal consolidation pleural effusion or pneumothorax",
    "there is a large right pleural effusion with atelectasis",
    "mild cardiomegaly with low lung volumes",
    "degenerative changes of the thoracic spine",
    "comparison none indication chest pain",
]
SHORT, LONG = "lungs are clear", "there is a large right pleural effusion with atelectasis and mild cardiomegaly"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with a WordPiece vocabulary of the words above, saved like a user's folder."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    words = sorted({w for s in SENTENCES for w in s.split()} | {"x", "##s", "##ed", "pain", "normal"})
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;-") + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(dict.fromkeys(words + letters))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    transformers.BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide GPT-2 with a byte-level BPE trained on the sentences above, and no pad token."""
    folder = make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), SENTENCES * 3, vocab_size=400)
    assert transformers.AutoTokenizer.from_pretrained(folder).pad_token is None
    return folder


@pytest.fixture(scope="module")
def bert(bert_dir) -> TextEncoder:
    return build_text_encoder(str(bert_dir))


@pytest.fixture(scope="module")
def gpt2(gpt2_dir) -> TextEncoder:
    return build_text_encoder(str(gpt2_dir))


def alone_hidden(enc: TextEncoder, text: str) -> torch.Tensor:
    """The last hidden states of one text with no padding at all: [T, dim]."""
    batch, _ = enc.tokenize([text])
    assert bool(batch["attention_mask"].all())
    with torch.no_grad():
        return enc.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[0]


def pooled(enc: TextEncoder, texts: list[str], pooling: str, side: str) -> tuple[torch.Tensor, dict]:
    enc.pooling, enc.tokenizer.padding_side = pooling, side
    batch, _ = enc.tokenize(texts)
    enc.eval()
    with torch.no_grad():
        return enc(batch["input_ids"], batch["attention_mask"]), batch


def test_load_folder_shapes_and_names(bert, gpt2, bert_dir, gpt2_dir):
    for enc, folder, n_layers in ((bert, bert_dir, 2), (gpt2, gpt2_dir, 2)):
        assert enc.dim == 32 and enc.name == str(folder.resolve())
        assert len(enc.layers()) == n_layers
        vectors, cut = enc.encode(SENTENCES, batch_size=4)
        assert vectors.shape == (len(SENTENCES), 32) and vectors.dtype == torch.float32
        assert vectors.device.type == "cpu" and cut == 0 and torch.isfinite(vectors).all()
        nothing, cut = enc.encode([])
        assert nothing.shape == (0, 32) and cut == 0
        # Built fully frozen, no gradients from encode.
        assert not any(p.requires_grad for p in enc.parameters())
    assert not bert.is_decoder and gpt2.is_decoder
    assert gpt2.tokenizer.pad_token == gpt2.tokenizer.eos_token == "<|endoftext|>"  # decoder: pad = eos
    assert isinstance(gpt2.layers()[0], transformers.models.gpt2.modeling_gpt2.GPT2Block)
    assert bert.layers() == list(bert.model.encoder.layer)


def test_encode_keeps_order_and_batching_does_not_matter(bert, gpt2):
    for enc in (bert, gpt2):
        enc.pooling = "mean"
        one_by_one = torch.cat([enc.encode([s])[0] for s in SENTENCES])
        together, _ = enc.encode(SENTENCES, batch_size=64)
        assert torch.allclose(one_by_one, together, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_mean_pooling_ignores_padding(bert, gpt2, side):
    for enc in (bert, gpt2):
        alone, _ = pooled(enc, [SHORT], "mean", side)
        both, batch = pooled(enc, [SHORT, LONG], "mean", side)
        assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # SHORT was padded
        assert torch.allclose(alone[0], both[0], atol=1e-5), (enc.name, side)
        assert torch.allclose(alone[0], alone_hidden(enc, SHORT).mean(dim=0), atol=1e-5)
    bert.tokenizer.padding_side = "right"


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pooling,token", [("cls", 0), ("last", -1)])
def test_cls_and_last_pick_the_right_token(bert, gpt2, side, pooling, token):
    for enc in (bert, gpt2):
        vec, batch = pooled(enc, [SHORT, LONG], pooling, side)
        mask = batch["attention_mask"]
        pads = mask.shape[1] - int(mask[0].sum())
        assert pads > 0 and (mask[0, :pads] == 0).all() == (side == "left")
        for i, text in enumerate((SHORT, LONG)):
            assert torch.allclose(vec[i], alone_hidden(enc, text)[token], atol=1e-5), (enc.name, side, pooling)
        enc.pooling = "mean"
    bert.tokenizer.padding_side = "right"


def test_truncation_is_counted(bert_dir, gpt2_dir):
    for folder in (bert_dir, gpt2_dir):
        enc = build_text_encoder(str(folder), pooling="mean", max_tokens=6)
        batch, cut = enc.tokenize([SHORT, LONG, ""])
        assert cut == 1 and batch["input_ids"].shape[1] <= 6
        vectors, cut = enc.encode([LONG, SHORT, LONG], batch_size=2)
        assert cut == 2 and vectors.shape == (3, 32)


def test_empty_and_broken_texts_give_a_vector(bert, gpt2):
    texts = ["", None, float("nan"), b"\xff\xfe lungs \xc3\x28 clear", "   \n\t  "]
    for enc in (bert, gpt2):
        for pooling in ("mean", "cls", "last"):
            enc.pooling = pooling
            vectors, cut = enc.encode(texts)
            assert vectors.shape == (len(texts), 32) and torch.isfinite(vectors).all() and cut == 0
            assert torch.allclose(vectors[0], vectors[1]) and torch.allclose(vectors[0], vectors[4])
        enc.pooling = "mean"
    # A decoder tokenizer gives no token for "": the batch of empty texts still has one real token each.
    batch, _ = gpt2.tokenize(["", ""])
    assert batch["input_ids"].shape == (2, 1) and batch["attention_mask"].tolist() == [[1], [1]]


def test_clean_is_the_one_text_normaliser():
    # data/text.clean: what the shards, the encoder and prediction all use
    assert clean(None) == "" and clean(float("nan")) == "" and clean(3.5) == ""
    assert clean("  The lungs\n\n are\tclear.\u00a0 ") == "The lungs are clear."
    assert clean(b"caf\xc3\xa9 \xff ok") == "caf\u00e9 \ufffd ok"
    assert clean(bytearray(b" x  y ")) == "x y"
    assert clean(12) == "12"
    assert clean("caf\udce9") == "caf\ufffd"  # a surrogate-escaped byte (a command-line argument)
    for value in (None, float("nan"), b"\x80", "a", 7):
        assert isinstance(clean(value), str)


def test_set_trainable_layers(bert, gpt2):
    for enc in (bert, gpt2):
        enc.set_trainable_layers(1)
        last = {id(p) for p in enc.layers()[-1].parameters()}
        norm = {id(p) for p in enc.final_norm().parameters()} if enc.final_norm() is not None else set()
        trainable = {id(p) for p in enc.parameters() if p.requires_grad}
        assert trainable == last | norm and last
        assert (norm != set()) == enc.is_decoder  # GPT-2's ln_f, no final norm for BERT
        # Gradients reach exactly the trainable part.
        enc.train()
        batch, _ = enc.tokenize([SHORT, LONG])
        enc(batch["input_ids"], batch["attention_mask"]).sum().backward()
        with_grad = {id(p) for p in enc.parameters() if p.grad is not None}
        assert with_grad == trainable
        enc.zero_grad(set_to_none=True)
        enc.set_trainable_layers(2)
        assert all(p.requires_grad for layer in enc.layers() for p in layer.parameters())
        enc.set_trainable_layers(0)
        assert not any(p.requires_grad for p in enc.parameters())
        with pytest.raises(ConfigError, match="2 layers"):
            enc.set_trainable_layers(3)
        enc.eval()


def test_identity_is_stable_and_follows_the_weights(bert_dir, gpt2_dir):
    a, b = build_text_encoder(str(bert_dir)), build_text_encoder(str(bert_dir))
    assert a.identity() == b.identity()
    assert str(bert_dir.resolve()) in a.identity() and "pooling=mean" in a.identity()
    assert build_text_encoder(str(bert_dir), pooling="cls").identity() != a.identity()
    assert build_text_encoder(str(bert_dir), max_tokens=16).identity() != a.identity()
    before = a.identity()
    with torch.no_grad():
        a.layers()[-1].output.dense.weight[0, 0] += 1e-3
    assert a.identity() != before
    g = build_text_encoder(str(gpt2_dir))
    before = g.identity()
    with torch.no_grad():
        g.layers()[0].mlp.c_fc.weight[1, 1] -= 1e-3
    assert g.identity() != before


def test_bad_names_and_settings_raise_config_error(bert_dir, tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        build_text_encoder(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no config.json"):
        build_text_encoder(str(tmp_path))
    with pytest.raises(ConfigError, match="neither a folder nor a hub id"):
        build_text_encoder("not a model name!")
    with pytest.raises(ConfigError, match="only package encoder"):
        build_text_encoder("package:something-else")
    with pytest.raises(ConfigError, match="text_pooling"):
        build_text_encoder(str(bert_dir), pooling="max")
    with pytest.raises(ConfigError, match="max_tokens"):
        build_text_encoder(str(bert_dir), max_tokens=0)
    with pytest.raises(ConfigError, match="has only 128 positions"):
        build_text_encoder(str(bert_dir), max_tokens=129)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert"}')  # no weights, no tokenizer
    with pytest.raises(ConfigError, match="cannot load"):
        build_text_encoder(str(broken))


def test_unknown_hub_id_offline_says_what_to_do(tmp_path):
    """On a machine without the hub (HF_HUB_OFFLINE=1, read when huggingface_hub is imported: a
    fresh process), an id that is not in the local cache is a ConfigError that names the remedies."""
    code = ("from cxr_dist.errors import run_main\n"
            "from cxr_dist.model.text_encoder import build_text_encoder\n"
            "import sys\n"
            "sys.exit(run_main('t', lambda argv: build_text_encoder('no-such-owner/no-such-model-xyz'), [],"
            " setup_logging=False))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("t: model.text_encoder='no-such-owner/no-such-model-xyz'")
    assert "local folder" in last and "cxr-dist[text]" in last


@pytest.mark.skipif(importlib.util.find_spec(DEFAULT_MODULE) is None,
                    reason="the offline default text encoder needs pip install 'cxr-dist[text]'")
def test_offline_default_is_pretrained():
    enc = build_text_encoder("")
    assert enc.name == TEXT_ENCODER_DEFAULT and enc.dim == 384 and len(enc.layers()) == 6
    assert TEXT_ENCODER_DEFAULT in enc.identity()
    vectors, _ = enc.encode([
        "The heart size is normal. The lungs are clear.",
        "Normal cardiac silhouette. No focal airspace disease.",
        "The restaurant serves pizza and pasta on weekends.",
        "Large right pleural effusion.",
        "Fluid in the right pleural space.",
    ])
    v = torch.nn.functional.normalize(vectors, dim=1)
    cos = v @ v.T
    assert cos[0, 1] > cos[0, 2] + 0.3, cos  # related reports far closer than an unrelated sentence
    assert cos[3, 4] > cos[3, 2] + 0.3, cos


def test_bench_text_runs_on_a_reports_csv(bert_dir, tmp_path):
    # bench/bench_text.py as documented (docs/performance.md), on a 3-report CSV in the IU layout:
    # it joins the fields as the shards do and prints one JSON line with the rate
    import csv
    import json

    path = tmp_path / "indiana_reports.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uid", "indication", "comparison", "findings", "impression"])
        w.writerow([1, "chest pain", "", "the lungs are clear", "normal"])
        w.writerow([2, "", "", "", ""])
        w.writerow([3, "x", "none", SENTENCES[2], SENTENCES[3]])
    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_text.py"
    res = subprocess.run([sys.executable, str(bench), "--csv", str(path), "--encoder", str(bert_dir),
                          "--fields", "indication,findings", "--max-tokens", "8", "--batch-size", "2"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(bench.parents[1])})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert (out["reports"], out["empty_reports"], out["dim"]) == (3, 1, 32)
    assert out["fields"] == ["indication", "findings"] and out["reports_per_s"] > 0
    assert out["n_truncated"] >= 1  # report 3's findings alone are more than 8 tokens
    res = subprocess.run([sys.executable, str(bench), "--csv", str(path), "--fields", "indication,history"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(bench.parents[1])})
    assert res.returncode != 0 and "no column history" in res.stderr
