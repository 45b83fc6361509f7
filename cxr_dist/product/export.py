"""`cxr-dist export --checkpoint CKPT --format onnx --out model.onnx`: a checkpoint -> one ONNX file.

The graph takes exactly what `predict` gives the model: input ``image``, uint8
``[batch, 1, S, S]`` (S = the run's loader.input_size; the film read as `prepare` reads it, then
the evaluation transform), and normalises it inside, as CXRClassifier does. Outputs:

- ``prob_abnormal`` float32 ``[batch]`` = softmax(logits / T)[:, 1], the calibration temperature
  T (meta.json "calibration") folded into the graph; T = 1 with ``--uncalibrated`` or for a
  checkpoint without one;
- ``logits`` float32 ``[batch, 2]``, uncalibrated.

The batch dimension is dynamic. The file's metadata_props say how a film must be read to feed
it (input_size, image_size, resize, intensity), the temperature, the threshold on the scale of
``prob_abnormal`` when the run picked one, the backbone and the cxr-dist version. One test-time
view only: averaging augmented views (`predict --tta`) stays outside the graph.

    from cxr_dist.product.export import export_onnx, check_parity
    path = export_onnx("runs/x", "model.onnx")                # a run dir -> its best checkpoint
    check_parity(path, "runs/x")                               # {"max_prob_diff": ..., ...}

    sess = onnxruntime.InferenceSession("model.onnx")
    prob, logits = sess.run(None, {"image": x_uint8})          # x: N x 1 x S x S
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import UserError, run_main
from ..fileio import write_bytes_atomic

# torch, onnx and the model are imported inside the functions: `cxr-dist export --help` is instant.
INPUT, OUTPUTS = "image", ("prob_abnormal", "logits")
FINDINGS_OUTPUT = "finding_probs"  # a third output for a model with a findings head
# The dynamo exporter writes opset 18 and up; asked for less it keeps 18 after a failed
# down-conversion (torch 2.14: "No Adapter To Version 17 for Pad"), so older opsets go through
# the TorchScript exporter, which writes them directly.
DYNAMO_MIN_OPSET = 18
MIN_OPSET = 13  # Softmax over one axis (opset 13 semantics); older runtimes are not supported
PARITY_TOL = 1e-4  # max |p_onnx - p_torch| that the CLI accepts; float32 reorderings give ~1e-7


def _load(checkpoint: str | Path, calibrated: bool):
    """The checkpoint as a Product on the CPU (inference.Product.load: model in eval mode, data
    settings, temperature and threshold on the scale of the exported prob_abnormal)."""
    import torch

    from .inference import Product

    return Product.load(checkpoint, calibrated=calibrated, views=1, device=torch.device("cpu"))


def load_model(checkpoint: str | Path):
    """(model in eval mode on the CPU, meta) of a checkpoint, through Product.load (kept for
    bench/bench_onnx.py)."""
    product = _load(checkpoint, calibrated=True)
    return product.model, product.meta


def temperature_of(meta: dict[str, Any]) -> float:
    """calibrate.temperature_of (kept for bench/bench_onnx.py)."""
    from ..eval.calibrate import temperature_of as stored

    return stored(meta)


def _check_out(out: Path) -> None:
    """Fail before an export of tens of seconds when the file cannot be written."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the file to write, e.g. {out / 'model.onnx'}")
    parent = out.parent
    while not parent.exists():  # write_bytes_atomic creates the missing folders
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: {parent} is a file, not a folder")
    if not _writable(parent):
        raise UserError(f"cannot write {out}: no permission to write in {parent}")


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _export_proto(wrapper, example, opset: int | None, outputs: tuple[str, ...] = OUTPUTS):
    """torch -> onnx.ModelProto with a dynamic batch dimension.

    Both exporters were tried on tf_efficientnet_lite1 (ReLU6, depthwise convs, TF "same"
    padding, BatchNorm in eval) and efficientnet_b1 (SiLU): both match torch to ~1e-7. The dynamo
    exporter (torch.export) is the default: its graph has 134 nodes against 671, because the
    BatchNorms are folded into the convolutions and the "same" padding, computed at run time by
    the TorchScript graph (Shape, Ceil, Pad... per conv), is a constant for the fixed S; on
    onnxruntime it ran 1.1-1.2x faster (bench/bench_onnx.py, docs/performance.md), and the
    TorchScript exporter is deprecated. Its one drawback is export time (15-50 s against 2-8 s on
    2 busy cores). Opsets below 18 need the TorchScript exporter (see DYNAMO_MIN_OPSET).
    """
    import torch

    if opset is None or opset >= DYNAMO_MIN_OPSET:
        # An example batch of 2: torch.export specialises a dimension seen as 0 or 1 to a constant.
        program = torch.onnx.export(
            wrapper, (example,), input_names=[INPUT], output_names=list(outputs), opset_version=opset,
            dynamic_shapes={INPUT: {0: torch.export.Dim("batch", min=1)}}, dynamo=True, verbose=False,
        )
        return program.model_proto
    import io
    import warnings

    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():  # its deprecation notice, and tracer notes on the static channel test
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (example,), buf, input_names=[INPUT], output_names=list(outputs), opset_version=opset,
            dynamic_axes={name: {0: "batch"} for name in (INPUT, *outputs)}, dynamo=False,
        )
    return onnx.load_from_string(buf.getvalue())


