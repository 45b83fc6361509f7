"""cxr-dist: distributed training of a chest X-ray normal/abnormal classifier (IU X-ray)."""

__version__ = "0.1.0"
