"""Loading a base model and training its adapter with the transformers ``Trainer``.

The loss is ``L_task + coef · balance_loss(model)`` (METHODS.md §2.4). Checkpoints hold the adapter (plus the
trainable head of an encoder) instead of the full model, together with the Trainer's optimizer, scheduler,
RNG and trainer state, so ``resume`` continues exactly where an interrupted run stopped. A checkpoint is
written into ``output_dir/.staging`` and renamed into place once every process has written its part and the
files are on disk, so a run killed at any point leaves only complete checkpoints. A non-finite loss stops
training before the optimizer step, naming the step; the checkpoints written so far stay.

Under ``accelerate launch`` or ``torchrun`` the Trainer trains data-parallel (DDP, FSDP or DeepSpeed, as the
launcher configures it); only the main process writes files, and under FSDP/DeepSpeed the adapter is read
from the gathered full state dict.
"""

from __future__ import annotations

import math
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers
from accelerate import PartialState
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from .config import WEIGHTS_NAME
from .data import Collator
from .inject import balance_loss, load_adapter, load_adapter_state_dict, moela_layers, write_adapter
from .io import atomic_dir, fsync_tree, replace_dir

HEAD_FILE = "head.safetensors"
TASKS = ("causal_lm", "sequence_classification", "multiple_choice")
_AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification",
                 "multiple_choice": "AutoModelForMultipleChoice"}
# The record kind (moela.data) each model task trains on.
DATA_KINDS = {"causal_lm": "instruction", "sequence_classification": "classification",
              "multiple_choice": "multiple_choice"}
# Output heads an encoder task trains with the adapter (PEFT's ``modules_to_save`` for sequence classification).
CLASSIFIER_HEADS = ("classifier", "score")
WAIT = timedelta(hours=6)  # how long a process waits for the others (e.g. for the main one's evaluation)


def process_state() -> PartialState:
    """This process's place in the run, read from the launcher's environment (``accelerate launch``,
    ``torchrun``); it sets up the process group (gloo on CPU) that the Trainer then uses, with a timeout of
    :data:`WAIT` (the other processes of ``moela compare`` wait while the main one evaluates). A plain command
    is one process."""
    return PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT)


