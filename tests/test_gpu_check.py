"""benchmarks/gpu_check.sh: without a CUDA device it stops at once with a message saying so; the benchmark
functions it calls exist. (Its CPU dry run, ``--device cpu --quick``, takes minutes: BENCHMARKS.md.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_fails_clearly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run the whole check")
    done = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh")], env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("gpu_check: no CUDA device") and "cuda.is_available() False" in done.stderr


def test_the_functions_it_calls_exist():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert callable(check.layer_speed.ratio) and callable(check.layer_speed.main)
    assert callable(check.speed.paired) and callable(check.speed.main) and "loop" in check.speed.VARIANTS


def test_alphalora_speed_returns_the_7b_estimates_the_check_judges(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import alphalora_speed

    minutes = alphalora_speed.main(["--scale", "0.03", "--rounds", "1", "--no-svdvals", "--no-real", "--threads", "1"])
    assert {"float64", "float32"} <= set(minutes) and all(m > 0 for m in minutes.values())
