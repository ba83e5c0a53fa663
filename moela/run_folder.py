"""The run folder's lifecycle: whose it is, who is using it, what its result depends on, and how it ended.

- **Ownership.** moela writes the marker :data:`MARKER` into every folder it creates (run and comparison
  folders here, export folders in :mod:`moela.export`, data folders in :mod:`moela.prepare_data`), and deletes or writes into an existing non-empty folder
  only when the marker is there: ``--overwrite`` deletes only what moela wrote (:data:`WRITTEN`), and never a
  folder moela did not create, one holding anything else (:func:`foreign`), the current folder, one of its
  parents, or a folder holding the run's own inputs.
- **One process at a time.** :func:`claim` takes an exclusive ``flock`` on :data:`LOCK` inside the folder (the
  main process of a multi-process run), held until :func:`release`.
- **Consistent runs.** :data:`RECORD` holds what determines the result: the resolved settings, a fingerprint of
  the data, the plan file's hash, the number of processes and the moela version; ``--resume`` refuses any
  difference, listing them.
- **Markers.** ``FINISHED`` / ``FAILED``; a failure to write ``FAILED`` never hides the error being reported.

A request refused before anything changed raises :class:`Refused` (a ValueError), and leaves no ``FAILED``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from .io import OLD_SUFFIX, TMP_SUFFIX, atomic_write_text, inside, is_temporary, protected, recover, unwritable
from .settings import Settings
from .version import __version__

FINISHED, FAILED = "FINISHED", "FAILED"
SETTINGS_FILE = "config.yaml"
MARKER = ".moela"  # {"created_by": "moela", "kind": ...}: moela created this folder
LOCK = ".moela.lock"
RECORD = "run.json"  # what determines the run's result
RUN_KINDS = ("run", "compare")
VOLATILE = ("name", "output_dir", "train.progress")  # settings that do not change a run's result
# What moela writes into a run or comparison folder (a comparison's run folders carry their own marker).
WRITTEN = frozenset({MARKER, LOCK, RECORD, SETTINGS_FILE, FINISHED, FAILED, "plan.json", "checkpoints", "adapter",
                     "train_log.json", "metrics.json", "predictions.json", "routing.json", "report.md", "plan.png",
                     "expert_load.png", "training_args.bin", "compare.json"})


class Refused(ValueError):
    """A request refused before anything was changed (no ``FAILED`` mark is written for it)."""


# --- ownership --------------------------------------------------------------------------------------------------
def mark_owned(folder: Path, kind: str) -> None:
    """Write the marker saying moela created ``folder`` (``kind``: run, compare or export)."""
    atomic_write_text(Path(folder) / MARKER, json.dumps({
        "created_by": "moela", "kind": kind, "moela_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")


def owner(folder: Path) -> str | None:
    """The kind of folder moela created at ``folder`` (from its marker), or None when moela did not."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and data.get("created_by") == "moela" and isinstance(data.get("kind"), str):
        return data["kind"]
    return None


def local_inputs(settings: Settings | None) -> list[Path]:
    """The local files and folders a run reads (model, data, plan), as far as the settings name them."""
    if settings is None:
        return []
    names: list[Any] = [settings.model.name_or_path, settings.adapter.plan]
    for spec in (settings.data.train, settings.data.eval):
        for item in spec if isinstance(spec, list) else [spec]:
            names.append(item.get("path") if isinstance(item, dict) else item)
    return [Path(n) for n in names if isinstance(n, str) and n and Path(n).exists()]


def _entries(folder: Path) -> list[Path]:
    return [e for e in folder.iterdir() if e.name != LOCK] if folder.is_dir() else []


# What moela writes inside two of them: the adapter's files (moela.adapter.ADAPTER_FILES); the Trainer's
# checkpoint-<step> folders (one being written: .staging; one being replaced: .checkpoint-<step>.old) and the
# logs of its trackers (TensorBoard's runs/, codecarbon's emissions.csv).
WRITTEN_INSIDE = {"adapter": ("adapter_config.json", "adapter_model.safetensors", "head.safetensors"),
                  "checkpoints": (r"checkpoint-\d+", r"\.checkpoint-\d+\.old", r"\.staging", "runs", r"emissions\.csv")}


