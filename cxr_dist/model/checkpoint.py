"""Atomic, pickle-free checkpoints: safetensors for tensors, JSON for everything else.

Layout of one checkpoint, ``RUN_DIR/checkpoints/<tag>/``::

    model.safetensors   model state dict (contiguous CPU tensors, shared storage cloned apart)
    state.safetensors   every tensor of the training state (optimizer moments, RNG byte states...)
    state.json          the training state's structure, tensors replaced by references (flatten)
    meta.json           epoch, phase, global step, metrics, resolved config, versions, "format"
    extra.safetensors   (optional, added after training by amend_checkpoint) the product's tensors,
                        e.g. the training features' statistics of the out-of-distribution score
    deepspeed/          (DeepSpeed runs, ``latest`` only) DeepSpeed's own sharded checkpoint, written
                        by every rank through ``accelerator.save_state``: each rank's partition of
                        the optimizer state (``pytorch_model/zero_pp_rank_R_mp_rank_00_optim_states.pt``)
                        and the module states; read back only to resume (train/state.py)
    COMPLETE            written last: size and sha256 of each file above

Tags by convention: ``latest`` (overwritten every save, what resume uses) and ``best`` (a copy
of ``latest`` made with :func:`copy_as` when the validation metric improves).

Why no ``torch.load``: unpickling runs arbitrary code from the file, and checkpoints travel
between machines and people. Nothing here ever unpickles; a pickle file given as a checkpoint is
rejected by the safetensors parser, which only reads a JSON header and raw bytes. The one
exception is ``deepspeed/``: DeepSpeed writes and reads its shards with torch.save/torch.load. They
are read only when a DeepSpeed run resumes from its own ``latest``, after their sha256 is checked
against COMPLETE (:func:`verified_subdir`); ``copy_as`` leaves them out, so ``best`` (the product
every other command loads) never holds one.

Atomicity: a checkpoint is written into ``checkpoints/.tmp-<tag>-<token>/`` and fsynced, then
the old ``<tag>`` is renamed to ``.old-<tag>-<token>``, the new one renamed to ``<tag>``, and the
old one removed. A crash at any moment leaves at least one complete copy; :func:`find_checkpoint`
returns ``<tag>`` if it is complete, else the newest complete ``.tmp-<tag>-*`` (a crash between
the two renames), else ``.old-<tag>-*``; directories without ``COMPLETE`` are never returned.
Only one process (the main one) may save into a run directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cxr_dist.errors import CheckpointError
from cxr_dist.fileio import _write_bytes, fsync_dir, json_bytes as _json_bytes, write_bytes_atomic, write_json_atomic  # noqa: F401 (re-exported)

FORMAT = "cxr-dist-checkpoint/1"
MODEL_FILE, STATE_FILE, STATE_JSON, META_FILE, MARKER, EXTRA_FILE = (
    "model.safetensors", "state.safetensors", "state.json", "meta.json", "COMPLETE", "extra.safetensors",
)
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

# ----------------------------------------------------------------------------- flatten


def flatten(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into ``{dotted_key: tensor}`` and a JSON-able skeleton.

    Handles dict (any JSON-scalar or tuple keys; key types survive, unlike plain JSON where
    ``{0: ...}`` comes back as ``{"0": ...}``), list, tuple, int, float, bool, None, str, Tensor
    and numpy scalars. Containers are tagged objects in the skeleton (``{"t": "dict", ...}``) so a
    string value can never be mistaken for one. Raises TypeError naming the path of anything else.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str, allow_tensor: bool = True) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, np.generic):
            return x.item()  # numpy scalars (e.g. from metrics) are plain numbers in JSON
        if isinstance(x, torch.Tensor) and allow_tensor:
            key = path or "_"
            while key in tensors:  # a dict key containing "." could collide with a nested path
                key += "~"
            tensors[key] = x
            return {"t": "tensor", "k": key}
        if isinstance(x, dict):
            items = [[enc(k, path, allow_tensor=False), enc(v, f"{path}.{k}" if path else str(k))]
                     for k, v in x.items()]
            return {"t": "dict", "items": items}
        if isinstance(x, (list, tuple)):
            vals = [enc(v, f"{path}.{i}" if path else str(i), allow_tensor) for i, v in enumerate(x)]
            return {"t": "tuple" if isinstance(x, tuple) else "list", "v": vals}
        raise TypeError(f"cannot store {type(x).__name__} at {path or '<root>'!r} in a checkpoint")

    return tensors, enc(obj, "")


def unflatten(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten`."""

    def dec(s: Any) -> Any:
        if not isinstance(s, dict):
            return s
        t = s.get("t")
        if t == "tensor":
            return tensors[s["k"]]
        if t == "dict":
            return {dec(k): dec(v) for k, v in s["items"]}
        if t == "list":
            return [dec(v) for v in s["v"]]
        if t == "tuple":
            return tuple(dec(v) for v in s["v"])
        raise ValueError(f"unknown skeleton node {s!r}")

    return dec(skeleton)


