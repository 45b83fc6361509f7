"""The Kaggle IU X-ray layout (format "iu"): manifest.build_manifest in the common row schema.

Keys, labels and paths are exactly build_manifest's, so shards and predictions made before the
multi-source pipeline stay comparable. IU has no patient id: the uid (one study) is both the
patient and the study. Column names in the output:

- ``findings``: the ``Problems`` field (what the label is read from), like the other formats'
  findings; ``report``: the report's findings + " " + impression text;
- legacy columns kept: ``uid``, ``projection``, ``problems``, ``impression``, and
  ``report_findings`` (the report's findings text, build_manifest's ``findings`` column).
"""
from __future__ import annotations

import pandas as pd

from ..config import SourceConfig
from ..manifest import build_manifest
from .common import skip

_VIEWS = {"frontal": "FRONTAL", "lateral": "LATERAL"}  # IU records no PA/AP


def read(src: SourceConfig) -> tuple[pd.DataFrame, list[dict]]:
    """Rows of the IU folder src.path (see the module docstring) and the skipped projection rows."""
    df, skipped = build_manifest(src.path, src.no_indexing)
    df = df.rename(columns={"findings": "report_findings"})
    df["patient"] = df["uid"]
    df["study"] = df["uid"]
    df["view"] = df["projection"].map(lambda p: _VIEWS.get(str(p).strip().lower(), ""))
    df["findings"] = df["problems"]
    df["report"] = (df["report_findings"].str.strip() + " " + df["impression"].str.strip()).str.strip()
    # The common fields first, then build_manifest's own (uid stays for split/shards).
    out = [{**skip(src, s["filename"], s["uid"], s["reason"], s["detail"]), **s} for s in skipped]
    return df, out