def _written(entry: Path) -> bool:
    """Whether ``entry`` of a run or comparison folder is a file or folder moela writes there (:data:`WRITTEN`),
    or a temporary or replaced copy of one (``.<name>.…tmp``, ``.<name>.old``, :mod:`moela.io`)."""
    name = entry.name
    if name in WRITTEN:
        return True
    return name.startswith(".") and name.endswith((TMP_SUFFIX, OLD_SUFFIX)) and \
        any(name.startswith(f".{own}.") for own in WRITTEN)


def _foreign_inside(entry: Path) -> Path | None:
    """In moela's ``adapter`` or ``checkpoints`` folder, an entry moela does not write there (:data:`WRITTEN_INSIDE`,
    or a temporary one), or None."""
    if entry.name not in WRITTEN_INSIDE or not entry.is_dir() or entry.is_symlink():
        return None
    names = re.compile("|".join(WRITTEN_INSIDE[entry.name]))
    return next((inner for inner in sorted(_entries(entry))
                 if not names.fullmatch(inner.name) and not is_temporary(inner)), None)


def foreign(folder: Path, kind: str | None = None) -> Path | None:
    """A file or folder under ``folder`` that moela did not write, or None. ``kind`` (default: the folder's
    marker): ``run``; ``compare``, whose folders are its methods' run folders, or folders holding only
    ``seed-<s>`` run folders (``seeds``), searched in turn."""
    kind = kind or owner(folder)
    entries = sorted(_entries(folder))
    if kind == "seeds" and not entries:
        return folder
    for entry in entries:
        if kind != "seeds" and _written(entry):
            inner = _foreign_inside(entry)
            if inner is not None:
                return inner
            continue
        runs = entry.is_dir() and not entry.is_symlink() and (
            (kind == "compare" and owner(entry) in ("run", None))
            or (kind == "seeds" and entry.name.startswith("seed-") and owner(entry) == "run"))
        if not runs:
            return entry
        inner = foreign(entry, "run" if owner(entry) == "run" else "seeds")
        if inner is not None:
            return inner
    return None


def stray(folder: Path, written: Iterable[str]) -> Path | None:
    """The first entry of ``folder`` (a folder moela replaces whole: an export, a ScienceQA copy) not among the
    names moela ``written`` there, or None (also when ``folder`` does not exist)."""
    names = set(written)
    return next((e for e in sorted(folder.iterdir()) if e.name not in names), None) if folder.is_dir() else None


