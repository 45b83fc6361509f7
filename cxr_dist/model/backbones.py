"""Where a timm backbone splits into a frozen and a trainable part: its stem, its blocks, its neck.

Every supported backbone runs as one sequence,

    stem -> block 1 -> ... -> block N -> neck -> forward_head(pre_logits=True)

which is the same computation as timm's `forward_head(forward_features(x), pre_logits=True)`
(tests/test_backbones.py checks it at every depth, per family). A phase's `unfreeze_blocks = k`
trains the last k blocks and, with any block, the neck (and any parameters of timm's
`forward_head`, e.g. ConvNeXt's norm after pooling); everything before them is the frozen part,
which the frozen-compute cache stores and frozen_runtime.py exports.

The blocks are timm's own: its fine parameter groups (`model.group_matcher(coarse=False)`, the
groups timm's layer-wise learning-rate decay uses), in forward order, without the stem. Which
modules run in which order is per family (the table below: timm's `forward_features` is plain
code, not a list to walk); which of them form one block is timm's grouping, and `split_of` checks
that the two agree and that every parameter of the backbone has a place:

    family        a block is                                       N (examples)          neck
    EfficientNet  an inverted-residual block                       B1 23, Lite1 21       conv_head, bn2
    ResNet        a residual block (layerI.J)                      18: 8, 50: 16         (none)
    DenseNet      a dense layer, with the transition after it      121: 58               norm5
    ConvNeXt      a ConvNeXt block, with its stage's downsampling  atto 12, tiny 18      norm_pre, head.norm

A DenseNet dense layer reads the concatenation of all earlier outputs of its dense block and adds
its own: as a step of the sequence it maps x -> [x, layer(x)] (`DenseStep`), the same tensors
timm's DenseBlock concatenates.

Another timm family raises ConfigError at unfreeze_blocks > 0 (phase 1, the head alone, works for
any backbone with a pooled feature); adding one is a function here returning its
(stem, body, neck, head) modules.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError


class DenseStep(nn.Module):
    """One DenseNet dense layer as a step on the concatenated features: x -> [x, layer(x)].

    A wrapper only: not registered in the backbone, so state dicts and parameter lists are unchanged."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layer(x)], 1)


