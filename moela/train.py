"""Training an adapter with the transformers ``Trainer``.

The routers' balance loss (METHODS.md §2.4) is added to their gradients by the layers themselves. Checkpoints
hold the adapter (plus the trained head of an encoder) instead of the full model, with the Trainer's optimizer, scheduler,
RNG and trainer state, so ``resume`` continues exactly where an interrupted run stopped. A checkpoint is
written into ``output_dir/.staging`` and renamed into place once every process has written its part and the
files are on disk, so a run killed at any point leaves only complete checkpoints. A non-finite loss stops
training before the optimizer step, naming the step; the checkpoints written so far stay.

Under ``accelerate launch`` or ``torchrun`` the Trainer trains data-parallel (DDP, FSDP or DeepSpeed, as the
launcher configures it); only the main process writes files, and under FSDP/DeepSpeed the adapter is read
from the gathered full state dict. Under FSDP a checkpoint holds the gathered optimizer state, not the whole
model, and resuming loads the adapter before FSDP shards the model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers
from accelerate.utils import save_fsdp_optimizer
from torch import nn
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint, rotate_checkpoints

from .adapter import copy_adapter, save_adapter
from .data import Collator
from .distributed import process_state
from .io import atomic_file, fsync_tree, replace_dir
from .model import moela_layers
from .settings import TrainSettings

class BalanceProgress(ProgressCallback):
    """The Trainer's progress bar, showing the latest loss, balance loss and learning rate as its postfix."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: f"{logs[k]:.4g}" for k in ("loss", "balance", "learning_rate") if k in logs}
            self.training_bar.set_postfix(shown, refresh=False)


class MoelaTrainer(transformers.Trainer):
    """``Trainer`` that logs the balance loss (which the routed layers add to their gradients themselves), whose
    checkpoints hold the adapter and trained head only and appear whole or not at all, and which stops on a
    non-finite loss. With gradient accumulation each layer's coefficient is divided by the number of
    micro-batches, so the balance loss weighs against the task loss as without accumulation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._balance_sum, self._balance_count = 0.0, 0
        self._staging: str | None = None
        self._adapter_loaded = False  # under FSDP, by train_adapter() before sharding
        self.layers = [layer for _, layer in moela_layers(self.model) if layer.routed]
        for layer in self.layers:
            layer.balance_coef /= self.args.gradient_accumulation_steps
        self.reduce = sum if self.model.moela_config.balance_reduction == "sum" else \
            (lambda values: sum(values) / len(values))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        values = [float(layer.last_balance) for layer in self.layers if layer.last_balance is not None]
        if values:
            self._balance_sum += self.reduce(values)
            self._balance_count += 1
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
        """``output_dir/adapter`` (:func:`moela.adapter.save_adapter`) and the training arguments, on the main
        process; ``state_dict`` is the full state dict the Trainer gathers under FSDP or DeepSpeed."""
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            save_adapter(self.accelerator.unwrap_model(self.model), Path(output_dir) / "adapter", state_dict or None)
            with atomic_file(Path(output_dir) / transformers.trainer.TRAINING_ARGS_NAME) as tmp:
                torch.save(self.args, tmp)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The Trainer's, except that under FSDP only the optimizer and scheduler are written: the Trainer would
        also write the whole model (``pytorch_model_fsdp.bin``, base weights included) into every checkpoint."""
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                            output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, transformers.trainer.SCHEDULER_NAME))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """The Trainer's, resuming as an uninterrupted run would end: from a checkpoint that already holds the last
        step, nothing more is trained (transformers 5 would take one more step; not under FSDP or DeepSpeed, whose
        engines the Trainer's saving needs), and under FSDP the checkpoint's adapter is loaded before FSDP shards
        the model (the Trainer loads it after, into parameters that are then shards)."""
        path = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else \
            resume_from_checkpoint
        if path:
            state = TrainerState.load_from_json(os.path.join(path, transformers.trainer.TRAINER_STATE_NAME))
            if 0 < state.max_steps <= state.global_step and not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
                self._load_from_checkpoint(path)
                self.state = state
                return TrainOutput(state.global_step, float("nan"), {})
            if self.is_fsdp_enabled:
                self._load_from_checkpoint(path)
                self._adapter_loaded = True
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self._adapter_loaded:
            return
        adapter = Path(resume_from_checkpoint) / "adapter"
        if not adapter.is_dir():
            raise ValueError(f"{resume_from_checkpoint}: not a moela checkpoint (no adapter folder)")
        copy_adapter(self.accelerator.unwrap_model(model or self.model), adapter)


