"""Phase-1 epoch throughput with decode in the workers (PIL) against decode on the device, and the
GPU's step rate, in one invocation (issue 16, item 3; docs/performance.md, "The input pipeline
on the device").

    python bench/bench_gpu_pipeline.py --data ../shared/data/iu_xray_small   # prepares shards first
    python bench/bench_gpu_pipeline.py --shards out/gpu/shards                # shards already there
    python bench/bench_gpu_pipeline.py                                        # synthetic 256 px images

Each repeat times, interleaved, on one warm GPU, with the same model (tf_efficientnet_lite1 + MLP
head, random weights, phase 1: head only), batch and precision:
- "step": `--steps` optimizer steps on uint8 images already on the device, as bench/bench_gpu.py
  times them (the goal's denominator);
- "workers": one epoch of the real `train.train_epoch` over `stream.train_loader` (PIL decode and
  augmentation in `--workers` DataLoader workers: loader.decode_on = workers);
- "device": the same epoch with loader.decode_on = device (workers read the tars; decode_jpeg and
  the batched augmentation of device_input.py run on the GPU);
- "input only": the same two loaders without the model (which side sets the pace).
One warm-up epoch of each first; then median [min-max] over `--repeats`. It also checks the eval
transform on the device against the workers path (max grey-level difference, share of pixels).
Runs on the CPU too (`--device cpu`, for a smoke test), where the numbers mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from cxr_dist.config import Config, DataConfig, LoaderConfig, ModelConfig, PhaseConfig, TrainConfig
from cxr_dist.data.device_input import DeviceInput
from cxr_dist.data.index import load_index
from cxr_dist.data.mixing import SampleWeightedLoss
from cxr_dist.model.classifier import build_model, param_groups
from cxr_dist.data.stream import eval_loader, train_loader
from cxr_dist.train.loop import train_epoch
from cxr_dist.train.state import Progress


def shards_for(args, tmp: Path) -> Path:
    """--shards as given; else shards prepared from --data (or a synthetic IU-layout dataset)."""
    if args.shards:
        return Path(args.shards)
    from cxr_dist.data.shards import write_shards

    data = args.data
    if not data:  # the test suite's generator (tests/ is no package of the install: run from its file)
        make_dataset = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tests" / "datagen.py"))["make_dataset"]
        data = make_dataset(tmp / "data", n_uids=args.synthetic_uids, size=args.image_size)
    out = tmp / "shards"
    cfg = DataConfig(data_dir=str(data), shards_dir=str(out), image_size=args.image_size,
                     prepare_workers=os.cpu_count() or 1)
    t0 = time.perf_counter()
    write_shards(cfg, str(out))
    print(f"prepared {out} from {data} in {time.perf_counter() - t0:.0f} s")
    return out


class _Autocast(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, autocast) -> None:
        super().__init__()
        self.model, self.autocast = model, autocast

    def forward(self, *args, **kwargs) -> torch.Tensor:
        with self.autocast():
            return self.model(*args, **kwargs)


class Bench:
    def __init__(self, args, shards: Path) -> None:
        self.args, self.device = args, torch.device(args.device)
        self.data = LoaderConfig(input_size=args.input_size, batch_size=args.batch_size, num_workers=args.workers)
        self.index = load_index(str(shards))
        self.cfg = Config(data=DataConfig(shards_dir=str(shards), image_size=args.image_size), loader=self.data,
                          train=TrainConfig(seed=0))
        torch.manual_seed(0)
        self.model = build_model(ModelConfig(backbone="tf_efficientnet_lite1", pretrained=False)).to(self.device)
        self.model.set_phase(0)
        self.optimizer = torch.optim.Adam(param_groups(self.model, PhaseConfig(epochs=1, unfreeze_blocks=0)))
        self.loss_fn = SampleWeightedLoss(None).to(self.device)
        bf16 = args.precision == "bf16"
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.run_model = _Autocast(self.model, self.autocast)  # the forward only, as Accelerate wraps it
        # What train_epoch needs of an Accelerator, one process: the step, as Accelerate runs it.
        self.accelerator = SimpleNamespace(device=self.device, process_index=0, is_main_process=False,
                                           sync_gradients=True, accumulate=lambda m: contextlib.nullcontext(),
                                           backward=lambda loss: loss.backward(), clip_grad_norm_=lambda *a: None)
        self.epoch = 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step_rate(self) -> float:
        """bench/bench_gpu.py's measure: steps on uint8 images already on the device."""
        s = self.args.input_size
        x = torch.randint(0, 255, (self.args.batch_size, 1, s, s), dtype=torch.uint8, device=self.device)
        y = torch.randint(0, 2, (self.args.batch_size,), device=self.device)
        self.model.train()

        def step() -> None:
            with self.autocast():
                loss = torch.nn.functional.cross_entropy(self.model(x).float(), y)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        for _ in range(5):
            step()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(self.args.steps):
            step()
        self.sync()
        return self.args.steps * self.args.batch_size / (time.perf_counter() - t0)

    def epoch_rate(self, on_device: bool) -> float:
        """One epoch of the real train_epoch (forward, weighted loss, backward, step, per-step
        loss.item() and probabilities to the CPU, as a run does)."""
        loader, n = train_loader(self.data, ["train"], 0, 1, 0, self.index, on_device=on_device)
        inputs = DeviceInput(self.data, self.device, seed=0) if on_device else None
        self.epoch += 1
        self.sync()
        t0 = time.perf_counter()
        run = SimpleNamespace(cfg=self.cfg, accelerator=self.accelerator, wrapped=self.run_model, optimizer=self.optimizer,
                              loss_fn=self.loss_fn, loader=loader, batches_per_epoch=n, progress=Progress(),
                              inputs=inputs, reports=None, findings_loss=None, watch=SimpleNamespace(requested=lambda: False))
        train_epoch(run, self.epoch)
        self.sync()
        return n * self.args.batch_size / (time.perf_counter() - t0)

    def input_rate(self, on_device: bool) -> float:
        loader, n = train_loader(self.data, ["train"], 0, 1, 0, self.index, on_device=on_device)
        inputs = DeviceInput(self.data, self.device, seed=0) if on_device else None
        self.sync()
        t0 = time.perf_counter()
        for batch in inputs.batches(loader, 0, n) if inputs else loader:
            batch["image"].to(self.device, non_blocking=True)
        self.sync()
        return n * self.args.batch_size / (time.perf_counter() - t0)

    def eval_difference(self) -> str:
        """The eval transform on the device against the workers path, over the val split."""
        inputs = DeviceInput(self.data, self.device, augment=False)
        worst, differ, total = 0, 0, 0
        for plain, raw in zip(eval_loader(self.data, "val", 0, 1, self.index),
                              eval_loader(self.data, "val", 0, 1, self.index, on_device=True)):
            d = inputs(raw)["image"].cpu().int() - plain["image"].int()
            worst, differ, total = max(worst, int(d.abs().max())), differ + int((d != 0).sum()), total + d.numel()
        return f"max |difference| {worst} grey level(s), {differ / max(total, 1):.4%} of {total:,} pixels differ"


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):,.0f} [{min(xs):,.0f}-{max(xs):,.0f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", help="prepared shards (index.json); else --data or synthetic images are prepared")
    ap.add_argument("--data", help="a Kaggle-layout IU X-ray folder to prepare shards from")
    ap.add_argument("--synthetic-uids", type=int, default=2300, help="without --shards/--data: studies (~2 images each)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=3, help="DataLoader workers (the GPU runs used 3)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--input-size", type=int, default=240)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args, shards_for(args, Path(tmp)))
        name = torch.cuda.get_device_name() if bench.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
        n_train = bench.index.split("train").total
        print(f"{name}, torch {torch.__version__}, {args.precision}, batch {args.batch_size}, {args.image_size} -> "
              f"{args.input_size} px, {args.workers} workers, {n_train} training images, phase 1 (head only)")
        print(f"eval transform, device vs workers: {bench.eval_difference()}")
        bench.step_rate(), bench.epoch_rate(False), bench.epoch_rate(True)  # warm-up: cudnn, workers, nvJPEG
        rates: dict[str, list[float]] = {k: [] for k in ("step", "workers", "device", "in-workers", "in-device")}
        for r in range(args.repeats):
            rates["step"].append(bench.step_rate())
            rates["workers"].append(bench.epoch_rate(False))
            rates["device"].append(bench.epoch_rate(True))
            rates["in-workers"].append(bench.input_rate(False))
            rates["in-device"].append(bench.input_rate(True))
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()), flush=True)
    step = statistics.median(rates["step"])
    print("\n| images/s, median [min-max] | workers (PIL) | device | step rate (bench_gpu) |")
    print("|---|---|---|---|")
    print(f"| phase-1 epoch (train_epoch) | {summary(rates['workers'])} | {summary(rates['device'])} | "
          f"{summary(rates['step'])} |")
    print(f"| input only | {summary(rates['in-workers'])} | {summary(rates['in-device'])} | |")
    print(f"| epoch / step rate | {statistics.median(rates['workers']) / step:.0%} | "
          f"{statistics.median(rates['device']) / step:.0%} | goal: device >= 80% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
