"""Several CPU processes (gloo): ``accelerate launch`` (DDP and FSDP2) and ``torchrun`` train the adapter of one
process at the same global batch, and the data-driven allocators give every process the same plan."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import moela
from moela.allocators import allocate
from moela.cli import main
from moela.settings import TrainSettings
from moela.train import train_adapter
from tests.helpers import examples, lm_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], args: list[str], module: str = "moela.cli", **env: str) -> str:
    """Run ``module`` (the moela command) under ``launcher``; its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run([sys.executable, "-m", *launcher, "-m", module, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stderr


def assert_same_adapter(a: Path, b: Path, atol: float) -> None:
    first, second = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (a, b))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=atol, msg=key)


def two_process_config(tmp_path: Path, model: Path, method: str) -> Path:
    """4 steps of a global batch of 4 (two processes: 2 each). No dropout (its masks differ by process) and no
    balance loss: each process computes it on its own micro-batch, which is not the full batch's loss."""
    return lm_config(tmp_path, model, train={"max_steps": 4, "save_steps": 2, "batch_size": 4, "lr": 1e-2,
                                             "logging_steps": 1, "progress": False, "balance_coef": 0.0},
                     adapter={"dropout": 0.0, "method": method,
                              "options": {"experts": 4, "rank": 2, "top_k": 2}},
                     eval={"protocol": "loglik"})


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_lm) -> tuple[Path, Path]:
    """(config, run folder) of `moela run` with the sensitivity allocator in one process."""
    tmp = tmp_path_factory.mktemp("dist")
    config = two_process_config(tmp, tiny_lm, "sensitivity")
    assert main(["run", str(config), f"output_dir={tmp / 'one'}"]) == 0
    return config, tmp / "one"


def test_accelerate_launch_run_matches_one_process(tmp_path, one_process):
    """`accelerate launch` (configs/accelerate/ddp.yaml) of `moela run` with the sensitivity allocator (probe
    split over the processes, scores summed): the same plan and adapter as one process; only the main process
    evaluates and writes the report."""
    config, one = one_process
    two = tmp_path / "two"
    # the shipped DDP config starts CPU processes (gloo) on a machine without GPUs
    launch(["accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
            "--num_processes", "2", "--main_process_port", str(free_port())],
           ["run", str(config), f"output_dir={two}", "train.batch_size=2"])
    assert json.loads((two / "plan.json").read_text())["modules"] == json.loads((one / "plan.json").read_text())["modules"]
    assert_same_adapter(one, two, atol=1e-5)
    for name in ("FINISHED", "metrics.json", "report.md", "routing.json"):
        assert (two / name).is_file(), name
    assert sorted(p.name for p in (two / "checkpoints" / "checkpoint-4").iterdir()) == [
        "adapter", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth", "scheduler.pt", "trainer_state.json",
        "training_args.bin"]
    assert json.loads((two / "train_log.json").read_text())["global_step"] == 4


def test_torchrun_train_matches_one_process(tmp_path, one_process):
    config, one = one_process
    two = tmp_path / "two"
    launch(["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())],
           ["train", str(config), f"output_dir={two}", "train.batch_size=2"])
    assert_same_adapter(one, two, atol=1e-5)
    assert (two / "FINISHED").is_file() and not (two / "metrics.json").exists()


def test_fsdp2_run_and_resume_match_one_process(tmp_path, one_process):
    """configs/accelerate/fsdp.yaml on 2 CPU processes (tests/sharded_cpu.py: accelerate would otherwise train
    them as DDP): every transformer block is its own ``fully_shard`` unit; the adapter is that
    of one process; checkpoints hold the adapter, optimizer and scheduler, not the model; ``--resume`` from the
    first checkpoint ends with the same adapter."""
    config, one = one_process
    two, log = tmp_path / "two", tmp_path / "sharded"
    fsdp = ["accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
            "--num_processes", "2"]
    launch([*fsdp, "--main_process_port", str(free_port())], ["run", str(config), f"output_dir={two}",
           "train.batch_size=2"], module="tests.sharded_cpu", MOELA_FSDP_LOG=str(log))
    for rank in (0, 1):  # the blocks, the embedding, the tail [final norm, lm_head], the root
        assert Path(f"{log}.{rank}").read_text().split() == [
            "LlamaDecoderLayer", "LlamaDecoderLayer", "Embedding", "list", "LlamaForCausalLM"]
    assert json.loads((two / "train_log.json").read_text())["sharded"] is True
    assert_same_adapter(one, two, atol=1e-5)
    assert (two / "FINISHED").is_file() and (two / "metrics.json").is_file()  # the main process evaluated
    assert sorted(p.name for p in (two / "checkpoints" / "checkpoint-4").iterdir()) == [
        "adapter", "optimizer.bin", "rng_state_0.pth", "rng_state_1.pth", "scheduler.pt", "trainer_state.json",
        "training_args.bin"]

    # a run stopped after its first checkpoint
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed, ignore=shutil.ignore_patterns("checkpoint-4", "adapter", "FINISHED"))
    checkpoint = resumed / "checkpoints" / "checkpoint-2"
    shutil.copytree(two / "checkpoints" / "checkpoint-2" / "adapter", checkpoint / "adapter")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["log_history"][0]["mark"] = "from checkpoint-2"  # shows that the resumed run read this state
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    launch([*fsdp, "--main_process_port", str(free_port())], ["train", str(config), f"output_dir={resumed}",
           "train.batch_size=2", "--resume"], module="tests.sharded_cpu", MOELA_FSDP_LOG=str(log))
    history = json.loads((resumed / "train_log.json").read_text())["log_history"]
    assert history[0]["mark"] == "from checkpoint-2" and history[-1]["step"] == 4
    assert_same_adapter(two, resumed, atol=1e-6)