def _clear(folder: Path) -> None:
    """Delete everything in ``folder`` but the lock file (held by this process); :func:`check_run_dir` has
    found nothing there that moela did not write."""
    for entry in _entries(folder):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_output_file(path: str | Path, overwrite: bool = False, option: str = "-o") -> None:
    """Before any work: ``path``, a file a command writes where the user asked (``option``), can be written: it is
    no folder, its place is writable, it is outside the folders moela manages (run, comparison, export, data),
    and it is new unless ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a folder; give a file name")
    reason = unwritable(path)
    if reason:
        raise ValueError(f"{option} {path}: {reason}")
    managed = next((folder for folder in path.absolute().parents if owner(folder) is not None), None)
    if managed is not None:
        raise ValueError(f"{option} {path}: it is inside the moela {owner(managed)} folder {managed}, whose content "
                         "moela manages (and --overwrite replaces); write it elsewhere")
    if path.exists() and not overwrite:
        raise ValueError(f"{option} {path}: the file exists; pass --overwrite to replace it")


# --- locking ----------------------------------------------------------------------------------------------------
_HELD: dict[str, int] = {}


def lock(folder: Path) -> None:
    """Take the exclusive lock of ``folder``; Refused naming the folder when another process holds it."""
    key = str(Path(folder).resolve())
    if key in _HELD:
        raise Refused(f"{folder} is already in use by this process")
    fd = os.open(Path(folder) / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Refused(f"{folder} is in use by another moela process (it holds {Path(folder) / LOCK}); wait for it "
                      "to end, or use another output_dir") from None
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = fd


def _busy_run(folder: Path) -> Path | None:
    """A comparison's run folder in ``folder`` (``<method>`` or ``<method>/seed-<s>``) whose lock another process
    holds, or None."""
    for run in sorted([*folder.glob("*/"), *folder.glob("*/seed-*/")]):
        if not (run / LOCK).is_file() or str(run.resolve()) in _HELD:
            continue
        try:
            fd = os.open(run / LOCK, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return run
        finally:
            os.close(fd)  # releases the lock if it was taken
    return None


def release(folder: Path) -> None:
    """Release the lock of ``folder`` if this process holds it (a no-op otherwise)."""
    fd = _HELD.pop(str(Path(folder).resolve()), None)
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# --- claiming a folder ------------------------------------------------------------------------------------------
def check_run_dir(run_dir: Path, *, overwrite: bool, resume: bool, kind: str = "run",
                  settings: Settings | None = None) -> None:
    """Raise :class:`Refused` if :func:`claim` would refuse ``run_dir`` (reads only; changes nothing)."""
    run_dir = Path(run_dir)
    what = "comparison" if kind == "compare" else "run"
    if overwrite and resume:
        raise Refused("--overwrite and --resume exclude each other: --overwrite deletes the run that --resume "
                      "would continue")
    if run_dir.exists() and not run_dir.is_dir():
        raise Refused(f"{run_dir} is a file, not a folder; choose another output_dir")
    reason = unwritable(run_dir)
    if reason:
        raise Refused(f"output_dir {run_dir}: {reason}; choose another output_dir")
    if not _entries(run_dir):
        return
    found = owner(run_dir)
    if found is None:
        raise Refused(f"{run_dir} is not empty and is not a moela run folder (it has no {MARKER} marker: moela "
                      f"did not create it); refusing to {'delete' if overwrite else 'write into'} it; choose "
                      "another output_dir")
    if found not in RUN_KINDS or (not overwrite and found != kind):
        raise Refused(f"{run_dir} holds a moela {found} folder, not a {what} folder; choose another output_dir "
                      "(or name=...)")
    if overwrite:
        reason = protected(run_dir)
        held = [p for p in local_inputs(settings) if inside(p, run_dir)]
        if reason is None and held:
            reason = f"it holds {held[0]}, which this {what} reads"
        if reason is None and (other := foreign(run_dir)) is not None:
            reason = f"it holds {other}, which moela did not write (move it out first)"
        if reason is None and (busy := _busy_run(run_dir)) is not None:
            reason = f"its run {busy} is in use by another moela process"
        if reason:
            raise Refused(f"refusing to delete {run_dir} for --overwrite: {reason}; choose another output_dir")
        return
    if (run_dir / FINISHED).exists():
        raise Refused(f"{run_dir} holds a finished {what}; pass --overwrite to replace it or set output_dir=...")
    if not resume:
        raise Refused(f"{run_dir} holds an unfinished {what}; pass --resume to continue it or --overwrite")


def claim(run_dir: Path, *, overwrite: bool = False, resume: bool = False, kind: str = "run",
          settings: Settings | None = None) -> None:
    """Make ``run_dir`` this process's: refused (:func:`check_run_dir`) unless it is new, empty or a moela folder
    of ``kind`` that may be reused; then locked, marked, and, with ``overwrite``, emptied (only its content is
    deleted), or, to resume, cleaned of what a crash left (an interrupted folder replacement is undone,
    temporary files of killed saves removed). Call :func:`release` when done."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, overwrite=overwrite, resume=resume, kind=kind, settings=settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock(run_dir)
    try:
        check_run_dir(run_dir, overwrite=overwrite, resume=resume, kind=kind, settings=settings)  # under the lock
        if overwrite:
            _clear(run_dir)
        elif _entries(run_dir):
            tidy(run_dir)
        if owner(run_dir) != kind:
            mark_owned(run_dir, kind)
    except BaseException:
        release(run_dir)
        raise


