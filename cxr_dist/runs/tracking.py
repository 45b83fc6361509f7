"""MLflow tracking on the main process, and a do-nothing stand-in everywhere else.

    tracker = make_tracker(cfg.tracking, accelerator.is_main_process, cfg.train.run_dir)
    with tracker:                      # exception -> run FAILED, Ctrl-C -> KILLED, else FINISHED
        tracker.log_params(to_dict(cfg))
        tracker.log_metrics({"train/loss": 0.4, "val/auroc": 0.8}, step=epoch)

Where runs go: `tracking.uri`, else $MLFLOW_TRACKING_URI, else a SQLite file `./mlflow.db` with
artifacts in `./mlartifacts/` (no server needed). An http(s) server is checked before training
starts, so a wrong URL fails in seconds instead of after the first epoch.

The MLflow run id is kept in `run_dir/mlflow_run_id.txt`: a resumed training continues its run.
Logging failures after the start are warned about and skipped; a lost metric must not kill a
multi-hour GPU job.

MLflow's own environment variables are honoured as its clients do: $MLFLOW_RUN_ID logs into that
existing run, $MLFLOW_EXPERIMENT_NAME names the experiment when `tracking.experiment` is left at
its default. With `tracking.campaign` (k-fold), the run is nested under the campaign's parent run
(`campaign_parent_run`).
"""
from __future__ import annotations

import logging
import math
import os
import random
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Callable

