"""frozen_fast: every CPU backend computes the frozen part as eager PyTorch does (fp32 within
float tolerance, int8 close by cosine), exports are kept, and the cache built through a backend
equals the eager one."""
from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from cxr_dist.model.feature_cache import frozen_caches
from cxr_dist.config import ConfigError, ModelConfig, load_config
from cxr_dist.model.frozen_runtime import attached, build_runner, calibration_batches, weights_hash
from cxr_dist.data.index import load_index
from cxr_dist.model.classifier import build_model
from cxr_dist.data.stream import eval_loader
from tests.conftest import TINY

FP32 = ("channels_last", "onnxruntime", "openvino")
SIZE = 48  # the tiny shards' stored size: big enough for depth 1 to keep a 2 x 2 map


@pytest.fixture(scope="module")
def index(tiny_shards):
    return load_index(tiny_shards)


@pytest.fixture(scope="module")
def setup(tiny_shards, index, tmp_path_factory):
    cfg = load_config(TINY, ["--data.shards_dir", str(tiny_shards), "--loader.num_workers", "0",
                             "--loader.input_size", str(SIZE), "--model.backbone", "tf_efficientnet_lite1",
                             "--model.weights", "lite1-package"])
    model = build_model(cfg.model).eval()  # real ImageNet weights: realistic activation ranges
    images = torch.cat([b["image"] for b in eval_loader(cfg.loader, "val", 0, 1, index)])
    return cfg, model, images, tmp_path_factory.mktemp("exports")


@pytest.mark.parametrize("depth", [0, 1])
@pytest.mark.parametrize("backend", FP32)
def test_fp32_backends_equal_eager(setup, backend, depth):
    cfg, model, images, work = setup
    model.set_phase(depth)
    runner = build_runner(model, backend, depth, SIZE, work)
    want = model.frozen_forward(images)
    got = runner(images)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    model.set_phase(0)


def test_int8_stays_close_and_needs_calibration(setup, index):
    cfg, model, images, work = setup
    with pytest.raises(ConfigError, match="calibration"):
        build_runner(model, "int8", 0, SIZE, work)
    runner = build_runner(model, "int8", 0, SIZE, work, calibration=calibration_batches(cfg.loader, "train", index))
    want, got = model.frozen_forward(images), runner(images)
    cos = torch.nn.functional.cosine_similarity(got, want)
    assert cos.min() > 0.97, cos
    assert not torch.allclose(got, want, atol=1e-3)  # it is quantized, not the fp32 graph by mistake


def test_bad_backend_is_a_config_error(setup, tiny_shards):
    cfg, model, _, work = setup
    with pytest.raises(ConfigError, match="frozen_backend"):
        build_runner(model, "tensorrt", 0, SIZE, work)
    with pytest.raises(ConfigError, match="frozen_backend"):
        load_config(TINY, ["--model.frozen_backend", "tensorrt"])
    assert build_runner(model, "eager", 0, SIZE, work) is None