def _safetensors_ready(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, none sharing storage (safetensors refuses shared storage,
    e.g. tied weights or several views of one buffer; cloning costs a copy of the duplicates only)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.numel() == 0:
            out[k] = torch.empty(t.shape, dtype=t.dtype)
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[k] = t
    return out


# ----------------------------------------------------------------------------- rng


def rng_state() -> dict[str, Any]:
    """RNG states of python ``random``, numpy's global generator, torch CPU and (if in use) CUDA.

    Per process: in distributed training each rank has its own; gather them if ranks must resume
    with distinct streams, or (better) derive per-rank randomness from (seed, epoch, rank).
    """
    bitgen, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"bit_generator": bitgen, "keys": keys.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    # Querying CUDA before it is initialised would create a context just to read a seed.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (also after a round trip through a checkpoint)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["bit_generator"], np.asarray(n["keys"], dtype=np.uint32),
                             n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        # A resume on fewer/more GPUs restores the devices both runs have.
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.to("cpu", torch.uint8), i)


# ----------------------------------------------------------------------------- writing


def _versions() -> dict[str, str]:
    import safetensors

    from cxr_dist import __version__

    return {"cxr_dist": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def _check_tag(tag: str) -> None:
    if not _TAG_RE.match(tag):
        raise ValueError(f"checkpoint tag {tag!r}: use letters, digits, '_', '.', '-', not starting with '.'")


def _install(ckpt_root: Path, tmp: Path, tag: str) -> Path:
    """Swap the complete directory ``tmp`` in as ``ckpt_root/tag`` (see the module docstring)."""
    target = ckpt_root / tag
    old = None
    if target.exists():
        old = ckpt_root / f".old-{tag}-{uuid.uuid4().hex}"
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old, target)  # put the previous checkpoint back where readers expect it
        raise
    fsync_dir(ckpt_root)
    # Leftovers of this save and of earlier crashed ones; never touches other tags.
    for p in ckpt_root.iterdir():
        if p.name.startswith((".tmp-", ".old-")) and _tag_of(p.name) == tag:
            shutil.rmtree(p, ignore_errors=True)
    return target


def _tag_of(name: str) -> str:
    """'.tmp-epoch-5-<hex>' -> 'epoch-5' (the token never contains '-')."""
    return name[5:].rsplit("-", 1)[0]


def _new_tmp(ckpt_root: Path, tag: str, token: str | None = None) -> Path:
    tmp = ckpt_root / f".tmp-{tag}-{token or uuid.uuid4().hex}"
    tmp.mkdir(parents=True, exist_ok=token is not None)
    return tmp


def shared_tmp(run_dir: str | Path, tag: str, token: str) -> Path:
    """The temporary folder of the next save of ``tag``, named by ``token`` (one uuid hex the ranks
    agree on): other processes write into it first (DeepSpeed's shards, under ``deepspeed/``),
    then the main process's :func:`save_checkpoint` with ``tmp=`` records and installs it whole."""
    _check_tag(tag)
    return _new_tmp(Path(run_dir) / "checkpoints", tag, token)