def tidy(run_dir: Path) -> list[str]:
    """Undo what a crash left in a run folder and its checkpoints folder (:func:`moela.io.recover`) and drop a
    half-written checkpoint (``checkpoints/.staging``); call it holding the folder's lock."""
    done = recover(run_dir)
    checkpoints = run_dir / "checkpoints"
    done += recover(checkpoints)
    if (checkpoints / ".staging").is_dir():
        shutil.rmtree(checkpoints / ".staging", ignore_errors=True)
        done.append(f"removed {checkpoints / '.staging'}")
    return done


# --- what a run's result depends on -----------------------------------------------------------------------------
def flat_settings(settings: Settings) -> dict[str, Any]:
    """``{"section.key": value}`` of the settings that determine a result (all but :data:`VOLATILE`), as JSON
    would store them."""
    out = {}
    for key, value in settings.to_dict().items():
        for sub, item in (value.items() if isinstance(value, dict) and key != "options" else [(None, value)]):
            name = f"{key}.{sub}" if sub is not None else key
            if name not in VOLATILE:
                out[name] = json.loads(json.dumps(item, default=str))
    return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def records_fingerprint(*groups: Sequence[dict]) -> str:
    """A hash of the records a run trains and evaluates on."""
    text = json.dumps([list(g) for g in groups], sort_keys=True, ensure_ascii=False, default=str)
    return _sha(text.encode("utf-8", "surrogatepass"))


def file_fingerprint(path: Path) -> str:
    """A hash of a file's bytes, or of a folder's file names and bytes."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else "").encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def sources_fingerprint(settings: Settings) -> str:
    """A hash of the data sources' files (a name that is no local file, e.g. a hub dataset, by its name)."""
    parts = []
    for spec in (settings.data.train, settings.data.eval):
        for item in spec if isinstance(spec, list) else [spec]:
            path = item.get("path") if isinstance(item, dict) else item
            if isinstance(path, str) and Path(path).exists():
                parts.append(file_fingerprint(Path(path)))
            else:
                parts.append(json.dumps(path, default=str))
    return _sha("\n".join(parts).encode())


def process_count() -> int:
    from .distributed import process_group

    return process_group()[1]