# TrainingArguments that moela sets from its own settings (or needs as they are): not for ``train.trainer_args``.
OWN_ARGUMENTS = ("output_dir", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps",
                 "seed", "data_seed", "logging_steps", "save_strategy", "save_steps", "save_total_limit", "report_to",
                 "bf16", "fp16", "remove_unused_columns", "disable_tqdm", "use_cpu", "torch_compile")


def check_trainer_args(extra: dict[str, Any]) -> None:
    """ValueError naming the first key of ``train.trainer_args`` that is no TrainingArguments field, or one that
    a moela setting already sets."""
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    for key in extra:
        if key in OWN_ARGUMENTS:
            raise ValueError(f"train.trainer_args.{key}: set by moela itself; use the train.* setting instead")
        if key not in fields:
            raise ValueError(f"train.trainer_args.{key}: not a transformers TrainingArguments field")


def check_report_to(report_to: Any) -> None:
    """ValueError naming a ``train.report_to`` tracker that transformers does not know or that is not installed
    (the Trainer would fail only when training starts)."""
    from transformers.integrations import integration_utils

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    known = integration_utils.INTEGRATION_TO_CALLBACK
    installed = integration_utils.get_available_reporting_integrations()
    for name in (str(n) for n in names if n not in ("none", "all")):
        if name not in known:
            raise ValueError(f"train.report_to: unknown tracker {name!r}; transformers knows "
                             f"{', '.join(sorted(known))}")
        if name not in installed:
            raise ValueError(f"train.report_to: {name!r} is not installed here (pip install {name})")


def training_arguments(cfg: TrainSettings, output_dir: str | Path, num_examples: int) -> transformers.TrainingArguments:
    """TrainingArguments from the ``train`` settings (warm-up given as a ratio of the total steps; a step takes
    ``batch_size · grad_accum`` examples on each process)."""
    world = process_state().num_processes
    steps_per_epoch = math.ceil(num_examples / (cfg.batch_size * cfg.grad_accum * world))
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.epochs)
    cuda = torch.cuda.is_available()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    fp16 = cfg.precision == "fp16"
    if fp16 and not cuda:
        raise ValueError("train.precision='fp16' needs a GPU; use bf16, fp32 or auto on CPU")
    check_trainer_args(cfg.trainer_args)
    extra = {"dataloader_num_workers": 0, "ddp_find_unused_parameters": False, **cfg.trainer_args}
    if cfg.gradient_checkpointing:
        extra.update(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False})
    return transformers.TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, lr_scheduler_type=cfg.scheduler,
        warmup_steps=int(round(cfg.warmup_ratio * total)), optim="adamw_torch", seed=cfg.seed,
        data_seed=cfg.seed, logging_steps=cfg.logging_steps, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500, save_total_limit=cfg.save_total_limit, report_to=cfg.report_to,
        bf16=bf16, fp16=fp16, remove_unused_columns=False, disable_tqdm=not cfg.progress, use_cpu=not cuda,
        torch_compile=cfg.compile, **extra)


def train_adapter(model: nn.Module, features: Sequence[dict], pad_token_id: int, cfg: TrainSettings,
                  output_dir: str | Path, *, resume: str | bool | None = None,
                  save_to: str | Path | None = None) -> dict[str, Any]:
    """Train the adapter (and the ``modules_to_save`` of its config) of ``model`` on tokenised ``features``;
    checkpoints go to ``output_dir``; the final adapter to ``save_to/adapter`` (every process must call this;
    the main one writes). ``resume``: a checkpoint folder, or True for the latest one there. Returns the
    Trainer's log history and final metrics, and ``sharded``: whether FSDP/DeepSpeed left ``model`` sharded
    across processes (then reload the saved adapter to use it)."""
    args = training_arguments(cfg, output_dir, len(features))
    trainer = MoelaTrainer(model=model, args=args, train_dataset=list(features),
                           data_collator=Collator(pad_token_id, keep_task=False))
    requested = [name for name in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{name}", "") == "true"]
    if requested and not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        warnings.warn(f"accelerate does not shard CPU processes: this {requested[0]} config trains as plain data "
                      f"parallelism (DDP)")
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if not args.disable_tqdm:
        trainer.add_callback(BalanceProgress())
    result = trainer.train(resume_from_checkpoint=resume or None)
    if save_to is not None:
        trainer.save_model(str(save_to))
    if trainer.is_deepspeed_enabled:  # models loaded later in this process (evaluation) are not ZeRO-3-partitioned
        unset_hf_deepspeed_config()
    return {"metrics": result.metrics, "log_history": trainer.state.log_history,
            "global_step": trainer.state.global_step,
            "sharded": bool(trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)}