def _file_record(path: Path, sync: bool = False) -> dict:
    """Size and sha256 of a file, read in chunks; `sync`: fsync it too (a file written by someone
    else that becomes part of a checkpoint)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"bytes": size, "sha256": digest.hexdigest()}


def _write_files(tmp: Path, files: dict[str, bytes]) -> None:
    """Write and fsync each file, then the COMPLETE marker with sizes and checksums of these and of
    every file other processes wrote into ``tmp`` before (``deepspeed/...``)."""
    record = {}
    for name, data in files.items():
        _write_bytes(tmp / name, data)
        record[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for path in sorted(tmp.rglob("*")):
        name = path.relative_to(tmp).as_posix()
        if path.is_file() and name not in record and name != MARKER:
            record[name] = _file_record(path, sync=True)
            fsync_dir(path.parent)
    _write_bytes(tmp / MARKER, _json_bytes({"format": FORMAT, "files": record}))
    fsync_dir(tmp)


def save_checkpoint(
    run_dir: str | Path,
    tag: str,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    tmp: Path | None = None,
) -> Path:
    """Atomically write checkpoint ``run_dir/checkpoints/<tag>/`` and return its path.

    ``model_state``: the (unwrapped) model's ``state_dict()``. ``train_state``: anything
    :func:`flatten` handles, typically ``{"optimizer": opt.state_dict(), "scheduler":
    sched.state_dict(), "rng": rng_state()}``. ``meta``: JSON-able facts (epoch, phase,
    global_step, metrics, config as dict); ``format``, ``versions`` and ``saved_at`` are added.
    ``tmp``: a :func:`shared_tmp` folder that other processes have written files into (kept, recorded).
    """
    _check_tag(tag)
    ckpt_root = Path(run_dir) / "checkpoints"
    state_tensors, skeleton = flatten(train_state)
    files = {
        MODEL_FILE: st_save(_safetensors_ready(dict(model_state)), metadata={"format": "pt"}),
        STATE_FILE: st_save(_safetensors_ready(state_tensors), metadata={"format": "pt"}),
        STATE_JSON: _json_bytes({"format": FORMAT, "skeleton": skeleton}, indent=None),  # machine-only
        META_FILE: _json_bytes({**meta, "format": FORMAT, "versions": _versions(),
                                "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}),
    }
    tmp = tmp or _new_tmp(ckpt_root, tag)
    try:
        _write_files(tmp, files)
        return _install(ckpt_root, tmp, tag)
    except BaseException:
        # A failed write leaves no COMPLETE marker, so it could never be loaded; tidy it anyway.
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_as(run_dir: str | Path, src_tag: str, dst_tag: str) -> Path:
    """Atomically make checkpoint ``dst_tag`` a copy of ``src_tag`` (e.g. ``latest`` -> ``best``).

    Files are hard-linked when possible: checkpoints are never modified in place (a new save
    writes new files), so sharing inodes is safe and costs no disk space or time. A ``deepspeed/``
    folder is not copied (only a resume reads it, from ``latest``).
    """
    _check_tag(dst_tag)
    src = find_checkpoint(run_dir, src_tag)
    if src is None:
        raise CheckpointError(f"no complete checkpoint {src_tag!r} in {run_dir} to copy")
    ckpt_root = Path(run_dir) / "checkpoints"
    tmp = _new_tmp(ckpt_root, dst_tag)
    try:
        names = [n for n in (MODEL_FILE, STATE_FILE, STATE_JSON, META_FILE, EXTRA_FILE) if (src / n).is_file()]
        for name in names:
            try:
                os.link(src / name, tmp / name)
            except OSError:
                shutil.copy2(src / name, tmp / name)
                with open(tmp / name, "rb+") as f:
                    os.fsync(f.fileno())
        marker = _read_json(src / MARKER, "completion marker")  # last: the records of the copied files
        marker["files"] = {n: r for n, r in marker.get("files", {}).items() if n in names}
        _write_bytes(tmp / MARKER, _json_bytes(marker))
        fsync_dir(tmp)
        return _install(ckpt_root, tmp, dst_tag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def amend_checkpoint(path: str | Path, meta_updates: dict[str, Any], extra: dict[str, torch.Tensor] | None = None,
                     tag: str = "best") -> Path:
    """Atomically rewrite a complete checkpoint with ``meta_updates`` merged into its meta.json and,
    when given, ``extra`` as its extra.safetensors (replacing any earlier one). What a run learns
    after training (the calibration temperature, the threshold, the out-of-distribution statistics)
    travels inside the checkpoint this way. The other files are verified and kept byte for byte."""
    d, records, meta = _open(path, tag)
    files = {name: _read_verified(d, name, records) for name in records}
    files[META_FILE] = _json_bytes({**meta, **meta_updates})
    if extra is not None:
        files[EXTRA_FILE] = st_save(_safetensors_ready(dict(extra)), metadata={"format": "pt"})
    name = d.name if not d.name.startswith(".") else _tag_of(d.name)  # a checkpoint found mid-swap
    tmp = _new_tmp(d.parent, name)
    try:
        _write_files(tmp, files)
        return _install(d.parent, tmp, name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_extra(path: str | Path, tag: str = "best") -> dict[str, torch.Tensor]:
    """The checkpoint's extra.safetensors tensors ({} when it has none: an older checkpoint)."""
    d, records, _ = _open(path, tag)
    return _load_tensors(d, EXTRA_FILE, records) if EXTRA_FILE in records else {}


