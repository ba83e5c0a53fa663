"""Probe data for the data-driven allocators: batches from a DataLoader or from tokenised examples, their cost,
and the search layers some allocators swap into the model while they probe it.

``data`` is a ``torch.utils.data.DataLoader`` (or any iterable of batches: dicts of tensors that
``model(**batch)`` accepts, with ``labels``), or a list / ``datasets.Dataset`` of tokenised examples (dicts
with ``input_ids``, ``attention_mask``, ``labels`` as lists, or an int label for classification), which are
padded on the right (labels with -100). Either may carry a ``task`` id, which is not passed to the model.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import Collator


_SHOW_PROGRESS: ContextVar[bool] = ContextVar("moela_allocator_progress", default=True)


@contextmanager
def progress_bars(show: bool) -> Iterator[None]:
    """Within the block, the allocators' progress bars are shown or not (``train.progress`` in a run)."""
    token = _SHOW_PROGRESS.set(show)
    try:
        yield
    finally:
        _SHOW_PROGRESS.reset(token)


def progress(iterable: Iterable, desc: str) -> tqdm:
    """``iterable`` with a transient tqdm bar, unless :func:`progress_bars` turned them off."""
    return tqdm(iterable, desc=desc, leave=False, disable=not _SHOW_PROGRESS.get())


def is_examples(data: Any) -> bool:
    """True when ``data`` holds single tokenised examples rather than batches."""
    if type(data).__name__ == "Dataset" and hasattr(data, "column_names"):
        return True
    if isinstance(data, Sequence) and len(data) and isinstance(data[0], dict):
        return not any(isinstance(v, torch.Tensor) and v.dim() >= 2 for v in data[0].values())
    return False


def collate(examples: Sequence[dict], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad tokenised examples on the right into one batch (:class:`moela.data.Collator`)."""
    if "input_ids" not in examples[0] or "labels" not in examples[0]:
        raise ValueError(f"tokenised examples need 'input_ids' and 'labels' (got keys {sorted(examples[0])})")
    return Collator(pad_token_id)(list(examples))


def batches(data: Any, batch_size: int = 1, limit: int | None = None, seed: int = 0,
            pad_token_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """The probe batches: examples are shuffled with ``seed``, the first ``limit`` kept and collated in
    batches of ``batch_size``; batches from a loader are taken in order until ``limit`` examples."""
    if data is None:
        raise ValueError("this allocator needs data: a DataLoader or a list/Dataset of tokenised examples")
    if is_examples(data):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
        chosen = [data[i] for i in order[:limit]]
        return [collate(chosen[i:i + batch_size], pad_token_id) for i in range(0, len(chosen), batch_size)]
    out, seen = [], 0
    for batch in data:
        if not isinstance(batch, dict) or "labels" not in batch:
            raise ValueError("each batch must be a dict of tensors with 'labels' that model(**batch) accepts")
        out.append(dict(batch))
        seen += len(batch["input_ids"]) if "input_ids" in batch else 1
        if limit is not None and seen >= limit:
            break
    if not out:
        raise ValueError("the data gave no batch")
    return out


def pad_id(model: torch.nn.Module) -> int:
    """The config's pad (else eos) token id when it is a valid token, else 0: padded positions are masked."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    for key in ("pad_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, list):
            value = value[0]
        if isinstance(value, int) and (vocab is None or 0 <= value < vocab):
            return value
    return 0


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[dict[str, torch.Tensor], Any]:
    """Model inputs on ``device`` and the batch's task ids (or None)."""
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "task"}
    return inputs, batch.get("task")


def size(batch: dict[str, torch.Tensor]) -> int:
    return len(batch["input_ids"]) if "input_ids" in batch else len(next(iter(batch.values())))


class Cost:
    """Wall time, optimisation steps and examples of one allocation; ``report()`` prints and returns them."""

    def __init__(self, method: str):
        self.method, self.steps, self.examples = method, 0, 0
        self.start = time.perf_counter()

    def add(self, batch: dict[str, torch.Tensor], steps: int = 1) -> None:
        self.steps += steps
        self.examples += size(batch)

    def report(self) -> dict[str, float | int]:
        seconds = round(time.perf_counter() - self.start, 3)
        print(f"{self.method}: {seconds:.1f} s, {self.steps} steps, {self.examples} examples")
        return {"seconds": seconds, "steps": self.steps, "examples": self.examples}


def holdout(data: Any, fraction: float, batch_size: int, seed: int = 0, pad_token_id: int = 0,
            limit: int | None = None) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """(train batches, validation batches): a ``fraction`` of the examples (at least one) drawn with ``seed``,
    or every ``round(1/fraction)``-th batch of a loader, is held out for validation."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    if data is not None and is_examples(data):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()[:limit]
        if len(order) < 2:
            raise ValueError("need at least 2 examples to hold out a validation split")
        cut = max(1, round(fraction * len(order)))
        split = [[data[i] for i in order[cut:]], [data[i] for i in order[:cut]]]
        return tuple([collate(part[i:i + batch_size], pad_token_id) for i in range(0, len(part), batch_size)]
                      for part in split)
    every = max(2, round(1 / fraction))
    loaded = batches(data, limit=limit)
    if len(loaded) < 2:
        raise ValueError("need at least 2 batches to hold out a validation batch")
    val = [b for i, b in enumerate(loaded) if i % every == every - 1] or loaded[-1:]
    return [b for b in loaded if not any(b is v for v in val)], val


@contextmanager
def swapped(model: nn.Module, names: Sequence[str], make: Callable[[nn.Module], nn.Module],
            seed: int) -> Iterator[dict[str, nn.Module]]:
    """``{path: make(module)}`` swapped in for the ``names`` of ``model`` (built after ``torch.manual_seed(seed)``,
    the global random state restored afterwards), with the model frozen and in eval mode; on exit the model gets
    its own modules (``make``'s layer keeps the original as ``base_layer``), ``requires_grad`` flags and mode back.
    """
    device = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    layers: dict[str, nn.Module] = {}
    try:
        model.eval()
        model.requires_grad_(False)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for name in names:
                layers[name] = make(model.get_submodule(name))
                model.set_submodule(name, layers[name])
        yield layers
    finally:
        for name, layer in layers.items():
            model.set_submodule(name, layer.base_layer)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