def torch_dtype(name: str | None) -> torch.dtype | str:
    if name in (None, "auto"):
        return "auto"
    if not hasattr(torch, str(name)) or not isinstance(getattr(torch, name), torch.dtype):
        raise ValueError(f"model.dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def model_task(name_or_path: str, task: str = "auto") -> str:
    """One of :data:`TASKS`; ``auto`` reads the architecture from the model config (a causal LM, else sequence
    classification; multiple choice is never guessed)."""
    if task != "auto":
        if task not in TASKS:
            raise ValueError(f"model.task must be one of {('auto',) + TASKS}, got {task!r}")
        return task
    config = transformers.AutoConfig.from_pretrained(name_or_path)
    arch = " ".join(config.architectures or [])
    return "causal_lm" if "CausalLM" in arch or "LMHead" in arch else "sequence_classification"


def load_tokenizer(name_or_path: str, task: str):
    """The model's tokenizer with a pad token (unk, else eos) and right padding for training."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(name_or_path: str, task: str, *, num_labels: int | None = None, dtype: str | None = "auto",
               meta: bool = False) -> tuple[nn.Module, list[str]]:
    """(model, names of newly initialised parameters). ``meta``: built from the config on the meta device,
    no weights read (for ``--dry-run``)."""
    auto = getattr(transformers, _AUTO_CLASSES[task])
    extra = {"num_labels": num_labels} if task == "sequence_classification" and num_labels else {}
    if meta:
        config = transformers.AutoConfig.from_pretrained(name_or_path, **extra)
        with torch.device("meta"):
            return auto.from_config(config), []
    model, info = auto.from_pretrained(name_or_path, dtype=torch_dtype(dtype), output_loading_info=True, **extra)
    if model.config.pad_token_id is None and task == "sequence_classification":
        model.config.pad_token_id = 0
    return model, sorted(info.get("missing_keys", []))


def head_parameters(model: nn.Module, task: str, modules_to_save: Sequence[str] | None = None,
                    new_parameters: Sequence[str] = ()) -> list[str]:
    """Names of the base parameters trained with the adapter: those of ``modules_to_save`` (path suffixes;
    default for encoder tasks: the classifier head) and any newly initialised ones (e.g. a missing pooler)."""
    names = list(modules_to_save) if modules_to_save is not None else (
        list(CLASSIFIER_HEADS) if task != "causal_lm" else [])
    chosen = []
    for pname, _ in model.named_parameters():
        module = pname.rsplit(".", 1)[0]
        if pname in new_parameters or any(module == n or module.endswith("." + n) for n in names):
            if ".lora_" not in pname and ".router." not in pname:
                chosen.append(pname)
    return chosen


def unfreeze(model: nn.Module, names: Sequence[str]) -> None:
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(True)


def save_trained(model: nn.Module, directory: str | Path, head: Sequence[str],
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter plus the trained head parameters in ``head.safetensors``, written together atomically (a
    failure leaves the previous folder intact). ``state``: a gathered full state dict to read them from."""
    with atomic_dir(Path(directory)) as tmp:
        write_adapter(model, tmp, state)
        if head:
            params = state if state is not None else dict(model.named_parameters())
            tensors = {name: params[name].detach().contiguous().cpu() for name in head}
            save_file(tensors, str(tmp / HEAD_FILE), metadata={"format": "pt"})


def load_head(model: nn.Module, directory: str | Path) -> list[str]:
    """Copy ``head.safetensors`` (if any) into ``model``; returns the parameter names loaded."""
    path = Path(directory) / HEAD_FILE
    if not path.is_file():
        return []
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name not in params or params[name].shape != value.shape:
                raise ValueError(f"{path}: tensor {name!r} does not fit this model")
            params[name].copy_(value.to(params[name].dtype))
    return sorted(tensors)


def load_trained(model: nn.Module, directory: str | Path, is_trainable: bool = False) -> nn.Module:
    """Inverse of :func:`save_trained` on a fresh base model (adapter weights in float32)."""
    load_adapter(model, directory, is_trainable=is_trainable, adapter_dtype=torch.float32)
    load_head(model, directory)
    return model


def copy_trained(model: nn.Module, directory: str | Path) -> None:
    """Load adapter and head weights from ``directory`` into a model that already has the adapter."""
    load_adapter_state_dict(model, load_file(str(Path(directory) / WEIGHTS_NAME)), source=str(directory))
    load_head(model, directory)


class BalanceProgress(ProgressCallback):
    """The Trainer's progress bar, showing the latest loss, balance loss and learning rate as its postfix."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: f"{logs[k]:.4g}" for k in ("loss", "balance", "learning_rate") if k in logs}
            self.training_bar.set_postfix(shown, refresh=False)


class MoelaTrainer(transformers.Trainer):
    """``Trainer`` whose loss adds ``balance_coef · balance_loss(model)``, whose checkpoints hold the adapter
    and trained head only and appear whole or not at all, and which stops on a non-finite loss."""

    def __init__(self, *args, balance_coef: float = 1e-3, head: Sequence[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.balance_coef = balance_coef
        self.head = list(head)
        self._balance_sum, self._balance_count = 0.0, 0
        self._staging: str | None = None
        self.routed = any(layer.routed for _, layer in moela_layers(self.model))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.routed:
            balance = balance_loss(self.accelerator.unwrap_model(model))
            self._balance_sum += float(balance.detach())
            self._balance_count += 1
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
            coef = self.balance_coef / (self.current_gradient_accumulation_steps if scaled else 1)
            loss = loss + coef * balance
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step; a non-finite loss on any process raises FloatingPointError on every process
        before the optimizer step, naming the step and the last complete checkpoint."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = (~torch.isfinite(loss.detach())).float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")
        if bad.item():
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            raise FloatingPointError(
                f"non-finite loss at step {self.state.global_step + 1}: training stopped; "
                f"last good checkpoint: {last or 'none saved yet'} (lower train.lr, or check the data)")
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._balance_count and "loss" in logs:
            logs["balance"] = round(self._balance_sum / self._balance_count, 4)
            self._balance_sum, self._balance_count = 0.0, 0
        super().log(logs, start_time)

    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written by every process into ``.staging`` and, once all are done and the
        files are on disk, renamed to ``checkpoint-<step>`` by the main process; then older ones are rotated."""
        root = Path(self.args.output_dir)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = root / ".staging"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:
            raise RuntimeError(f"{root / name}: saving the checkpoint failed ({type(err).__name__}: {err}); "
                               f"last good checkpoint: {get_last_checkpoint(str(root)) or 'none'}") from err
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            fsync_tree(staging / name)
            replace_dir(staging / name, root / name)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=str(root), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """``output_dir/adapter`` (:func:`save_trained`) and the training arguments, on the main process;
        ``state_dict`` is the full state dict the Trainer gathers under FSDP or DeepSpeed."""
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            save_trained(self.accelerator.unwrap_model(self.model), Path(output_dir) / "adapter", self.head,
                         state_dict or None)
            torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        adapter = Path(resume_from_checkpoint) / "adapter"
        if not adapter.is_dir():
            raise ValueError(f"{resume_from_checkpoint}: not a moela checkpoint (no adapter folder)")
        copy_trained(self.accelerator.unwrap_model(model or self.model), adapter)


def training_arguments(cfg: dict[str, Any], output_dir: str | Path, num_examples: int) -> transformers.TrainingArguments:
    """TrainingArguments from the ``train`` section (warm-up given as a ratio of the total steps; a step takes
    ``batch_size · grad_accum`` examples on each process)."""
    world = process_state().num_processes
    steps_per_epoch = math.ceil(num_examples / (cfg["batch_size"] * cfg["grad_accum"] * world))
    total = cfg["max_steps"] if cfg["max_steps"] and cfg["max_steps"] > 0 else math.ceil(steps_per_epoch * cfg["epochs"])
    precision = cfg.get("precision", "auto")
    cuda = torch.cuda.is_available()
    bf16 = precision == "bf16" or (precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    fp16 = precision == "fp16"
    if (bf16 or fp16) and not cuda:
        raise ValueError(f"train.precision={precision!r} needs a GPU; use fp32 (or auto) on CPU")
    save_steps = cfg.get("save_steps") or 0
    checkpointing = {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}
                     } if cfg.get("gradient_checkpointing") else {}
    return transformers.TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=cfg["epochs"], max_steps=cfg["max_steps"] or -1,
        per_device_train_batch_size=cfg["batch_size"], gradient_accumulation_steps=cfg["grad_accum"],
        learning_rate=cfg["lr"], weight_decay=cfg["weight_decay"], lr_scheduler_type=cfg["scheduler"],
        warmup_steps=int(round(cfg["warmup_ratio"] * total)), optim="adamw_torch", seed=cfg["seed"],
        data_seed=cfg["seed"], logging_steps=cfg["logging_steps"], save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, save_total_limit=cfg.get("save_total_limit"), report_to="none",
        bf16=bf16, fp16=fp16, dataloader_num_workers=0, ddp_find_unused_parameters=False, **checkpointing,
        remove_unused_columns=False, disable_tqdm=not cfg.get("progress", True), use_cpu=not cuda)


