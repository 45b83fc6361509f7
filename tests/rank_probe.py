"""Test-only launcher: train like `cxr_dist.train`, then save THIS rank's parameters.

Lets a test compare the ranks of a real multi-process run (`accelerate launch -m tests.rank_probe
OUT_DIR --config ...`). Production code never writes from non-main ranks; this probe does, on purpose.
"""
import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file

from cxr_dist import dist
from cxr_dist.config import load_config
from cxr_dist.runs.tracking import make_tracker
from cxr_dist.data.index import load_index
from cxr_dist.train.loop import train


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--config")
    args, overrides = ap.parse_known_args()
    cfg = load_config(args.config, overrides)
    accelerator = dist.make_accelerator(cfg.train, cfg.optimizer, cfg.loader)
    with make_tracker(cfg.tracking, accelerator.is_main_process, cfg.train.run_dir) as tracker:
        finished, model = train(cfg, accelerator, tracker, load_index(cfg.data.shards_dir))
        if not finished:
            tracker.finish("KILLED")
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    save_file(state, f"{args.out}/rank{accelerator.process_index}.safetensors")
    print(f"rank {accelerator.process_index}/{accelerator.num_processes} finished={finished}")
    dist.hard_exit_if_distributed(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