def test_a_sharded_config_that_accelerate_trains_as_ddp_is_named(tmp_path, monkeypatch):
    """accelerate leaves CPU processes unsharded under an FSDP config: moela says so."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    model = tiny_model("llama")
    moela.inject(model, moela.AllocationPlan.uniform(model, ["q_proj"], experts=2, rank=2), dropout=0.0)
    with pytest.warns(UserWarning, match="accelerate does not shard CPU processes: this FSDP config trains as plain"):
        settings = TrainSettings(max_steps=1, batch_size=2, progress=False)
        result = train_adapter(model, examples(4), 0, settings, tmp_path)
    assert result["sharded"] is False


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_run_matches_one_process(tmp_path, one_process, stage):
    """configs/accelerate/deepspeed-zero{2,3}.yaml on 2 CPU processes (DeepSpeed's CPU accelerator over gloo;
    tests/sharded_cpu.py): the adapter is that of one process, and the main process evaluates it on a fresh,
    unpartitioned base model. Needs ``pip install deepspeed`` (its CPU communication op is compiled on first use)."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")
    config, one = one_process
    two = tmp_path / "two"
    launch(["accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / f"deepspeed-zero{stage}.yaml"), "--num_processes", "2",
            "--mixed_precision", "no", "--main_process_port", str(free_port())],
           ["run", str(config), f"output_dir={two}", "train.batch_size=2"], module="tests.sharded_cpu",
           DS_ACCELERATOR="cpu")
    assert json.loads((two / "train_log.json").read_text())["sharded"] is True
    assert_same_adapter(one, two, atol=1e-5)
    assert (two / "FINISHED").is_file() and (two / "metrics.json").is_file()


def probe_examples() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(12):
        ids = torch.randint(3, 97, (5 + i % 4,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
    return out


def plans(methods: tuple[str, ...] = ("sensitivity", "guilomo", "guilomo-budget", "prune")) -> dict:
    """The sensitivity, GuiLoMo (unconstrained and held to a budget) and prune plans (modules and scores, and the
    budget search's λ) of this process."""
    model, data = tiny_model("llama"), probe_examples()
    search = dict(targets=["q_proj", "down_proj"], experts=3, rank=2, max_steps=4, batch_size=2,
                  val_fraction=0.25, lr=1e-2, gsv_lr=0.1)
    options = {"sensitivity": dict(targets="all-linear", experts=2, rank=2), "guilomo": search,
               "guilomo-budget": dict(search, budget_search=True, min_experts=0, budget="uniform:E=1,r=2"),
               "prune": dict(targets="all-linear", warmup=6, refit=2, batch_size=2)}
    out = {}
    for label in methods:
        plan = allocate(label.split("-")[0], model, data=data, **options[label])
        out[label] = {"modules": plan.to_dict()["modules"], "scores": plan.meta["scores"],
                      "budget_search": plan.meta.get("budget_search")}
    return out


def allocate_in_group(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(plans(), Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_data_driven_allocators_agree_across_processes(tmp_path):
    """Sensitivity scores are those of one process (up to summation order); GuiLoMo's GSVs (and the budget
    search's λ), prune's importances and all the plans are identical on every process."""
    mp.spawn(allocate_in_group, args=(2, free_port(), str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0 == rank1 and rank0["guilomo-budget"]["budget_search"]["lambda"] > 0  # the price acted
    alone = plans(("sensitivity",))
    assert rank0["sensitivity"]["modules"] == alone["sensitivity"]["modules"]
    for name, score in alone["sensitivity"]["scores"]["sensitivity"].items():
        assert rank0["sensitivity"]["scores"]["sensitivity"][name] == pytest.approx(score, rel=1e-6)



@pytest.mark.parametrize("main_fails", [False, True])
def test_a_completed_process_keeps_its_group_until_the_others_are_done(tmp_path, main_fails):
    """Processes that completed leave :func:`moela.distributed.shut_down` together, so none tears its group down
    while another still works (tests/group_exit.py: the main process works a second longer); when the main process
    failed, the other does not wait for it beyond its exit and still exits cleanly."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    port = str(free_port())
    processes = [subprocess.Popen([sys.executable, "-m", "tests.group_exit", str(rank), port, str(tmp_path),
                                   str(int(main_fails))], env=env, cwd=ROOT) for rank in (0, 1)]
    assert [p.wait(timeout=120) for p in processes] == [1 if main_fails else 0, 0]
    (entered0, left0), (_, left1) = ((float(t) for t in (tmp_path / f"rank{r}").read_text().split()) for r in (0, 1))
    assert left1 >= entered0  # rank 1 waited for the main process to end its work
    if main_fails:
        assert left1 - left0 < 10  # and then no longer (its barrier failed when the main process left)
