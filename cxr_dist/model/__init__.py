"""Stage 2, model: the network and everything about its frozen part, and checkpoints.

    classifier     timm backbone + MLP head, the depth at which it is split into frozen and
                   trainable parts, offline weights, parameter groups
    frozen_runtime the frozen part through a faster CPU runtime (ONNX Runtime, OpenVINO, int8)
    feature_cache  the frozen-compute cache: the frozen part run once, reused every epoch
    checkpoint     atomic, pickle-free checkpoints (safetensors + JSON)

May import: the root modules and data/. A new backbone family: classifier.py (where it is split).
"""
