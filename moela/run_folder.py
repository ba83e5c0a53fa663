"""The run folder's lifecycle: refusing to reuse one unless told, the settings written into it, and the
``FINISHED`` / ``FAILED`` markers."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from .io import atomic_write_text
from .settings import Settings

FINISHED, FAILED = "FINISHED", "FAILED"
SETTINGS_FILE = "config.yaml"


def check_run_dir(run_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to reuse a run folder unless told: a finished one needs ``--overwrite``; any other non-empty one
    ``--overwrite`` or ``--resume``."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if overwrite:
        if not any((run_dir / name).exists() for name in (SETTINGS_FILE, "compare.json", FINISHED, FAILED)):
            raise ValueError(f"{run_dir} is not empty and is not a moela run folder; refusing to delete it")
        shutil.rmtree(run_dir)
        return
    if (run_dir / FINISHED).exists():
        raise ValueError(f"{run_dir} holds a finished run; pass --overwrite to replace it or set output_dir=...")
    if not resume:
        raise ValueError(f"{run_dir} holds an unfinished run; pass --resume to continue it or --overwrite")


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def write_settings(run_dir: Path, settings: Settings) -> None:
    atomic_write_text(run_dir / SETTINGS_FILE, yaml.safe_dump(settings.to_dict(), sort_keys=False))


def start_run(run_dir: Path, settings: Settings, *, overwrite: bool, resume: bool) -> None:
    """Check the run folder (:func:`check_run_dir`), create it, clear a failure mark, write the settings."""
    check_run_dir(run_dir, overwrite=overwrite, resume=resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).unlink(missing_ok=True)
    write_settings(run_dir, settings)


def mark_finished(run_dir: Path) -> None:
    write_json(run_dir / FINISHED, {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def mark_failed(run_dir: Path, err: BaseException) -> None:
    """``FAILED`` with the error, in the run folder (created if the run failed before it was)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / FAILED, f"{type(err).__name__}: {err}\n")


def is_finished(run_dir: Path) -> bool:
    return (run_dir / FINISHED).is_file()
