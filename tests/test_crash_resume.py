"""A training process killed with SIGKILL in the middle of writing a checkpoint resumes with ``--resume`` and ends
with the adapter of an uninterrupted run (deterministic CPU run, dropout on)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from moela.cli import main
from tests.helpers import lm_config, save_tiny

# Runs `moela` with the checkpoint of step 4 held open (sleeping) after its RNG state is written, so the test
# can kill the process while that checkpoint is half written; the numbers computed are unchanged.
SLOW_SAVE = """
import sys, time
from moela import cli, train
real = train.MoelaTrainer._save_rng_state
def save_rng_state(self, output_dir):
    real(self, output_dir)
    if self.state.global_step == 4:
        time.sleep(600)
train.MoelaTrainer._save_rng_state = save_rng_state
sys.exit(cli.main(sys.argv[1:]))
"""


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_sigkill_mid_checkpoint_then_resume_matches_the_uninterrupted_run(tmp_path):
    model = save_tiny(tmp_path / "lm", "lm")
    config = lm_config(tmp_path, model, train={"max_steps": 6, "save_steps": 2, "batch_size": 4, "lr": 1e-2,
                                               "logging_steps": 1, "progress": False},
                       adapter={"dropout": 0.1, "method": "uniform", "options": {"uniform": {"experts": 3, "rank": 2}}})
    assert main(["train", str(config), f"output_dir={tmp_path / 'full'}"]) == 0
    full = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))

    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                       os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "train", str(config), f"output_dir={run}"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(run / "checkpoints" / ".staging" / "checkpoint-4" / "rng_state.pth", process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    # only complete checkpoints carry the checkpoint name; the half-written one is not picked up
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".staging", "checkpoint-2"]
    assert not (run / "adapter").exists() and not (run / "FINISHED").exists()
    assert main(["train", str(config), f"output_dir={run}"]) == 1  # an unfinished run is not silently restarted

    assert main(["train", str(config), f"output_dir={run}", "--resume"]) == 0
    resumed = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == full.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-6)
    # the staging folder is gone; train.save_total_limit=2 keeps the last two checkpoints
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert (run / "FINISHED").is_file()