def opset_of(proto) -> int:
    """The default-domain opset of an ONNX model."""
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def export_onnx(checkpoint: str | Path, out: str | Path, *, calibrated: bool = True,
                opset: int | None = None) -> Path:
    """Write the checkpoint's model as ONNX to `out` (atomically) and return the path.

    `calibrated=False` exports T = 1 (prob_abnormal = softmax(logits)[:, 1]). `opset`: default
    the dynamo exporter's own (18 or more); 13-17 go through the TorchScript exporter. Raises
    CheckpointError for a missing or corrupt checkpoint, UserError for an unwritable `out` or an
    opset outside what onnx supports.
    """
    import onnx

    out = Path(out)
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not MIN_OPSET <= opset <= newest:
        raise UserError(f"--opset {opset}: choose one in {MIN_OPSET}..{newest} (onnx {onnx.__version__})")
    _check_out(out)
    import torch

    from .inference import CalibratedClassifier

    product = _load(checkpoint, calibrated)
    if product.model.uses_text:
        # The graph would need the tokenizer (not an ONNX op) or token ids as a second input.
        raise UserError(f"{checkpoint}: a model of kind {product.model.kind!r} reads text; ONNX export covers "
                        "image models only (serve it with `mlflow models serve`, or predict with --text)")
    data, loader, meta, temperature = product.data, product.loader, product.meta, product.temperature
    findings = product.model.findings
    wrapper = CalibratedClassifier(product.model, temperature, product.readout.finding_temperatures).eval()
    example = torch.randint(0, 256, (2, 1, loader.input_size, loader.input_size), dtype=torch.uint8)
    with torch.no_grad():
        proto = _export_proto(wrapper, example, opset, OUTPUTS + (FINDINGS_OUTPUT,) * bool(findings))
    if opset is not None and opset_of(proto) != opset:
        raise UserError(f"--opset {opset}: the exporter wrote opset {opset_of(proto)} instead")
    props = {
        "cxr_dist_version": __version__, "backbone": meta["config"]["model"]["backbone"],
        "input_size": loader.input_size, "image_size": data.image_size, "resize": data.resize,
        "intensity": data.intensity, "temperature": repr(temperature), "calibrated": str(calibrated).lower(),
        "input": f"{INPUT}: uint8 [batch, 1, {loader.input_size}, {loader.input_size}], the eval-transformed film",
        "outputs": "prob_abnormal: float32 [batch] = softmax(logits / temperature)[:, 1]; logits: float32 [batch, 2]",
    }
    threshold = product.threshold  # stored on the calibrated scale, mapped to the network's when uncalibrated
    if threshold is not None:
        props["threshold"] = repr(threshold)
    if findings:  # the third output's columns, and where each is called positive
        props["outputs"] += (f"; {FINDINGS_OUTPUT}: float32 [batch, {len(findings)}] = sigmoid(finding_logits / "
                             "finding_temperatures), one column per finding")
        props["findings"] = ",".join(findings)
        props["finding_temperatures"] = ",".join(repr(t) for t in product.readout.finding_temperatures)
        props["finding_thresholds"] = ",".join("" if t is None else repr(t) for t in product.readout.finding_thresholds)
    onnx.helper.set_model_props(proto, {k: str(v) for k, v in props.items()})
    proto.doc_string = "cxr-dist chest X-ray normal/abnormal classifier (cxr-dist export)"
    onnx.checker.check_model(proto, full_check=True)  # full_check: shape inference too
    try:
        write_bytes_atomic(out, proto.SerializeToString())
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def onnx_session(path: str | Path, threads: int = 0):
    """An onnxruntime CPU session for an exported file (`threads` 0 = onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an exported file."""
    return dict(onnx_session(path).get_modelmeta().custom_metadata_map)


