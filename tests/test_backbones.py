"""Both phases on other timm families (backbones.py): ResNet, DenseNet, ConvNeXt (and EfficientNet,
the original, where it is cheap): what trains, what stays frozen, timm's own pooled feature at
every depth, the errors, weights from a file, and one real training run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import group_parameters

from cxr_dist.config import ConfigError, ModelConfig, PhaseConfig
from cxr_dist.model import classifier
from cxr_dist.model.backbones import split_of
from cxr_dist.model.classifier import build_model, count_trainable, param_groups
from cxr_dist.model.frozen_runtime import build_runner
from tests.conftest import run_cmd, tiny_overrides

# name -> (blocks, timm groups that train with any block besides the blocks, trainable at depth 0 / 2).
# The counts are those of timm 1.0.31 with hidden=256, two classes: a change in them is a change
# in what a phase trains.
FAMILIES = {
    "resnet18": (8, 0, 132_354, 8_526_082),
    "densenet121": (58, 1, 263_426, 593_474),  # + norm5, its own group in timm
    "convnext_atto": (12, 1, 83_202, 1_964_802),  # + head.norm (after pooling), its own group
}
ALL = {**FAMILIES, "efficientnet_b1": (23, 0, 328_962, 3_021_954)}  # conv_head/bn2: in the last block's group


@pytest.fixture(scope="module", params=sorted(ALL))
def model(request):
    torch.manual_seed(0)
    return request.param, build_model(ModelConfig(backbone=request.param, pretrained=False))


def images(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)


def names_of(model, modules) -> set[str]:
    ids = {id(p) for m in modules for p in m.parameters()}
    return {n for n, p in model.backbone.named_parameters() if id(p) in ids}


def test_blocks_are_timms_groups(model):
    """Block i is timm's fine group i+1 (group 0: the stem); what trains with any block is the rest
    of the last group(s)."""
    name, m = model
    n_blocks, extra, _, _ = ALL[name]
    groups = group_parameters(m.backbone, m.backbone.group_matcher(coarse=False))
    groups = [set(groups[i]) for i in sorted(groups)]
    assert len(m.blocks()) == n_blocks == len(groups) - 1 - extra
    split = split_of(m.backbone)
    after = names_of(m, split.with_blocks)
    for i, block in enumerate(m.blocks()):
        assert names_of(m, [block]) == groups[i + 1] - after, (name, i)
    assert after == set().union(*groups[1:]) - set().union(*(names_of(m, [b]) for b in m.blocks()))
    assert names_of(m, split.stem) == groups[0]


def test_pooled_feature_is_timms_at_every_depth(model):
    """frozen part -> trainable part gives timm's forward_head(forward_features(x), pre_logits=True),
    at every depth and from a cache of a deeper depth (FeatureCache.at_depth)."""
    name, m = model
    m.eval()
    x = images(2, 32)
    with torch.no_grad():
        ref = m.backbone.forward_head(m.backbone.forward_features(m.normalize(x)), pre_logits=True)
        n = len(m.blocks())
        depths = sorted({0, 1, 2, n // 2, n})
        for d in depths:
            m.set_phase(d)
            h = m.frozen_forward(x)
            torch.testing.assert_close(m.pooled(h), ref, rtol=1e-5, atol=1e-5, msg=f"{name} depth {d}")
            torch.testing.assert_close(m(x), m.head(ref))
        deep = m.frozen_forward(x)  # at depth n: the stem's output
        for d in depths:
            m.set_phase(d)
            torch.testing.assert_close(m.pooled(m.frozen_from(deep, n, d)), ref, rtol=1e-5, atol=1e-5)
    m.set_phase(0)


def _steps(m, phase: PhaseConfig, n: int = 2) -> None:
    opt = torch.optim.Adam(param_groups(m, phase))
    m.train()
    labels = torch.tensor([0, 1, 0, 1])
    for step in range(n):
        loss = torch.nn.functional.cross_entropy(m(images(4, 64, seed=step)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_both_phases_train_what_they_should(name):
    """Phase 1 trains the head alone; phase 2 (unfreeze_blocks=2) also the last two of timm's
    groups and what follows them, at backbone_lr; nothing else moves (weights or BatchNorm
    statistics)."""
    n_blocks, extra, head_only, two_blocks = FAMILIES[name]
    torch.manual_seed(0)
    m = build_model(ModelConfig(backbone=name, pretrained=False))
    groups = group_parameters(m.backbone, m.backbone.group_matcher(coarse=False))
    expected_tail = {n for g in sorted(groups)[-(2 + extra):] for n in groups[g]}  # timm's last groups

    for depth, expected in ((0, head_only), (2, two_blocks)):
        phase = PhaseConfig(epochs=1, unfreeze_blocks=depth, lr=1e-2, backbone_lr=1e-3)
        m.set_phase(depth)
        assert count_trainable(m) == expected, (name, depth)
        trainable = {n for n, p in m.backbone.named_parameters() if p.requires_grad}
        assert trainable == (expected_tail if depth else set())
        groups_ = param_groups(m, phase)
        assert [g["name"] for g in groups_] == (["head", "backbone"] if depth else ["head"])
        if depth:
            assert groups_[1]["lr"] == 1e-3 and {id(p) for p in groups_[1]["params"]} == {
                id(p) for n, p in m.backbone.named_parameters() if n in expected_tail}
        before = {k: v.clone() for k, v in m.state_dict().items()}
        _steps(m, phase)
        after = m.state_dict()
        moved = {k for k in before if not torch.equal(before[k], after[k])}
        backbone_moved = {k[len("backbone."):] for k in moved if k.startswith("backbone.")}
        # Weights of the tail and, in training mode, the tail's BatchNorm statistics; nothing before it.
        tail_modules = {k.rsplit(".", 1)[0] for k in expected_tail}
        assert all(k.rsplit(".", 1)[0] in tail_modules for k in backbone_moved), sorted(backbone_moved)[:5]
        assert {k for k in expected_tail if k in backbone_moved} == (expected_tail if depth else set())
        assert {"head.0.weight", "head.4.weight"} <= moved
    m.set_phase(0)


def test_too_many_blocks_and_unsplittable_backbones_are_config_errors():
    m = build_model(ModelConfig(backbone="resnet18", pretrained=False))
    with pytest.raises(ConfigError, match=r"unfreeze_blocks=9, but the backbone 'resnet18' has 8 blocks"):
        m.set_phase(9)
    assert m.depth == 0 and count_trainable(m) == FAMILIES["resnet18"][2]  # left as it was
    other = build_model(ModelConfig(backbone="mobilenetv3_small_050", pretrained=False))
    other.set_phase(0)  # the head alone: any backbone with a pooled feature
    with pytest.raises(ConfigError, match=r"cannot split the backbone 'mobilenetv3_small_050' \(MobileNetV3\).*"
                                          r"no known sequence of stem, blocks and neck.*unfreeze_blocks = 0"):
        other.set_phase(1)
    with pytest.raises(ConfigError, match="cannot split"):
        param_groups(other, PhaseConfig(epochs=1, unfreeze_blocks=1))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_frozen_part_exports_at_depth(name, tmp_path):
    """The frozen part at depth 2 through ONNX Runtime (as the cache and evaluation run it on a CPU)."""
    m = build_model(ModelConfig(backbone=name, pretrained=False)).eval()
    m.set_phase(2)
    runner = build_runner(m, "onnxruntime", 2, 32, tmp_path)
    x = images(2, 32)
    torch.testing.assert_close(runner(x), m.frozen_forward(x), rtol=1e-4, atol=1e-4)
    m.set_phase(0)


def test_weights_file_of_a_whole_timm_model_loads(tmp_path):
    """A timm ImageNet state dict (classifier included, as the hub's model.safetensors) loads into
    the backbone: the classifier is dropped, every other tensor must match."""
    torch.manual_seed(1)
    full = timm.create_model("resnet18", pretrained=False)  # 1000 classes, as published
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    m = build_model(ModelConfig(backbone="resnet18", weights=str(path)))
    sd = m.backbone.state_dict()
    assert "fc.weight" not in sd and all(torch.equal(sd[k], full.state_dict()[k]) for k in sd)
    broken = {k: v for k, v in full.state_dict().items() if k != "layer4.1.bn2.weight"}
    save_file({k: v.contiguous() for k, v in broken.items()}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(RuntimeError, match="layer4.1.bn2.weight"):
        build_model(ModelConfig(backbone="resnet18", weights=str(tmp_path / "broken.safetensors")))


def test_pretrained_without_hub_says_to_pass_a_weights_file(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("hub unreachable")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(classifier.timm, "create_model", offline)
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(backbone="densenet121", pretrained=True))
    msg = str(e.value)
    assert "No pip package known to cxr-dist ships ImageNet weights for 'densenet121'" in msg
    assert "--model.weights /path/to/densenet121.safetensors (or .pth)" in msg and "timm/densenet121" in msg


@pytest.mark.slow
def test_a_resnet_trains_both_phases_through_the_entry_point(tiny_shards, tmp_path):
    """The training module itself (one process), configs/tiny.toml with a ResNet-18: phase 2
    unfreezes its last residual block; the final evaluation runs its frozen part through the
    default CPU runtime."""
    run_dir = tmp_path / "resnet"
    res = run_cmd([sys.executable, "-m", "cxr_dist.train",
                   *tiny_overrides(tiny_shards, run_dir, "--model.backbone", "resnet18")], cwd=tmp_path, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "132,354 trainable" in out and "4,852,994 trainable" in out  # head; + layer4.1
    assert [r["phase"] for r in json.loads((run_dir / "history.json").read_text())] == [1, 1, 2]
    assert (run_dir / "evaluation.json").is_file()
    assert Path(run_dir / "checkpoints").is_dir()
