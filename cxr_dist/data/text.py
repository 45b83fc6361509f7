"""The text of each sample, for image+text models, and the guard against reading the label.

Every shard sample's json carries its source's text fields under "text" (IU: indication,
comparison, findings, impression; shards.py), and index.json says per source which fields it has
(`text_fields`) and from which its label was derived (`label_text_fields`, IU: findings and
impression). A model reads the fields of `loader.text_fields`, joined into one string
("indication: ... comparison: ..."); a sample whose source has none of them has empty text.

The guard (`check_text_fields`): a field the label was derived from is refused as an input unless
`loader.allow_label_leakage` (a model reading IU's findings reads its own label: a TF-IDF model on
them alone scores 0.99; `cxr-dist audit-text` measures each field). The report's fields may still
shape training through report supervision (`model.report_supervision`), which prediction never reads.
"""
from __future__ import annotations

import json
import logging
import numbers
import tarfile
from collections.abc import Iterable, Iterator

from ..config import ConfigError, LoaderConfig
from .index import ShardIndex

log = logging.getLogger(__name__)


def clean(value: object) -> str:
    """Any cell -> one line of text, for the shards, the text encoder and prediction alike:
    None, pandas' NA and any non-integral number (NaN: an empty CSV cell) -> ""; an integer -> its
    digits; bytes decoded as UTF-8 and bytes that are not UTF-8 (also surrogate escapes, from
    command-line arguments and file names) replaced by U+FFFD; runs of whitespace (newlines, tabs,
    no-break spaces) collapsed to one space and the ends stripped."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return ""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", errors="replace")
    elif not isinstance(value, str):
        value = str(value)
    try:
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        value = value.encode("utf-8", "replace").decode("utf-8")
    return " ".join(value.split())


def joined_text(fields_text: dict, fields: Iterable[str]) -> str:
    """The input text of one sample: its non-empty `fields`, in order, as "field: text" lines
    joined by a space ("indication: Positive TB test. comparison: None.")."""
    parts = [(f, clean(fields_text.get(f))) for f in fields]
    return " ".join(f"{f}: {t}" for f, t in parts if t)


def sample_metas(index: ShardIndex, splits: Iterable[str]) -> Iterator[tuple[str, dict]]:
    """(key, json) of every sample of `splits`, reading only the json members of the shards (no
    image is decoded: a few seconds for IU)."""
    for shard in index.shards(list(splits)):
        with tarfile.open(shard.path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    yield member.name.split("/")[-1].split(".", 1)[0], json.loads(tar.extractfile(member).read())


def text_of(value: str | dict | None, fields: Iterable[str]) -> str:
    """A text given at prediction time -> the model's input text: a dict {field: text} is joined as
    in training; a plain string is the first field's text (loader.text_fields[0], e.g. the
    indication); None or empty -> "" (no text)."""
    fields = tuple(fields)
    if isinstance(value, dict):
        unknown = [f for f in value if f not in fields]
        if unknown:
            raise ValueError(f"text field(s) {', '.join(unknown)}: this model reads {', '.join(fields)}")
        return joined_text(value, fields)
    text = clean(value)
    return joined_text({fields[0]: text}, fields[:1]) if text and fields else ""


def read_texts(index: ShardIndex, splits: Iterable[str], fields: Iterable[str]) -> dict[str, str]:
    """Sample key -> joined text of `fields`, for every sample of `splits`."""
    fields = tuple(fields)
    return {key: joined_text(meta.get("text") or {}, fields) for key, meta in sample_metas(index, splits)}


def source_text_fields(index: ShardIndex) -> dict[str, dict[str, list[str]]]:
    """{source: {"text_fields": [...], "label_text_fields": [...]}} from the index; sources of an
    index written before text fields existed have none."""
    return {s.name: {"text_fields": list(s.text_fields), "label_text_fields": list(s.label_text_fields)}
            for s in index.sources}


def leaky_fields(index: ShardIndex, fields: Iterable[str]) -> list[str]:
    """The fields of `fields` that some source's label was derived from."""
    label = {f for info in source_text_fields(index).values() for f in info["label_text_fields"]}
    return [f for f in fields if f in label]


def check_text_fields(loader: LoaderConfig, reads_text: bool, report_supervision: bool, index: ShardIndex) -> list[str]:
    """Fail before any work when a text model's inputs are not in the shards or read the label.

    `reads_text`: the model reads loader.text_fields at prediction time (model.kind text or
    image+text); `report_supervision`: training reads loader.report_fields. Returns the input fields
    that leak the label (non-empty only with loader.allow_label_leakage, after a warning)."""
    if not (reads_text or report_supervision):
        return []
    per_source = source_text_fields(index)
    have = sorted({f for info in per_source.values() for f in info["text_fields"]})
    wanted = (list(loader.text_fields) if reads_text else []) + (list(loader.report_fields) if report_supervision else [])
    if reads_text and not loader.text_fields:
        raise ConfigError("model.kind reads text but loader.text_fields is empty: name the fields to read "
                          "(e.g. --loader.text_fields '[\"indication\"]')")
    missing = [f for f in wanted if f not in have]
    if missing:
        where = ", ".join(f"{s}: {', '.join(i['text_fields']) or 'none'}" for s, i in per_source.items())
        raise ConfigError(f"text field(s) {', '.join(missing)} are not in the shards {index.root} "
                          f"(text fields per source: {where}); shards prepared before text fields existed need "
                          "`cxr-dist prepare` again")
    leaks = leaky_fields(index, loader.text_fields) if reads_text else []
    if leaks and not loader.allow_label_leakage:
        raise ConfigError(
            f"loader.text_fields reads {', '.join(leaks)}, from which the label was derived: the model would read its "
            "own label at prediction time (a TF-IDF model on IU's findings alone scores 0.99; `cxr-dist audit-text` "
            "measures it). Use fields known before the film is read (indication, comparison), let the report shape "
            "training only (--model.report_supervision 0.1), or, to measure the leak on purpose, "
            "--loader.allow_label_leakage true (the run is tagged label_leakage=true)")
    if leaks:
        log.warning("LABEL LEAKAGE: the model reads %s, from which the label was derived; its scores measure the "
                    "leak, not the image (loader.allow_label_leakage = true)", ", ".join(leaks))
    return leaks