# ----------------------------------------------------------------------------- finding


def _is_complete(d: Path) -> bool:
    return (d / MARKER).is_file() and (d / META_FILE).is_file()


def find_checkpoint(run_dir: str | Path, tag: str) -> Path | None:
    """The complete checkpoint for ``tag`` in ``run_dir``, recovering from a crash mid-swap; or None."""
    ckpt_root = Path(run_dir) / "checkpoints"
    if not ckpt_root.is_dir():
        return None
    target = ckpt_root / tag
    if _is_complete(target):
        return target
    # Crash between "rename old away" and "rename new in": the new one is complete in .tmp-*.
    def newest(prefix: str) -> Path | None:
        cands = [p for p in ckpt_root.iterdir()
                 if p.name.startswith(prefix) and _tag_of(p.name) == tag and _is_complete(p)]
        return max(cands, key=lambda p: (p / MARKER).stat().st_mtime_ns, default=None)

    return newest(".tmp-") or newest(".old-")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The ``latest`` checkpoint of a run (what resume uses), or None if there is none."""
    return find_checkpoint(run_dir, "latest")


# ----------------------------------------------------------------------------- loading


def _resolve(path: str | Path, tag: str) -> Path:
    """Checkpoint dir from a checkpoint dir, a file inside one, a run dir or its checkpoints/ dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.is_file():
        if (p.parent / META_FILE).is_file() or (p.parent / MARKER).is_file():
            p = p.parent
        else:
            raise CheckpointError(
                f"{p} is not a cxr-dist checkpoint: expected a directory RUN_DIR/checkpoints/<tag>/ "
                "(or its model.safetensors); pickle files (.pt/.pth/.ckpt) are never loaded")
    if (p / META_FILE).is_file() or (p / MARKER).is_file() or (p / MODEL_FILE).is_file():
        return p
    run_dir = p.parent if p.name == "checkpoints" else p
    if (run_dir / "checkpoints").is_dir():
        found = find_checkpoint(run_dir, tag)
        if found is None:
            raise CheckpointError(f"run directory {run_dir} has no complete {tag!r} checkpoint")
        return found
    raise CheckpointError(f"{p} is neither a cxr-dist checkpoint nor a run directory with checkpoints/")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: {what} {path.name} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt {what} ({e})") from None


