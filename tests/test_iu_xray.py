"""Prepare the real shared IU X-ray copy (when present) and check its totals.

Located at <workspace>/shared/data/iu_xray_small (two levels above the repo) or $CXR_SHARED_DATA.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from cxr_dist.config import DataConfig
from cxr_dist.data.shards import write_shards


def _shared_data() -> Path:
    env = os.environ.get("CXR_SHARED_DATA")
    if env:
        p = Path(env)
        return p / "iu_xray_small" if (p / "iu_xray_small").is_dir() else p
    return Path(__file__).resolve().parents[2] / "shared/data/iu_xray_small"


@pytest.mark.slow
def test_prepare_shared_iu_xray(tmp_path):
    data = _shared_data()
    if not (data / "indiana_projections.csv").is_file():
        pytest.skip(f"shared IU X-ray data not found at {data} (set CXR_SHARED_DATA to its folder)")
    out = tmp_path / "shards"
    # 128 px keeps it quick; the counts do not depend on the size.
    cfg = DataConfig(data_dir=str(data), shards_dir=str(out), image_size=128)
    index = write_shards(cfg, out)
    t = index.totals
    assert t["rows"] == 6311 and t["samples"] + t["skipped"] == 6311
    # Nothing missing or corrupt in the shared copy; 3 rows name a film already taken (uid 1015 lists
    # its two films twice, uid 3245 one film as two frontal rows): exact duplicates, one copy kept.
    assert index.skipped == {"duplicate_image": 3, "no_indexing": 144}
    assert index.no_indexing_counts == {"treatment": "drop", "images": 144, "uids": 77}
    assert t["uids"] + 77 == 3252
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 147
    assert sorted({s["uid"] for s in skipped if s["reason"] == "duplicate_image"}) == ["1015", "3245"]
    all_uids = pd.read_csv(data / "indiana_projections.csv", dtype=str)["uid"].nunique()
    assert all_uids == 3252
    # no uid on two sides: per-split uid sets from the shards' sample assignment
    import webdataset as wds

    uids: dict[str, set[str]] = {}
    for name in index.split_names:
        files = [s.path for s in index.shards([name])]
        uids[name] = {json.loads(s["json"])["uid"] for s in wds.WebDataset(files, shardshuffle=False)}
        assert len(uids[name]) == index.split(name).uids
    names = list(uids)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not uids[a] & uids[b], (a, b)
    assert sum(len(u) for u in uids.values()) == t["uids"]
