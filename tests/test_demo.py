"""The demo that `./run.sh` runs with no argument (demo/, configs/demo.toml, issue 15).

(a) What the repository ships under demo/: the licence and attribution of the Kermany films, only
    Kermany films (names, layout, 224 px JPEG; nothing of IU X-ray, whose licence forbids
    redistribution), the counts that demo/README.md states, and, with the team's Kermany copy
    beside the repository, that demo/make_demo.py picks exactly these files, byte for byte.
(b) A real `./run.sh -- OVERRIDES` (the no-argument demo on a shortened schedule) into a temporary
    OUT and MLflow store: exit 0, test_evaluation.json with an AUROC, a finished MLflow run.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"
FILMS = DEMO / "kermany"
SHARED_KERMANY = ROOT.parent / "shared" / "data" / "kermany_pediatric"
# Kermany's file names: pneumonia personN_bacteria_K / personN_virus_K, normal IM-XXXX-YYYY and
# NORMAL2-IM-XXXX-YYYY. IU X-ray names look like 1_IM-0001-4001.dcm.png (Kaggle) or .dcm.jpg.
KERMANY_NAME = {"PNEUMONIA": re.compile(r"^person\d+_(bacteria|virus)(_\d+)+\.jpeg$"),
                "NORMAL": re.compile(r"^(NORMAL2-)?IM-\d{4}(-\d{4})+\.jpeg$")}
IU_NAME = re.compile(r"(^\d+_IM-\d+-\d+|\.dcm\.|indiana_)", re.IGNORECASE)
OTHER_FILES = {"README.md", "LICENSE", "make_demo.py"}
MAX_BYTES = 5_000_000


def films() -> list[Path]:
    return sorted(p for p in FILMS.rglob("*") if p.is_file())


def readme_counts() -> dict[str, int]:
    """The `| train/NORMAL | 75 |` rows of demo/README.md."""
    rows = re.findall(r"^\|\s*((?:train|test)/(?:NORMAL|PNEUMONIA))\s*\|\s*(\d+)\s*\|", (DEMO / "README.md").read_text(),
                      re.MULTILINE)
    return {k: int(v) for k, v in rows}


def test_licence_and_attribution():
    licence, readme = (DEMO / "LICENSE").read_text(), (DEMO / "README.md").read_text()
    for text in (licence, readme):
        assert "CC BY 4.0" in text and "10.17632/rscbjbr9sj.2" in text and "Kermany" in text
    assert "Apache-2.0" in licence  # says how the images differ from the code's licence
    assert "demo/README.md" in (ROOT / "README.md").read_text()  # the README points to the attribution


def test_only_kermany_films_in_the_expected_layout():
    top = {p.name for p in DEMO.iterdir() if p.name != "__pycache__"}
    assert top == OTHER_FILES | {"kermany"}, f"unexpected entries in demo/: {sorted(top - OTHER_FILES)}"
    every = [p for p in DEMO.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert not [p for p in every if IU_NAME.search(p.name)], "an IU X-ray file name under demo/"
    total = 0
    for p in films():
        subset, cls, name = p.relative_to(FILMS).parts  # exactly SUBSET/CLASS/NAME
        assert subset in ("train", "test") and cls in KERMANY_NAME, p
        assert KERMANY_NAME[cls].match(name), f"{p}: not a Kermany {cls} file name"
        head = p.read_bytes()
        total += len(head)
        assert head[:3] == b"\xff\xd8\xff", f"{p}: not a JPEG"
        # Kermany's shared copy is 224 x 224 (IU's is 256): SOF0/SOF2 marker gives the size
        m = re.search(rb"\xff[\xc0\xc2]..\x08(..)(..)", head, re.DOTALL)
        assert m and int.from_bytes(m.group(1)) == 224 and int.from_bytes(m.group(2)) == 224, p
    assert total < MAX_BYTES, f"demo films take {total / 1e6:.1f} MB"


def test_counts_match_readme():
    stated = readme_counts()
    assert set(stated) == {f"{s}/{c}" for s in ("train", "test") for c in ("NORMAL", "PNEUMONIA")}
    found = {k: 0 for k in stated}
    for p in films():
        found["/".join(p.relative_to(FILMS).parts[:2])] += 1
    assert found == stated
    text = (DEMO / "README.md").read_text()
    for cls in ("NORMAL", "PNEUMONIA"):  # the per-class totals in the prose
        n = stated[f"train/{cls}"] + stated[f"test/{cls}"]
        assert re.search(rf"\b{n}\s+{cls}\b", text), f"demo/README.md does not state {n} {cls}"


@pytest.mark.skipif(not SHARED_KERMANY.is_dir(), reason=f"the team's Kermany copy {SHARED_KERMANY} is absent")
def test_make_demo_reproduces_the_files_from_the_shared_copy():
    spec = importlib.util.spec_from_file_location("make_demo", DEMO / "make_demo.py")
    make_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_demo)
    rels = make_demo.select(SHARED_KERMANY, patients=80, seed=0)  # make_demo.py's defaults
    assert rels == ["/".join(p.relative_to(FILMS).parts) for p in films()]
    for r in rels:
        assert hashlib.sha256((FILMS / r).read_bytes()).digest() == hashlib.sha256(
            (SHARED_KERMANY / r).read_bytes()).digest(), f"{r} differs from the shared copy"


def test_demo_registers_its_model_under_its_own_name():
    """Issue 23.10: the demo's model must not compete for cxr-dist@best (the IU model's alias)."""
    from cxr_dist.config import TrackingConfig, load_config

    demo = load_config(str(ROOT / "configs" / "demo.toml"), [])
    assert demo.tracking.registered_model == "cxr-dist-demo" != TrackingConfig.registered_model
    for name in ("iu_xray_cached.toml", "offline.toml", "original.toml"):
        assert load_config(str(ROOT / "configs" / name), []).tracking.registered_model != "cxr-dist-demo", name


@pytest.mark.slow
def test_run_sh_without_argument_runs_the_demo(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    env.pop("CONFIG", None)
    # 1 + 1 epochs on 128 px inputs: the whole job in ~2-3 min on a busy 2-core CPU (start-up, the
    # frozen-compute cache and the two evaluations cost more than the epochs)
    overrides = ["--train.phases.0.epochs", "1", "--train.phases.1.epochs", "1", "--loader.input_size", "128"]
    proc = subprocess.run([str(ROOT / "run.sh"), "--", *overrides], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "out" / "demo" / "runs" / "demo"
    assert str(run_dir) in proc.stdout and "mlflow ui" in proc.stdout  # where to look next
    report = json.loads((run_dir / "test_evaluation.json").read_text())
    assert report["split"] == "test" and 0.0 <= report["image_level"]["auroc"] <= 1.0
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history) == 2  # the overrides reached training: 1 + 1 epochs
    assert "input_size = 128" in (run_dir / "config.toml").read_text()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cxr-dist-demo")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "val/auroc" in runs[0].data.metrics and "best_test/auroc" in runs[0].data.metrics
    # Its own registered model, tagged with the data it was validated on (issue 23.10).
    version = client.get_model_version_by_alias("cxr-dist-demo", "best")
    index = json.loads((tmp_path / "out" / "demo" / "shards" / "index.json").read_text())
    assert version.tags["data_key"] == f"{index['checksum']} val=val" and version.tags["val_metric"]
    assert "cxr-dist-demo@best" in proc.stdout