def make_record(settings: Settings, data: str) -> dict[str, Any]:
    inputs = {}
    if settings.adapter.plan and Path(settings.adapter.plan).is_file():
        inputs["adapter.plan"] = file_fingerprint(Path(settings.adapter.plan))
    return {"moela_version": __version__, "processes": process_count(), "data": data, "inputs": inputs,
            "settings": flat_settings(settings)}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The differences between two records, one short item each."""
    out = []
    if old.get("moela_version") != new.get("moela_version"):
        out.append(f"moela version {old.get('moela_version')} -> {new.get('moela_version')}")
    if old.get("processes") != new.get("processes"):
        out.append(f"number of processes {old.get('processes')} -> {new.get('processes')}")
    before, after = old.get("settings") or {}, new.get("settings") or {}
    for key in sorted(set(before) | set(after), key=lambda k: list(after).index(k) if k in after else 0):
        if before.get(key) != after.get(key):
            out.append(f"{key} {json.dumps(before.get(key), default=str)} -> {json.dumps(after.get(key), default=str)}")
    if old.get("data") != new.get("data"):
        out.append("the data (its records or files differ)")
    for key in sorted(set(old.get("inputs") or {}) | set(new.get("inputs") or {})):
        if (old.get("inputs") or {}).get(key) != (new.get("inputs") or {}).get(key):
            out.append(f"the content of {key}")
    return out


def read_record(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(folder) / RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise Refused(f"{Path(folder) / RECORD}: unreadable ({err}); cannot check the resumed settings; "
                      "start again with --overwrite") from None
    return data if isinstance(data, dict) else None


def check_resume(folder: Path, record: dict[str, Any], what: str = "run") -> None:
    """Refuse to resume ``folder`` when its record differs from ``record`` (every difference listed)."""
    old = read_record(folder)
    if old is None:
        raise Refused(f"{folder} has no {RECORD} to check the resumed {what} against; start it again with "
                      "--overwrite")
    diffs = differences(old, record)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise Refused(f"{folder}: cannot resume: the {what} was started differently: {shown}; resume with the "
                      f"original settings, or start a new {what} (another output_dir, or --overwrite)")


def _has_progress(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in ("plan.json", "checkpoints", "adapter"))


def start_run(run_dir: Path, settings: Settings, *, resume: bool = False, overwrite: bool = False,
              records: Iterable[Sequence[dict]] = ()) -> None:
    """In the claimed ``run_dir``: with ``resume``, refuse settings, data, processes or version that differ from
    the record (:data:`RECORD`); else write the record. Clear a failure mark, write the settings."""
    run_dir = Path(run_dir)
    record = make_record(settings, records_fingerprint(*records))
    if resume and (read_record(run_dir) is not None or _has_progress(run_dir)):
        check_resume(run_dir, record)
    else:
        write_json(run_dir / RECORD, record)
    (run_dir / FAILED).unlink(missing_ok=True)
    write_settings(run_dir, settings)


def record_plan(run_dir: Path) -> None:
    """Record the hash of ``run_dir/plan.json``; on a resumed run, refuse a plan file changed since."""
    run_dir = Path(run_dir)
    record = read_record(run_dir) or {}
    digest = file_fingerprint(run_dir / "plan.json")
    if record.get("plan") not in (None, digest):
        raise Refused(f"{run_dir / 'plan.json'} changed since the run started; cannot resume with another plan "
                      "(start a new run, or --overwrite)")
    if record.get("plan") is None:
        write_json(run_dir / RECORD, {**record, "plan": digest})


def start_compare(out: Path, settings: Settings, seeds: Sequence[int], *, resume: bool = False) -> None:
    """The comparison's record (its settings, with the methods and budget, its ``seeds`` and its data files);
    with ``resume``, refuse any difference."""
    out = Path(out)
    record = make_record(settings, sources_fingerprint(settings))
    if list(seeds) != [settings.train.seed]:  # (one seed, train.seed: recorded as such, as before --seeds was)
        record["settings"]["seeds"] = list(seeds)
    if resume and read_record(out) is not None:
        check_resume(out, record, "comparison")
    else:
        write_json(out / RECORD, record)
    (out / FAILED).unlink(missing_ok=True)
    write_settings(out, settings)


# --- files and markers ------------------------------------------------------------------------------------------
def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def write_settings(run_dir: Path, settings: Settings) -> None:
    atomic_write_text(run_dir / SETTINGS_FILE, yaml.safe_dump(settings.to_dict(), sort_keys=False))


def mark_finished(run_dir: Path) -> None:
    write_json(run_dir / FINISHED, {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def mark_failed(run_dir: Path, err: BaseException) -> None:
    """``FAILED`` with the error, in a run folder moela created; nothing for a :class:`Refused` request. Never
    raises: a failure to write the mark (a full disk) is noted on ``err`` and must not hide it."""
    if isinstance(err, Refused):
        return
    try:
        if owner(run_dir) is not None:
            atomic_write_text(Path(run_dir) / FAILED, f"{type(err).__name__}: {err}\n")
    except Exception as marking:  # noqa: BLE001 - the error being reported matters more
        with contextlib.suppress(Exception):
            err.add_note(f"(the {FAILED} mark could not be written into {run_dir}: {marking})")


def is_finished(run_dir: Path) -> bool:
    return (run_dir / FINISHED).is_file()