def _open(path: str | Path, tag: str) -> tuple[Path, dict, dict]:
    """Resolve, check completeness and format; return (dir, file records, meta)."""
    d = _resolve(path, tag)
    if not (d / MARKER).is_file():
        raise CheckpointError(
            f"{d} is incomplete (no {MARKER} marker): its save was interrupted, or it is not a cxr-dist checkpoint")
    marker = _read_json(d / MARKER, "completion marker")
    meta = _read_json(d / META_FILE, "metadata")
    for doc in (marker, meta):
        fmt = doc.get("format") if isinstance(doc, dict) else None
        if fmt != FORMAT:
            if isinstance(fmt, str) and fmt.startswith("cxr-dist-checkpoint/"):
                raise CheckpointError(f"{d} has checkpoint format {fmt!r}; this cxr-dist reads {FORMAT!r}")
            raise CheckpointError(f"{d} is not a cxr-dist checkpoint (format {fmt!r}, expected {FORMAT!r})")
    return d, marker.get("files", {}), meta


def _read_verified(d: Path, name: str, records: dict) -> bytes:
    """File bytes, checked against the size and sha256 recorded at save time."""
    path = d / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{d}: {name} is missing") from None
    rec = records.get(name)
    if rec is None:
        raise CheckpointError(f"{d}: {name} is not listed in {MARKER}")
    if len(data) != rec["bytes"]:
        raise CheckpointError(f"{path} is truncated or corrupt: {len(data)} bytes, expected {rec['bytes']}")
    if hashlib.sha256(data).hexdigest() != rec["sha256"]:
        raise CheckpointError(f"{path} is corrupt: checksum differs from the one recorded at save time")
    return data


def _load_tensors(d: Path, name: str, records: dict) -> dict[str, torch.Tensor]:
    data = _read_verified(d, name, records)
    try:
        return st_load(data)
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{d / name} is not a valid safetensors file ({e})") from None


def load_checkpoint(
    path: str | Path, tag: str = "latest"
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Load ``(model_state, train_state, meta)``; tensors are on the CPU.

    ``path``: a checkpoint directory, a file in it (e.g. its model.safetensors), or a run
    directory (then its ``tag`` checkpoint, ``latest`` by default). Any problem (missing,
    incomplete, corrupt, not ours, other format version) raises :class:`CheckpointError`.
    """
    d, records, meta = _open(path, tag)
    model_state = _load_tensors(d, MODEL_FILE, records)
    tensors = _load_tensors(d, STATE_FILE, records)
    try:
        doc = json.loads(_read_verified(d, STATE_JSON, records))
        train_state = unflatten(tensors, doc["skeleton"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{d / STATE_JSON} is corrupt ({e!r})") from None
    return model_state, train_state, meta


def verified_subdir(path: str | Path, name: str, tag: str = "latest") -> Path | None:
    """The checkpoint's folder ``name`` (e.g. ``deepspeed``) after checking each of its files against
    the size and sha256 in COMPLETE; None when the checkpoint has no such folder. For files that
    another library unpickles: they are read only if they are the ones this run wrote."""
    d, records, _ = _open(path, tag)
    inside = [n for n in records if n.startswith(f"{name}/")]
    if not inside:
        return None
    on_disk = {p.relative_to(d).as_posix() for p in (d / name).rglob("*") if p.is_file()}
    if on_disk - set(inside):
        raise CheckpointError(f"{d / name} holds files not recorded at save time: {sorted(on_disk - set(inside))[:3]}")
    for n in inside:
        if not (d / n).is_file() or _file_record(d / n) != records[n]:
            raise CheckpointError(f"{d / n} is missing or differs from the file recorded at save time")
    return d / name


def load_model_state(path: str | Path, tag: str = "latest") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(model_state, meta)`` only, for evaluation/prediction; same ``path`` rules and errors."""
    d, records, meta = _open(path, tag)
    return _load_tensors(d, MODEL_FILE, records), meta