def test_export_is_kept_and_reused(setup, tmp_path):
    cfg, model, images, _ = setup
    first = build_runner(model, "onnxruntime", 0, SIZE, tmp_path)
    files = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert [p.suffix for p in files] == [".onnx"]
    again = build_runner(model, "onnxruntime", 0, SIZE, tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == files  # not exported again
    torch.testing.assert_close(again(images), first(images))
    # Other weights (a different backbone state) get another name: never a stale export.
    other = build_model(ModelConfig(backbone="tf_efficientnet_lite1", pretrained=False)).eval()
    assert weights_hash(other.backbone) != weights_hash(model.backbone)


def test_runner_is_used_only_at_its_depth_on_the_cpu_and_detached_after(setup, index):
    cfg, model, images, work = setup
    runner = build_runner(model, "int8", 0, SIZE, work, calibration=calibration_batches(cfg.loader, "train", index))
    eager = model.frozen_forward(images)
    with attached(model, runner):
        torch.testing.assert_close(model.frozen_forward(images), runner(images))  # through the runner
        model.set_phase(1)
        torch.testing.assert_close(model.frozen_forward(images), _eager_at(model, images))  # other depth: eager
        model.set_phase(0)
    assert model.frozen_runner is None
    torch.testing.assert_close(model.frozen_forward(images), eager)
    assert not any("runner" in k for k in model.state_dict())


def _eager_at(model, images):
    runner, model.frozen_runner = model.frozen_runner, None
    try:
        return model.frozen_forward(images)
    finally:
        model.frozen_runner = runner


def test_cache_through_a_backend_equals_the_eager_cache(setup, index, tmp_path):
    cfg, _, _, work = setup  # the caches go beside the exports made above: they are reused
    acc = Accelerator(cpu=True)
    caches = {}
    for backend in ("eager", "openvino", "int8"):
        c = load_config(TINY, ["--data.shards_dir", cfg.data.shards_dir, "--loader.num_workers", "0",
                               "--loader.input_size", str(SIZE), "--model.backbone", "tf_efficientnet_lite1",
                               "--model.weights", "lite1-package", "--model.frozen_backend", backend,
                               "--train.cache_views", "1", "--train.cache_dir", str(work),
                               "--train.run_dir", str(tmp_path / "run")])
        model = build_model(c.model)
        caches[backend] = frozen_caches(c, model, index, ["train"], "val", acc)
        assert model.frozen_runner is None  # detached once the cache is built
    (et, ev), (ot, ov) = caches["eager"], caches["openvino"]
    assert et.keys == ot.keys and et.feats.shape == ot.feats.shape
    torch.testing.assert_close(ot.feats.float(), et.feats.float(), atol=2e-2, rtol=1e-2)  # fp16 storage
    torch.testing.assert_close(ov.feats.float(), ev.feats.float(), atol=2e-2, rtol=1e-2)
    # int8 is a different cache file (other numerics), close to the eager one.
    names = sorted(p.name for p in work.glob("train-*.safetensors"))
    assert len(names) == 2  # eager and openvino share one (same numerics), int8 has its own
    it = caches["int8"][0]
    cos = torch.nn.functional.cosine_similarity(it.feats[0].float().flatten(1), et.feats[0].float().flatten(1))
    assert cos.min() > 0.9, cos


def test_int8_saturation_detection():
    from cxr_dist.model.frozen_runtime import int8_saturates

    avx2 = "fpu sse4_2 avx avx2 fma bmi2 sha_ni"  # this CI machine: AMD EPYC, AVX2, no VNNI
    assert int8_saturates(avx2, "x86_64")
    assert int8_saturates(avx2 + " avx512f avx512bw", "x86_64")  # AVX-512 without VNNI saturates too
    assert not int8_saturates(avx2 + " avx512f avx512_vnni", "x86_64")
    assert not int8_saturates(avx2 + " avx_vnni", "x86_64")
    assert not int8_saturates(avx2 + " avx_vnni_int8 amx_int8", "x86_64")
    assert int8_saturates("", "x86_64")  # unknown: accuracy first
    assert not int8_saturates("", "aarch64")


@pytest.mark.parametrize("saturates", [True, False])
def test_int8_recipe_cannot_saturate_without_vnni(setup, index, saturates):
    """Without VNNI (saturates) every int8 weight is within [-64, 63], so two uint8 x int8 products
    fit VPMADDUBSW's int16, and the depthwise convolutions and the stem stay fp32; with VNNI the
    weights use all 8 bits and every convolution is quantized."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from cxr_dist.model.frozen_runtime import FrozenPart, _exported, _quantized

    cfg, model, images, work = setup
    fp32 = _exported(FrozenPart(model, 0), 0, SIZE, work, lambda s: None)
    norm = build_runner(model, "channels_last", 0, SIZE, work).normalize
    path = _quantized(fp32, [norm(b).numpy() for b in calibration_batches(cfg.loader, "train", index)], lambda s: None,
                      saturates=saturates)
    assert ("int8w7" in path.name) == saturates
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    produced = {o: n for n in graph.node for o in n.output}
    quantized, fp32_convs, peak = 0, 0, 0
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        src = produced.get(node.input[1])
        if src is not None and src.op_type == "DequantizeLinear":
            w = inits[src.input[0]]
            assert w.dtype == np.int8
            peak = max(peak, int(np.abs(w.astype(np.int32)).max()))
            quantized += 1
        else:
            fp32_convs += 1
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            assert saturates and (group > 1 or fp32_convs == 1 and quantized == 0), node.name  # depthwise, stem
    assert quantized > 30
    if saturates:
        assert peak <= 64 and fp32_convs > 20  # the stem and the depthwise convolutions
    else:
        assert peak == 127 and fp32_convs == 0
