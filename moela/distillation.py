"""A teacher's distributions as the loss that the data-driven allocators probe with (distillation).

Every data-driven allocator measures or differentiates ``model(**batch).loss``. Where a teacher exists (a larger
model being distilled, or the model whose behaviour the adapter must learn), its whole next-token distribution
tells the allocator far more per token than one label does: on the recovery benchmark ``prune`` closes 0.49–0.82
of the oracle gap with the teacher's distributions and 0.02–0.49 with one sampled label per token (BENCHMARKS.md).

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
    """``KL(teacher ‖ student) = Σ_v p_t(v) (log p_t(v) − log p_s(v))`` over the last dimension, averaged over
    the positions where ``mask`` is True (all of them without a mask). The student's log-softmax is taken in
    float32 at least."""
    student = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32)).log_softmax(-1)
    teacher = teacher_logprobs.to(student.dtype)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return kl.mean() if mask is None else kl[mask].mean()


@contextmanager
def teacher_loss(model: nn.Module, teacher: nn.Module, shift: bool = True) -> Iterator[nn.Module]:
    """Within the block, ``model(**batch)`` returns as its ``loss`` the KL from ``teacher``'s distributions to
    ``model``'s on the same inputs (:func:`kl_to_teacher`), over the positions its ``labels`` score: for 3-D
    logits (tokens) the positions whose label is not -100, one to the right with ``shift`` (causal LMs, whose
    label at t + 1 scores the logits at t), at the same position without it (masked LMs, token classification);
    for 2-D logits (sequence classification) every example. Without ``labels``, every position. The teacher runs
    in eval mode without gradients on the batch's inputs, labels removed; ``model`` gets its own forward back on
    exit. Raises ValueError when the two models' logits differ in shape."""
    own = model.__dict__.get("forward")
    forward = model.forward
    was_training = teacher.training

    def distilled(*args, **kwargs):
        labels = kwargs.pop("labels", None)
        out = forward(*args, **kwargs)
        with torch.no_grad():
            target = teacher(*args, **kwargs).logits
        logits = out.logits
        if target.shape != logits.shape:
            raise ValueError(f"teacher_loss: the teacher's logits have shape {tuple(target.shape)}, the model's "
                             f"{tuple(logits.shape)}: the two models must share the vocabulary or label set")
        mask = None
        if labels is not None and logits.dim() == 3:
            if shift:
                logits, target, labels = logits[:, :-1], target[:, :-1], labels[:, 1:]
            mask = labels.to(logits.device) != -100
        out["loss"] = kl_to_teacher(logits, target.float().log_softmax(-1), mask)
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