@dataclass(frozen=True, eq=False)
class Split:
    """A backbone as stem -> blocks -> neck (see the module docstring). The modules are the
    backbone's own (blocks of several modules in an unregistered nn.Sequential)."""

    name: str  # the timm model name
    family: str
    stem: tuple[nn.Module, ...]
    blocks: tuple[nn.Module, ...]
    neck: tuple[nn.Module, ...]  # run in order after the last block
    with_blocks: tuple[nn.Module, ...]  # train whenever any block does: the neck, forward_head's parameters

    def frozen(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        """Normalised input -> the input of block[-depth] (depth >= 1)."""
        for m in self.stem:
            x = m(x)
        return self.run(x, 0, len(self.blocks) - depth)

    def run(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks [start, stop) on `h`."""
        for block in self.blocks[start:stop]:
            h = block(h)
        return h

    def pooled(self, backbone: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """The last block's output -> the pooled feature (neck, then timm's forward_head)."""
        for m in self.neck:
            h = m(h)
        return backbone.forward_head(h, pre_logits=True)


def backbone_name(backbone: nn.Module) -> str:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(backbone).__name__


def _efficientnet(bb):
    body = [b for stage in bb.blocks for b in stage]
    return [bb.conv_stem, bb.bn1], body, [bb.conv_head, bb.bn2], []


def _resnet(bb):
    body = [b for layer in (bb.layer1, bb.layer2, bb.layer3, bb.layer4) for b in layer]
    return [bb.conv1, bb.bn1, bb.act1, bb.maxpool], body, [], []


def _densenet(bb):
    from timm.models.densenet import DenseBlock

    children = list(bb.features.children())
    dense = [i for i, m in enumerate(children) if isinstance(m, DenseBlock)]
    if not dense:
        raise _cannot(bb, "no DenseBlock in its features")
    body = []
    for m in children[dense[0] : dense[-1] + 1]:
        body += [DenseStep(layer) for layer in m.values()] if isinstance(m, DenseBlock) else [m]
    return children[: dense[0]], body, children[dense[-1] + 1 :], []


def _convnext(bb):
    body = [m for stage in bb.stages for m in (stage.downsample, *stage.blocks)]
    return [bb.stem], body, [bb.norm_pre], [bb.head]


def _families() -> list[tuple[type, str, object]]:
    from timm.models.convnext import ConvNeXt
    from timm.models.densenet import DenseNet
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet

    return [(EfficientNet, "EfficientNet", _efficientnet), (ResNet, "ResNet", _resnet),
            (DenseNet, "DenseNet", _densenet), (ConvNeXt, "ConvNeXt", _convnext)]


def _cannot(bb: nn.Module, what: str) -> ConfigError:
    return ConfigError(
        f"unfreeze_blocks > 0: cannot split the backbone {backbone_name(bb)!r} ({type(bb).__name__}) into "
        f"frozen and trainable blocks: {what}. Families that can: {', '.join(n for _, n, _ in _families())}; "
        "with any other timm backbone only the head trains (unfreeze_blocks = 0)."
    )


_SPLITS: "weakref.WeakKeyDictionary[nn.Module, Split]" = weakref.WeakKeyDictionary()


def split_of(backbone: nn.Module) -> Split:
    """The backbone's stem/blocks/neck (computed once per backbone object); ConfigError for a
    backbone that cannot be split, saying what it lacks."""
    split = _SPLITS.get(backbone)
    if split is None:
        split = _SPLITS[backbone] = _split(backbone)
    return split


def _split(bb: nn.Module) -> Split:
    from timm.models import group_parameters

    family = next(((name, units) for cls, name, units in _families() if isinstance(bb, cls)), None)
    if family is None:
        raise _cannot(bb, "no known sequence of stem, blocks and neck for this family")
    if not hasattr(bb, "group_matcher"):
        raise _cannot(bb, "it has no group_matcher (timm's parameter groups)")
    stem, body, neck, head = family[1](bb)
    # Drop no-op steps (ConvNeXt's first downsampling, a default norm_pre): nothing to run or train.
    stem, body, neck = ([m for m in ms if not isinstance(m, nn.Identity)] for ms in (stem, body, neck))
    names = {id(p): n for n, p in bb.named_parameters()}
    by_name = group_parameters(bb, bb.group_matcher(coarse=False), reverse=True)
    group = {id(p): by_name[n] for n, p in bb.named_parameters()}  # id(parameter) -> its timm group

    def groups_of(m: nn.Module) -> set[int]:
        return {group[id(p)] for p in m.parameters()}

    # The body in forward order, cut where timm's group changes; a module without parameters
    # goes with the next one that has some.
    blocks: list[list[nn.Module]] = []
    ids: list[int] = []
    pending: list[nn.Module] = []
    for m in body:
        g = groups_of(m)
        if not g:
            pending.append(m)
            continue
        if len(g) > 1:
            raise _cannot(bb, f"one step of its forward spans timm's groups {sorted(g)}")
        (gid,) = g
        if ids and gid == ids[-1]:
            blocks[-1] += [*pending, m]
        else:
            if ids and gid < ids[-1]:
                raise _cannot(bb, "timm's groups do not follow its forward order")
            blocks.append([*pending, m])
            ids.append(gid)
        pending = []
    if not blocks:
        raise _cannot(bb, "timm's groups give it no blocks")
    blocks[-1] += pending
    stem_groups = set().union(*map(groups_of, stem)) if stem else set()
    if stem_groups - {0} or ids[0] == 0:
        raise _cannot(bb, "its stem is not timm's first group")
    after = set().union(*map(groups_of, [*neck, *head])) if neck or head else set()
    if any(g < ids[-1] for g in after):
        raise _cannot(bb, "a part after its last block belongs to an earlier group")
    placed = {id(p) for m in [*stem, *body, *neck, *head] for p in m.parameters()}
    missing = [n for i, n in names.items() if i not in placed]
    if missing:
        raise _cannot(bb, f"parameters outside stem, blocks and neck: {', '.join(missing[:5])}")
    return Split(backbone_name(bb), family[0], tuple(stem),
                 tuple(b[0] if len(b) == 1 else nn.Sequential(*b) for b in blocks),
                 tuple(neck), tuple(m for m in [*neck, *head] if any(True for _ in m.parameters())))

