"""Test-only launcher: test-time augmentation through evaluate_split, on however many processes
`accelerate launch` starts; the main process writes the predictions as CSV.

    accelerate launch ... -m tests.tta_probe SHARDS_DIR VIEWS OUT_CSV
"""
import sys
from pathlib import Path

import torch

from cxr_dist import dist
from cxr_dist.config import load_config
from cxr_dist.data.index import load_index
from cxr_dist.eval.evaluate import Scoring, evaluate_split, predictions_csv
from tests.conftest import TINY


class Brightness(torch.nn.Module):
    """P(abnormal) rises with mean brightness: an output that follows every change of the image
    (the tiny trained model's barely moves), so differing views show."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.float().mean((1, 2, 3)) / 32 - 2
        return torch.stack([torch.zeros_like(z), z], 1)


def main() -> int:
    shards, views, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cfg = load_config(str(TINY), [])
    accelerator = dist.make_accelerator(cfg.train, cfg.optimizer, cfg.loader)
    result = evaluate_split(Brightness(), cfg.loader, "test", accelerator, load_index(shards),
                            Scoring(views=views, with_predictions=True))
    if accelerator.is_main_process:
        Path(out).write_text(predictions_csv({"test": result["predictions"]}))
    print(f"rank {accelerator.process_index}/{accelerator.num_processes} done")
    dist.hard_exit_if_distributed(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
