"""A real `mlflow server` for tests: SQLite backend, proxied artifacts in a temporary folder.

tests/conftest.py registers this module (``pytest_plugins = ["tests.mlflow_server"]``), so any test
under tests/ just names ``mlflow_server`` as an argument; importing the fixture into a test module
as well is not needed (it would shadow the argument). The fixture is session-scoped: one server
(5-10 s to start, ~0.5 GB) serves every test of the pytest process, however many modules use it;
tests keep apart by using their own experiment names.

MLflow 3.17's server starts 15 processes and ~3 GB by default; job execution off
(MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false) and `--workers 1` keep it to two processes, ~0.5 GB.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 90.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        # A tracking URI inherited from the developer's shell must not leak into the server.
        MLFLOW_TRACKING_URI="",
    )
    return env


def _mlflow_command() -> list[str]:
    # The console script next to this interpreter; `python -m mlflow` as a fallback.
    script = Path(sys.executable).with_name("mlflow")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlflow"]


def start_server(root: Path) -> tuple[subprocess.Popen, str, Path]:
    """Start `mlflow server` with its store under `root`; return (process, URL, log file)."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    cmd = _mlflow_command() + [
        "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        # Proxied artifacts (the default `--serve-artifacts`): clients upload over HTTP, as they
        # would to a shared server on a cluster.
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]
    with open(log, "wb") as fh:
        # Own session, so that stopping it reaches the worker processes it forks.
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_server_env(),
                                start_new_session=True, cwd=root)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if _healthy(url):
            return proc, url, log
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"mlflow server not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left after `grace_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)
    # Workers may outlive the leader by a moment; the group id is still ours to clean up.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# One server per pytest process. Each test module that imports the fixture gets its own
# session-scoped fixture definition, and pytest would start one server per definition; they
# share this one instead, and the last to finish stops it.
_shared: dict[str, object] = {"users": 0, "proc": None, "url": ""}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL (http://127.0.0.1:PORT) of a real MLflow tracking server, for the whole session."""
    if _shared["proc"] is None or _shared["proc"].poll() is not None:  # type: ignore[union-attr]
        proc, url, _ = start_server(tmp_path_factory.mktemp("mlflow_server"))
        _shared.update(proc=proc, url=url)
    _shared["users"] = int(_shared["users"]) + 1  # type: ignore[arg-type]
    try:
        yield str(_shared["url"])
    finally:
        _shared["users"] = int(_shared["users"]) - 1  # type: ignore[arg-type]
        if _shared["users"] == 0 and _shared["proc"] is not None:
            stop_server(_shared["proc"])  # type: ignore[arg-type]
            _shared.update(proc=None, url="")


# --- plain-HTTP access to the server (the tests read runs back through the REST API) ----------

def api(base: str, endpoint: str, body: dict | None = None, **query: str) -> dict:
    """GET (or POST a JSON body to) /api/2.0/mlflow/<endpoint> and decode the JSON answer."""
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=15) as resp:
        return json.loads(resp.read() or b"{}")


def experiment_runs(base: str, name: str) -> list[dict]:
    exp = api(base, "experiments/get-by-name", experiment_name=name)["experiment"]
    return api(base, "runs/search", {"experiment_ids": [exp["experiment_id"]]}).get("runs", [])