def train(model: nn.Module, features: Sequence[dict], pad_token_id: int, cfg: dict[str, Any],
          output_dir: str | Path, *, head: Sequence[str] = (), resume: str | bool | None = None,
          save_to: str | Path | None = None) -> dict[str, Any]:
    """Train the adapter (and ``head``) of ``model`` on tokenised ``features``; checkpoints go to
    ``output_dir``; the final adapter to ``save_to/adapter`` (every process must call this; the main one
    writes). ``resume``: a checkpoint folder, or True for the latest one there. Returns the Trainer's log
    history and final metrics, and ``sharded``: whether FSDP/DeepSpeed left ``model`` sharded across processes
    (then reload the saved adapter to use it)."""
    args = training_arguments(cfg, output_dir, len(features))
    unfreeze(model, head)
    trainer = MoelaTrainer(model=model, args=args, train_dataset=list(features),
                           data_collator=Collator(pad_token_id, keep_task=False),
                           balance_coef=cfg["balance_coef"], head=head)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if not args.disable_tqdm:
        trainer.add_callback(BalanceProgress())
    result = trainer.train(resume_from_checkpoint=resume or None)
    if save_to is not None:
        trainer.save_model(str(save_to))
    return {"metrics": result.metrics, "log_history": trainer.state.log_history,
            "global_step": trainer.state.global_step,
            "sharded": bool(trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)}