def check_parity(onnx_path: str | Path, checkpoint: str | Path, *, calibrated: bool = True,
                 batch_sizes: tuple[int, ...] = (1, 3), seed: int = 0) -> dict[str, Any]:
    """The exported file against the checkpoint in torch on random uint8 images: the largest
    |p_onnx - p_torch| and |logits_onnx - logits_torch|, p_torch = softmax(model(x) / T)[:, 1]
    with T taken from the checkpoint (not from the file's metadata, so a wrong fold shows)."""
    import numpy as np
    import torch

    from .inference import CalibratedClassifier

    product = _load(checkpoint, calibrated)
    model, size, temperature = product.model, product.loader.input_size, product.temperature
    sess = onnx_session(onnx_path)
    gen = torch.Generator().manual_seed(seed)
    dp = dl = df = 0.0
    for n in batch_sizes:
        x = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=gen)
        with torch.no_grad():
            logits = model(x)
        p = torch.softmax(logits / temperature, dim=1)[:, 1]
        p_onnx, logits_onnx = sess.run(list(OUTPUTS), {INPUT: x.numpy()})
        if model.findings:  # the findings' calibrated probabilities, against torch's
            with torch.no_grad():
                _, f_torch = CalibratedClassifier(model, temperature, product.readout.finding_temperatures)(x)[1:]
            (f_onnx,) = sess.run([FINDINGS_OUTPUT], {INPUT: x.numpy()})
            df = max(df, float(np.abs(f_onnx - f_torch.numpy()).max()))
        if p_onnx.shape != (n,) or logits_onnx.shape != (n, 2):
            raise AssertionError(f"batch {n}: ONNX outputs shaped {p_onnx.shape}, {logits_onnx.shape}")
        dp = max(dp, float(np.abs(p_onnx - p.numpy()).max()))
        dl = max(dl, float(np.abs(logits_onnx - logits.numpy()).max()))
    out = {"max_prob_diff": dp, "max_logit_diff": dl, "batch_sizes": list(batch_sizes), "temperature": temperature}
    if model.findings:
        out["max_finding_prob_diff"] = df
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cxr-dist export", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir (e.g. runs/x/checkpoints/best) or a run dir (its best checkpoint)")
    ap.add_argument("--format", default="onnx", help="output format: onnx (the only one)")
    ap.add_argument("--out", required=True, help="file to write, e.g. model.onnx")
    ap.add_argument("--uncalibrated", action="store_true", help="prob_abnormal without the calibration temperature (T = 1)")
    ap.add_argument("--opset", type=int, help=f"ONNX opset (default: the exporter's, >= {DYNAMO_MIN_OPSET})")
    args = ap.parse_args(argv)
    if args.format.lower() != "onnx":
        raise UserError(f"--format {args.format!r}: only 'onnx' is supported")
    path = export_onnx(args.checkpoint, args.out, calibrated=not args.uncalibrated, opset=args.opset)
    meta = metadata(path)
    import onnx

    size = path.stat().st_size / 1e6
    opset = opset_of(onnx.load(str(path), load_external_data=False))
    print(f"wrote {path} ({size:.1f} MB, opset {opset}): image uint8 [batch, 1, {meta['input_size']}, "
          f"{meta['input_size']}] -> prob_abnormal (T = {meta['temperature']}), logits")
    parity = check_parity(path, args.checkpoint, calibrated=not args.uncalibrated)
    ok = parity["max_prob_diff"] < PARITY_TOL
    print(f"parity vs torch on random images, batches {parity['batch_sizes']}: max |dp| = "
          f"{parity['max_prob_diff']:.2e}, max |dlogit| = {parity['max_logit_diff']:.2e}: "
          f"{'ok' if ok else f'FAILED (tolerance {PARITY_TOL:g})'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_main("cxr-dist export", main))
