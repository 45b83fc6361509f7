"""`accelerate launch -m cxr_dist.train ...` (or `python -m cxr_dist.train`): the training entry point."""
import sys

from ..errors import run_main
from .loop import main

# Training configures logging itself, once its accelerator knows which process is the main one.
sys.exit(run_main("cxr_dist.train", main, setup_logging=False))
