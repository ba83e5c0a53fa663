"""benchmarks/adaptation.py in miniature: its bootstrap keeps the pairing, and a tiny run on the real
stories260k and SST-2 (skipped without ../shared) writes resumable rows that the report reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def adaptation(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports its sister benchmark, recovery.py
    import adaptation

    return adaptation


def test_bootstrap_is_token_weighted_and_paired(adaptation):
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 60, 40).astype(float)
    uniform = rng.gamma(2.0, 30.0, (3, 40))
    method = uniform + 0.01 * tokens  # 0.01 nats more on every token
    loss, reps = adaptation.bootstrap(uniform, tokens, 3)
    assert loss == pytest.approx(uniform.sum() / (3 * tokens.sum()))
    assert reps.std() > 0
    d = adaptation.bootstrap(method, tokens, 3)[1] - reps
    np.testing.assert_allclose(d, 0.01)  # same draws for both: the text and seed noise cancels


def test_tiny_run_resumes_and_reports(adaptation, shared, one_thread, tmp_path, capsys):
    out = tmp_path / "adaptation.json"
    argv = ["--tasks", "sst2", "--methods", "uniform", "lora", "--seeds", "0", "1", "--steps", "2", "--warmup", "1",
            "--train", "16", "--val", "8", "--probe", "8", "--no-write", "--out", str(out)]
    adaptation.main(argv)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 5  # the base and 2 methods × 2 seeds
    assert all(len(r["text_loss"]) == 8 for r in rows)
    train, held = adaptation.token_sets("sst2", 16, 8, 64)
    assert train == adaptation.token_sets("sst2", 16, 8, 64)[0] and all(len(t) <= 64 for t in train + held)
    adaptation.main(argv)  # a second run keeps the finished rows and trains nothing
    assert json.loads(out.read_text())["rows"] == rows
    text = capsys.readouterr().out
    assert "| lora |" in text and "base (no adapter)" in text
    with pytest.raises(SystemExit, match="another setup"):
        adaptation.main([*argv[:-2], "--steps", "3", "--out", str(out)])
