"""The text a model reads, by sample key: embeddings computed once (frozen encoder) or tokens.

A text model's batches carry keys, not text: `logits_of` looks the keys up in the model's
`text_table` (a `TextTable`, attached with `attach_text`). With a frozen text encoder each text is
embedded once, before training, and the embeddings are kept on disk in `train.cache_dir` under a
hash of the encoder's weights, the fields and the texts (as the frozen-compute cache keeps image
features); with a trainable encoder (from the first phase with unfreeze_text_layers > 0 or
text_lora on) the table hands out tokens and the model runs the encoder every step.

Report supervision (`model.report_supervision`) uses a second table, of the report fields, whose
embeddings only the training loss reads (`report_loss`).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..fileio import write_bytes_atomic


class TextTable:
    """keys -> texts, with their embeddings when the encoder is frozen. `tokens=True` makes
    `lookup` hand out tokens for a trainable encoder instead of the (then stale) embeddings."""

    def __init__(self, texts: dict[str, str], encoder, emb: torch.Tensor | None, truncated: int = 0) -> None:
        self.keys = list(texts)
        self.row = {k: i for i, k in enumerate(self.keys)}
        self.texts = [texts[k] for k in self.keys]
        self.has = torch.tensor([bool(t) for t in self.texts])
        self.encoder, self.emb, self.truncated = encoder, emb, truncated
        self.tokens = False

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, keys: list[str]) -> list[int]:
        missing = [k for k in keys if k not in self.row]
        if missing:
            raise KeyError(f"no text for sample(s) {missing[:3]}: the text table was built for other splits")
        return [self.row[k] for k in keys]

    def lookup(self, keys: list[str], device: torch.device) -> dict:
        """The model's `text` input for a batch's keys (CXRClassifier's docstring)."""
        idx = self.rows(keys)
        has = self.has[idx].to(device)
        if self.tokens or self.emb is None:
            batch, _ = self.encoder.tokenize([self.texts[i] for i in idx])
            return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
                    "has": has}
        return {"emb": self.emb[idx].to(device, non_blocking=True), "has": has}


def _identity(encoder, texts: list[str], keys: list[str]) -> str:
    blob = json.dumps({"encoder": encoder.identity(), "keys": keys, "texts": texts}).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_table(texts: dict[str, str], encoder, cache_dir: Path | None, name: str,
                log: Callable[[str], None] = print, batch_size: int = 64) -> TextTable:
    """The table of `texts` (key -> text), embedded with the frozen `encoder` once: loaded from
    `cache_dir/<name>-<hash>.safetensors` when it is there, else computed (progress in the log) and saved."""
    keys = list(texts)
    values = [texts[k] for k in keys]
    path = Path(cache_dir) / f"text-{name}-{_identity(encoder, values, keys)}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        try:
            saved = load(path.read_bytes())
            log(f"loaded the text embeddings {path}")
            return TextTable(texts, encoder, saved["emb"], int(saved["truncated"].item()))
        except (SafetensorError, OSError, KeyError) as e:  # damaged: compute again, never trust it
            log(f"text cache {path} is unreadable ({type(e).__name__}: {e}); computing it again")
    t0, truncated = time.time(), 0
    # Each distinct non-empty text once (IU: both views of a study share their report).
    unique = sorted({v for v in values if v})
    vectors = torch.zeros(len(unique), encoder.dim)
    step = max(batch_size, len(unique) // 10 or 1)  # ~10 progress lines, whatever the size
    for start in range(0, len(unique), step):
        part, n_trunc = encoder.encode(unique[start : start + step], batch_size=batch_size)
        vectors[start : start + len(part)] = part
        truncated += n_trunc
        log(f"text embeddings ({name}): {min(start + step, len(unique))}/{len(unique)} distinct texts, "
            f"{time.time() - t0:.0f} s")
    if truncated:
        log(f"text embeddings ({name}): {truncated} of {len(unique)} texts were longer than model.max_tokens "
            "and were truncated")
    row = {text: i for i, text in enumerate(unique)}
    emb = torch.zeros(len(values), encoder.dim)  # empty texts stay zero: the model uses no_text for them
    filled = [i for i, v in enumerate(values) if v]
    if filled:
        emb[filled] = vectors[[row[values[i]] for i in filled]]
    if path is not None:
        write_bytes_atomic(path, save({"emb": emb.contiguous(), "truncated": torch.tensor([truncated])}))
    return TextTable(texts, encoder, emb, truncated)


def report_loss(projected: torch.Tensor, table: TextTable, keys: list[str]) -> torch.Tensor:
    """Report supervision: 1 - cosine between the model's projected hidden layer (forward with
    return_hidden) and the report's embedding, averaged over the batch's samples that have a
    report (0 when none has)."""
    idx = table.rows(keys)
    has = table.has[idx].to(projected.device)
    target = table.emb[idx].to(projected.device)
    cos = torch.nn.functional.cosine_similarity(projected.float(), target, dim=1)
    return ((1 - cos) * has).sum() / has.sum().clamp(min=1)
