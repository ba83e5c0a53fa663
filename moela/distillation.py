"""A teacher's distributions as the loss that the data-driven allocators probe with (distillation).

Every data-driven allocator measures or differentiates ``model(**batch).loss``. Where a teacher exists (a larger
model being distilled, or the model whose behaviour the adapter must learn), its whole next-token distribution
tells the allocator far more per token than one label does (BENCHMARKS.md, "Allocation recovery": the ``/soft``
and ``/teacher`` rows against the sampled labels').

    with moela.teacher_loss(model, teacher):
        plan = moela.allocate("prune", model, data=examples, restarts=3)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def kl_to_teacher(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(teacher ‖ student) = Σ_v p_t(v) (log p_t(v) − log p_s(v))`` over the last dimension (terms with
    ``p_t(v) = 0`` count 0), averaged over the positions where ``mask`` is True (all of them without a mask; 0 when
    there are none). The student's log-softmax is taken in float32 at least, on its device."""
    student = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32)).log_softmax(-1)
    teacher = teacher_logprobs.to(student.device, student.dtype)
    kl = torch.where(teacher.isneginf(), 0.0, teacher.exp() * (teacher - student)).sum(-1)
    if mask is not None:
        kl = kl[mask]
    return kl.sum() / max(kl.numel(), 1)


@contextmanager
def teacher_loss(model: nn.Module, teacher: nn.Module, shift: bool = True, positions: str = "inputs"
                 ) -> Iterator[nn.Module]:
    """Within the block, ``model(**batch)`` returns as its ``loss`` the KL from ``teacher``'s distributions to
    ``model``'s on the same inputs (:func:`kl_to_teacher`), over the positions the batch scores: for 3-D logits
    (tokens), with ``positions="inputs"`` (or without ``labels``) every position the ``attention_mask`` keeps
    (all without a mask: prompts and the last token too, whose next-token distributions the teacher also has);
    with ``"labels"`` only those whose label is not -100, one to the right with ``shift`` (causal LMs, whose
    label at t + 1 scores the logits at t), at the same position without it (masked LMs, token classification);
    for 2-D logits (sequence classification) every example. The teacher runs in eval mode without gradients on
    the batch's inputs, labels removed; ``model`` gets its own forward back on exit. ValueError: a teacher that
    shares parameters with ``model`` (it would change as adapters are put into the model), logits of another
    shape, or one logit (a regression head has no distribution)."""
    if positions not in ("labels", "inputs"):
        raise ValueError(f"teacher_loss positions must be 'labels' or 'inputs', got {positions!r}")
    own_ids = {id(p) for p in model.parameters()}
    if teacher is model or any(id(p) in own_ids for p in teacher.parameters()):
        raise ValueError("teacher_loss: the teacher shares parameters with the model; give a separate copy")
    own = model.__dict__.get("forward")
    forward = model.forward
    was_training = teacher.training

    def distilled(*args, **kwargs):
        labels = kwargs.pop("labels", None)
        if positions == "inputs":
            labels = None
        out = forward(*args, **kwargs)
        with torch.no_grad():
            target = teacher(*args, **kwargs).logits
        logits = out.logits
        if target.shape != logits.shape:
            raise ValueError(f"teacher_loss: the teacher's logits have shape {tuple(target.shape)}, the model's "
                             f"{tuple(logits.shape)}: the two models must share the vocabulary or label set")
        if logits.shape[-1] == 1:
            raise ValueError("teacher_loss: one logit per position (a regression head) has no distribution to match")
        if logits.dim() == 3:
            keep = labels if labels is not None else kwargs.get("attention_mask")
            if keep is not None:
                if labels is not None and shift:
                    logits, target, keep = logits[:, :-1], target[:, :-1], keep[:, 1:]
                mask = (keep != -100 if labels is not None else keep.bool()).to(logits.device)
                logits, target = logits[mask], target[mask.to(target.device)]  # only the scored positions
        out["loss"] = kl_to_teacher(logits, target.float().log_softmax(-1))
        return out

    teacher.eval()
    model.forward = distilled
    try:
        yield model
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own
        teacher.train(was_training)