from .. import fileio
from ..config import Config, TrackingConfig
from ..errors import UserError

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id.txt"
# Model-version tags: what the version was validated on (`data_key`: the shards' index checksum and
# the val split) and by which metric (`val_metric`; its value is the tag val/<metric>). The alias
# compares a new version only with versions of the same data_key and metric.
DATA_KEY_TAG = "data_key"
VAL_METRIC_TAG = "val_metric"
DEFAULT_EXPERIMENT = TrackingConfig.experiment  # "cxr-dist"
# k-fold campaigns: every run of a campaign (parent and folds) has the tag campaign=<id>; the parent
# also has CAMPAIGN_PARENT_TAG ("pending" while it is being elected, then "confirmed"), and each
# fold run MLflow's own nesting tag mlflow.parentRunId=<parent run id>.
CAMPAIGN_TAG = "campaign"
CAMPAIGN_PARENT_TAG = "cxr.campaign_parent"
PARENT_RUN_TAG = "mlflow.parentRunId"
CAMPAIGN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_KEY = 250  # MAX_ENTITY_KEY_LENGTH
# MLflow's HTTP client retries 7 times with exponential backoff by default (minutes of stall
# per call when a server is down); these defaults keep a hiccup short. The user's values win.
ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # Logging the servable model downloads its artifacts once to check the input example; its
    # progress bars would land in SLURM logs (the training's own bars only show on a terminal).
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def resolve_uri(uri: str = "") -> str:
    """The tracking URI to use: `uri`, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def resolve_experiment(name: str) -> str:
    """The experiment to log to: `name`, unless it is the default ("cxr-dist") and
    $MLFLOW_EXPERIMENT_NAME is set; then the variable.

    MLflow's clients let MLFLOW_EXPERIMENT_NAME choose the experiment when the code names none;
    here "names none" is "tracking.experiment left at its default" (the config cannot tell an
    explicit "cxr-dist" from the default, so that value counts as unset too).
    """
    env = os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip()
    return env if env and name == DEFAULT_EXPERIMENT else name


def _search_all(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    from mlflow.entities import ViewType

    return list(client.search_runs([experiment_id], filter_string=filter_string,
                                   run_view_type=ViewType.ACTIVE_ONLY, max_results=1000))


def campaign_parent_run(client: Any, experiment_id: str, campaign: str, *, stale_s: float = 60.0,
                        timeout_s: float = 300.0, sleep: Callable[[float], None] = time.sleep) -> str:
    """The id of campaign `campaign`'s parent run in the experiment, created if there is none.

    Called by every array task of a k-fold campaign, possibly at the same moment. Why not simpler:
    users submit `sbatch slurm/kfold.sh` directly, so no submitting side exists that could create
    the parent once before the tasks start; MLflow run ids are random, so the parent cannot be
    found by a deterministic id; and MLflow has no "create if absent" for runs. A plain
    search-then-create lets two tasks that search at the same moment create two parents. So a
    parent is elected (a lock-free "create, then check" protocol over MLflow's store, which is
    consistent: a search sees every run created before it):

    1. search the campaign's live parents. One with the tag "confirmed" -> that is the parent.
       A "pending" one (another task is between steps 2 and 3) -> wait a moment, search again.
    2. none: create a candidate with the tag "pending", then search again.
    3. the candidate is the only live parent -> tag it "confirmed": it is the parent. Otherwise
       (another task created one at the same time) delete the candidate, wait a random moment
       (so that the tasks do not collide again) and start over at 1.

    Two parents can never both be confirmed: each was alone at its creator's second search, which
    came after its creation, so whichever creation came first would have been seen by the other's
    second search. A candidate left "pending" by a task that died between 2 and 3 is ignored once
    it is older than `stale_s` (the only place where clocks matter). Raises TimeoutError after
    `timeout_s`; MLflow errors propagate (the tracker then starts the fold run without a parent).
    """
    from mlflow.entities import RunStatus

    base = f"tags.{CAMPAIGN_TAG} = '{campaign}' and tags.`{CAMPAIGN_PARENT_TAG}` != ''"

    def live(exclude: str = "") -> list[Any]:
        now_ms = time.time() * 1000
        return [r for r in _search_all(client, experiment_id, base) if r.info.run_id != exclude
                and (r.data.tags.get(CAMPAIGN_PARENT_TAG) == "confirmed"
                     or now_ms - (r.info.start_time or 0) < stale_s * 1000)]

    deadline = time.monotonic() + timeout_s
    attempt = 0
    while time.monotonic() < deadline:
        parents = live()
        confirmed = sorted((r for r in parents if r.data.tags.get(CAMPAIGN_PARENT_TAG) == "confirmed"),
                           key=lambda r: (r.info.start_time or 0, r.info.run_id))
        if confirmed:
            return confirmed[0].info.run_id
        attempt += 1
        if parents:  # another task is deciding: its candidate is confirmed or deleted in a moment
            sleep(random.uniform(0.2, 1.0))
            continue
        mine = client.create_run(experiment_id, run_name=f"campaign-{campaign}",
                                 tags={CAMPAIGN_TAG: campaign, CAMPAIGN_PARENT_TAG: "pending"}).info.run_id
        if not live(exclude=mine):
            client.set_tag(mine, CAMPAIGN_PARENT_TAG, "confirmed")
            # The parent only groups its folds; it has no work of its own to be RUNNING for.
            client.set_terminated(mine, RunStatus.to_string(RunStatus.FINISHED))
            return mine
        client.delete_run(mine)
        sleep(random.uniform(0.1, 0.5) * min(attempt, 8))
    raise TimeoutError(f"no parent run for campaign {campaign!r} after {timeout_s:.0f} s")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise UserError at once if an http(s) tracking server does not answer; other URIs pass."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError as e:
        # An answer at all (401 behind auth, 404 behind a path prefix) means something listens;
        # MLflow's own client reports the details. Only server errors are treated as down.
        if e.code < 500:
            return
        reason = f"HTTP {e.code} from {url}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = str(getattr(e, "reason", e))
    raise UserError(
        f"MLflow tracking server at {uri} cannot be reached: {reason}; start it with "
        "`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --host 127.0.0.1 --port 5000 "
        "--workers 1 --backend-store-uri sqlite:///mlflow.db`, or unset MLFLOW_TRACKING_URI "
        "(and tracking.uri) to log to a local file, or set tracking.enabled=false"
    )


def flatten_params(d: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"phases": [{"lr": 1e-3}]}} -> {"train.phases.0.lr": "0.001"}; values as strings.

    Values longer than MLflow's limit are cut (marked with "...") rather than rejected.
    """
    out: dict[str, str] = {}
    items = d.items() if isinstance(d, dict) else enumerate(d)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict) or (isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v)):
            out.update(flatten_params(v, key + "."))
            continue
        text = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - 3] + "..."
        out[key[:MAX_KEY]] = text
    return out


def _as_float(v: Any) -> float | None:
    """A finite Python float from a number, numpy scalar or 1-element tensor; None otherwise."""
    if isinstance(v, str) or v is None:
        return None
    try:
        x = float(v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v)
    except (TypeError, ValueError, RuntimeError):
        return None
    return x if math.isfinite(x) else None


class Tracker:
    """What the training loop may call; this base does nothing (the stand-in on other ranks)."""

    run_id: str | None = None

    def log_params(self, params: dict) -> None:
        """Log (nested) hyper-parameters once; unchanged values are skipped on resume."""

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Log finite scalar metrics (e.g. "train/loss", "val/auroc") at `step` (the epoch)."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder to the run's artifacts."""

    def log_dict(self, obj: Any, name: str) -> None:
        """Store `obj` as a JSON/YAML artifact named `name` (suffix decides the format)."""

    def log_figure(self, fig: Any, name: str) -> None:
        """Store a matplotlib figure, or an existing image file, as artifact `name`."""

    def log_pyfunc(self, name: str = "model", **kwargs: Any) -> str | None:
        """Log an MLflow pyfunc model (kwargs go to mlflow.pyfunc.log_model); returns its URI."""
        return None

    def register(self, model_uri: str, name: str, alias: str, metric: str, value: float | None,
                 mode: str = "max", data_key: str = "") -> str | None:
        """Register `model_uri` as a new version of `name`, tagged with what it was validated on
        (`data_key`: the shards' checksum and val split) and its `metric` value. `alias` moves to
        it unless a version validated on the same data by the same metric is at least as good:
        a version on other data (or of unknown data) never blocks it. Returns the new version."""
        return None

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags (they may change later, unlike params)."""

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED; later calls do nothing."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc_type is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            self.finish("FINISHED")
        elif issubclass(exc_type, Exception):
            self.finish("FAILED")
        else:  # KeyboardInterrupt, a non-zero SystemExit (preemption, signals)
            self.finish("KILLED")
        return False  # never swallow the exception


class NullTracker(Tracker):
    """Used on non-main processes and with tracking.enabled = false: every call is a no-op."""


class MLflowTracker(Tracker):
    """One MLflow run, created or resumed on construction; see make_tracker."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, resume: bool = True) -> None:
        for k, v in ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
        import mlflow  # heavy: only on the process that tracks

        self._mlflow = mlflow
        self.uri = resolve_uri(cfg.uri)
        check_reachable(self.uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = mlflow.MlflowClient(self.uri)
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._finished = False
        self._warned: set[str] = set()

        if cfg.campaign and not CAMPAIGN_RE.match(cfg.campaign):
            raise UserError(f"tracking.campaign must be letters, digits and . _ : - (up to 100), "
                            f"got {cfg.campaign!r}")
        id_file = self.run_dir / RUN_ID_FILE
        env_id = os.environ.get("MLFLOW_RUN_ID", "").strip()
        old_id = id_file.read_text().strip() if resume and id_file.is_file() else ""
        if env_id:
            # As MLflow's clients do: log into that existing run (e.g. one made by `mlflow run`
            # or an orchestrator). It wins over run_dir's id; a missing run is the user's error.
            if not self._run_exists(env_id):
                raise UserError(f"MLFLOW_RUN_ID={env_id} is not a live run at {self.uri}; unset it to "
                                "start a new run")
            if old_id and old_id != env_id:
                log.warning("MLFLOW_RUN_ID=%s wins over run %s of %s", env_id, old_id, id_file)
            old_id = env_id
        elif old_id and not self._run_exists(old_id):
            log.warning("MLflow run %s (from %s) is not in %s; starting a new run", old_id, id_file, self.uri)
            old_id = ""
        if mlflow.active_run() is not None:  # a leftover from an earlier tracker in this process
            self._safe("end_run", mlflow.end_run)
        # None (not False): MLflow's own MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true still works.
        system_metrics = True if cfg.system_metrics else None
        if old_id:
            run = mlflow.start_run(run_id=old_id, log_system_metrics=system_metrics)
        else:
            experiment_id = self._experiment_id(resolve_experiment(cfg.experiment))
            tags = dict(t.split("=", 1) for t in cfg.tags)
            tags.setdefault("run_dir", str(self.run_dir))
            if cfg.campaign:
                tags[CAMPAIGN_TAG] = cfg.campaign
                parent = self._safe("campaign parent", campaign_parent_run, self.client, experiment_id,
                                    cfg.campaign)
                if parent:
                    tags[PARENT_RUN_TAG] = parent
            run = mlflow.start_run(experiment_id=experiment_id, run_name=cfg.run_name or self.run_dir.name,
                                   tags=tags, log_system_metrics=system_metrics)
        if run.info.run_id != (id_file.read_text().strip() if id_file.is_file() else ""):
            # Atomic: a resume (or a requeued job) must never read half an id.
            fileio.write_bytes_atomic(id_file, (run.info.run_id + "\n").encode())
        self.run_id = run.info.run_id
        if env_id and cfg.tags:  # a new run gets them at creation; MLflow's start_run(tags=) does this
            self.set_tags(dict(t.split("=", 1) for t in cfg.tags))
        log.info("MLflow run %s in %s (%s)", self.run_id, self.uri,
                 "from MLFLOW_RUN_ID" if env_id else "resumed" if old_id else "new")

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            # MLflow's client-side default would be ./mlruns in whatever directory the job starts
            # in; keep artifacts next to the database, like `mlflow server` does (mlartifacts/).
            db = Path(self.uri[len("sqlite:///"):])
            slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
            location = (db.parent / "mlartifacts" / slug).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except self._mlflow.exceptions.MlflowException:
            # Another job of a SLURM array created it in the meantime.
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _run_exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage != "deleted"
        except self._mlflow.exceptions.MlflowException:
            return False

    def _safe(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call fn; on failure warn (once per kind) and go on, so training survives a tracking outage."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any tracking failure is non-fatal by design
            level = logging.DEBUG if what in self._warned else logging.WARNING
            self._warned.add(what)
            log.log(level, "MLflow %s failed (training continues): %s", what, e)
            return None

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param, RunTag

        flat = flatten_params(params)
        run = self._safe("log_params", self.client.get_run, self.run_id)
        if run is None:
            return
        existing = run.data.params
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        # Params are immutable in MLflow; a resumed run with a changed value keeps the original
        # and records the new one as a tag, instead of failing.
        changed = [RunTag(f"param_changed_on_resume.{k}"[:MAX_KEY], v[:8000])
                   for k, v in flat.items() if k in existing and existing[k] != v]
        for k in (t.key for t in changed):
            log.warning("param %s differs from the resumed run's; kept as tag %s", k.split(".", 1)[1], k)
        for i in range(0, max(len(new), len(changed)), 100):  # MLflow's batch limit: 100 params/tags
            self._safe("log_params", self.client.log_batch, self.run_id,
                       params=new[i:i + 100], tags=changed[i:i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        batch = [Metric(k, x, now, int(step)) for k, v in metrics.items() if (x := _as_float(v)) is not None]
        for i in range(0, len(batch), 1000):
            self._safe("log_metrics", self.client.log_batch, self.run_id, metrics=batch[i:i + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        fn = self.client.log_artifacts if p.is_dir() else self.client.log_artifact
        self._safe("log_artifact", fn, self.run_id, str(p), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        self._safe("log_dict", self.client.log_dict, self.run_id, obj, name)

    def log_figure(self, fig: Any, name: str) -> None:
        if isinstance(fig, (str, Path)):  # plots.py writes PNG files and returns their paths
            parent = str(Path(name).parent)
            self._safe("log_figure", self.client.log_artifact, self.run_id, str(fig),
                       None if parent == "." else parent)
        else:
            self._safe("log_figure", self.client.log_figure, self.run_id, fig, name)

    def log_pyfunc(self, name: str = "model", **kwargs: Any) -> str | None:
        """Log a pyfunc model into this run (serve.log_servable builds the arguments: a
        models-from-code file, the checkpoint as an artifact, this package as code, a signature).
        Returns "models:/<id>" and tags the run with it."""
        info = self._safe("log_model", self._mlflow.pyfunc.log_model, name=name, **kwargs)
        if info is None:
            return None
        self.set_tags({f"model_uri.{name}": info.model_uri})
        return info.model_uri

    def register(self, model_uri: str, name: str, alias: str, metric: str, value: float | None,
                 mode: str = "max", data_key: str = "") -> str | None:
        return self._safe("register model", self._register, model_uri, name, alias, metric, value, mode, data_key)

    def _versions(self, name: str) -> list[Any]:
        """Every version of registered model `name` (with its tags), all pages."""
        quoted = name.replace("'", "\\'")
        out, token = [], None
        while True:
            page = self.client.search_model_versions(f"name = '{quoted}'", max_results=1000, page_token=token)
            out.extend(page)
            token = getattr(page, "token", None)
            if not token:
                return out

    def _register(self, model_uri: str, name: str, alias: str, metric: str, value: float | None, mode: str,
                  data_key: str = "") -> str:
        from mlflow.exceptions import MlflowException

        version = str(self._mlflow.register_model(model_uri, name).version)
        tag = f"val/{metric}"  # the comparison is kept on the version, so it survives the run's deletion
        ours = _as_float(value)
        tags = {tag: "nan" if ours is None else repr(ours), "run_id": self.run_id, VAL_METRIC_TAG: metric}
        if data_key:
            tags[DATA_KEY_TAG] = data_key
        for k, v in tags.items():
            self.client.set_model_version_tag(name, version, k, v)
        try:
            current = self.client.get_model_version_by_alias(name, alias)
        except MlflowException:  # no version holds the alias yet
            current = None

        def value_of(v: Any) -> float | None:
            try:
                return _as_float(float(v.tags.get(tag, "nan")))
            except ValueError:
                return None

        # Only versions validated on the same data (index checksum + val split) by the same metric
        # compare: a demo's AUROC on other films says nothing about this model. A version without
        # a data_key (registered before it was recorded) is of unknown data: it never blocks.
        same = [(v, x) for v in (self._versions(name) if data_key else [])
                if str(v.version) != version and v.tags.get(DATA_KEY_TAG) == data_key
                and v.tags.get(VAL_METRIC_TAG) == metric and (x := value_of(v)) is not None]
        at_least_as_good = [(v, x) for v, x in same if ours is None or (x >= ours if mode == "max" else x <= ours)]
        blocker = (max(at_least_as_good, key=lambda p: p[1] if mode == "max" else -p[1])
                   if at_least_as_good else None)
        if current is None:
            holder = "no version held it"
        elif data_key and current.tags.get(DATA_KEY_TAG) == data_key:
            holder = f"version {current.version} held it (same data)"
        else:
            holder = f"version {current.version} held it (validated on other data: not compared)"
        compared = (f"compared with {len(same)} earlier version(s) validated on the same data "
                    f"({data_key or 'not recorded'}) by val/{metric}; {holder}")
        if blocker is None or current is None:
            # Two jobs finishing together may both move it; the later one wins (no lock in MLflow).
            target = version if blocker is None else str(blocker[0].version)
            self.client.set_registered_model_alias(name, alias, target)
            log.info("registered %s version %s (val/%s %s); @%s -> version %s; %s", name, version, metric, ours,
                     alias, target, compared)
        else:
            log.info("registered %s version %s; @%s stays on version %s: version %s on the same data has val/%s "
                     "%s %s %s; %s", name, version, alias, current.version, blocker[0].version, metric, blocker[1],
                     ">=" if mode == "max" else "<=", ours, compared)
        return version

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(str(k)[:MAX_KEY], str(v)[:8000]) for k, v in tags.items()]
        self._safe("set_tags", self.client.log_batch, self.run_id, tags=batch)

    def finish(self, status: str = "FINISHED") -> None:
        if self._finished:
            return
        self._finished = True
        active = self._mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            self._safe("end_run", self._mlflow.end_run, status)
        else:
            self._safe("end_run", self.client.set_terminated, self.run_id, status)


def run_tags(cfg: Config, leaks: list[str]) -> dict[str, str]:
    """MLflow tags that say what a run's model reads, so that runs compare like with like
    (`cxr-dist compare`): its kind, its text inputs, report supervision and the leak."""
    reads_text = cfg.model.kind != "image"
    return {"model.kind": cfg.model.kind,
            "fusion": cfg.model.fusion if cfg.model.kind == "image+text" else "",
            "text_fields": ",".join(cfg.loader.text_fields) if reads_text else "",
            "report_supervision": ",".join(cfg.loader.report_fields) if cfg.model.report_supervision > 0 else "",
            "label_leakage": "true" if leaks else "false"}


def log_evaluation(tracker: Tracker, evaluation: dict, epoch: int) -> None:
    """best_<split>/... (image level, per source and view AUROC and mean probabilities, OOD flagged
    share), best_<split>_study/... and calibration/... to the tracker, at step `epoch` (the end of
    training, and `cxr-dist fuse`)."""
    from ..eval.metrics import scalar_metrics  # scikit-learn: not while a command parses --help

    cal = evaluation.get("calibration", {})
    tracker.log_metrics({"calibration/temperature": cal.get("temperature"),
                         **{f"calibration/{split}/{k}": v for split in ("val", "test") for k, v in cal.get(split, {}).items()
                            if k.startswith(("ece", "brier"))}}, step=epoch)
    for name, rep in evaluation.items():
        if name == "calibration":
            continue
        if rep.get("ood"):
            tracker.log_metrics({f"best_{name}/ood_flagged_frac": rep["ood"].get("flagged_frac"),
                                 f"best_{name}/ood_mean_score": rep["ood"]["mean_score"]}, step=epoch)
        tracker.log_metrics(scalar_metrics(rep["image_level"], f"best_{name}/"), step=epoch)
        for kind in ("by_source", "by_view"):  # e.g. best_test/source/kermany/auroc
            tracker.log_metrics({f"best_{name}/{kind[3:]}/{g}/{k}": v for g, m in rep[kind].items()
                                 for k, v in m.items() if k.startswith(("auroc", "mean_prob")) and k != "auroc_ci95"},
                                step=epoch)
        if "study_level" in rep:
            tracker.log_metrics(scalar_metrics(rep["study_level"], f"best_{name}_study/"), step=epoch)


def make_tracker(cfg: TrackingConfig, is_main: bool, run_dir: str | Path, resume: bool = True) -> Tracker:
    """An MLflowTracker on the main process (when enabled), a NullTracker elsewhere.

    `resume=False` starts a new MLflow run even if run_dir holds the id of an earlier one (pass
    the training's own decision: resuming from a checkpoint or not). Raises UserError when an
    http(s) tracking server cannot be reached.
    """
    if not (is_main and cfg.enabled):
        return NullTracker()
    return MLflowTracker(cfg, run_dir, resume=resume)
