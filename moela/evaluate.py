"""Evaluation protocols (METHODS.md §6) and routing statistics.

- ``generation``: greedy (or beam) decoding of ``max_new_tokens`` from the prompt, then LLM-Adapters answer
  extraction: the first match of the record's options (``true/false``, ``option1..``, ``answer1..``, matched
  anywhere as LLM-Adapters does; letter options stand alone and are read after "The answer is" first), or the
  last number for numeric answers (correct within 1e-3).
- ``loglik``: each option's continuation is scored by its log-probability after the prompt (lm-evaluation-
  harness style; ``length_normalize`` divides by its length in bytes); the best option is the prediction.
- ``classification``: arg-max of the classifier logits.
- ``multiple_choice``: the same for a multiple-choice model, over each record's own choices (a classifier's
  accuracy; named apart because its chance rate is 1/choices per question).

They give numbers that are not comparable with each other, so ``metrics.json`` names the protocol.
``lm_eval`` (optional extra) hands the adapted model to lm-evaluation-harness instead.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .data import Collator, feature_length, format_prompt
from .model import moela_layers

PROTOCOLS = ("generation", "loglik", "classification", "multiple_choice")  # and "lm_eval" (lm_eval_harness)
ENCODER_PROTOCOLS = ("classification", "multiple_choice")
_NUMBER = re.compile(r"-?\d+\.?\d*")
_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-Za-z0-9_]+)", re.IGNORECASE)


def is_numeric(answer: str) -> bool:
    try:
        float(answer)
        return True
    except (TypeError, ValueError):
        return False


def extract_answer(text: str, options: Sequence[str] | None = None, numeric: bool = False) -> str | None:
    """The predicted answer in generated ``text`` (module docstring), or None when nothing matches."""
    if numeric:
        numbers = _NUMBER.findall(text.replace(",", ""))
        return numbers[-1] if numbers else None
    if not options:
        line = text.strip().split("\n")[0].strip()
        return line or None
    lowered = {o.lower(): o for o in options}
    stated = _ANSWER_IS.search(text)
    if all(len(o) == 1 for o in options) and stated and stated.group(1).lower() in lowered:
        return lowered[stated.group(1).lower()]  # letters (ScienceQA): "The answer is X."
    pattern = "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))
    if all(len(o) == 1 for o in options):  # a bare letter must stand alone
        pattern = rf"(?<![A-Za-z0-9])({pattern})(?![A-Za-z0-9])"
    else:  # LLM-Adapters' re.findall(r'true|false', ...): no word boundaries ("true8cred" reads as true)
        pattern = rf"({pattern})"
    match = re.search(pattern, text, re.IGNORECASE)
    return lowered[match.group(1).lower()] if match else None


def is_correct(prediction: str | None, answer: str) -> bool:
    if prediction is None:
        return False
    if is_numeric(answer):
        return is_numeric(prediction) and abs(float(prediction) - float(answer)) < 1e-3
    return prediction.strip().lower() == answer.strip().lower()


def with_options(records: Sequence[dict]) -> list[dict]:
    """Records whose candidate answers are unknown get the label vocabulary of their task (if it is small)."""
    vocab: dict[str, set[str]] = defaultdict(set)
    for record in records:
        vocab[record["task"]].add(record["answer"])
    out = []
    for record in records:
        labels = vocab[record["task"]]
        if "options" not in record and not is_numeric(record["answer"]) and 1 < len(labels) <= 26:
            record = {**record, "options": sorted(labels)}
        out.append(record)
    return out


# --- protocols ----------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, num_beams: int = 1,
             batch_size: int = 8) -> list[str]:
    """Greedy (``num_beams=1``) or beam-search continuations of ``prompts`` (left-padded batches)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True)
            enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def continuation(record: dict, option: str) -> str:
    """The target text with the gold answer replaced by ``option`` ("the correct answer is X",
    "Answer: The answer is X."); just ``option`` when the target does not contain the answer."""
    output, answer = record["output"], record["answer"]
    if answer and answer in output:
        head, _, tail = output.rpartition(answer)
        return head + option + tail
    return option


@torch.no_grad()
def option_scores(model: nn.Module, tokenizer, prompt: str, continuations: Sequence[str],
                  length_normalize: bool = False) -> list[float]:
    """Log-probability of each continuation after ``prompt`` (per byte when ``length_normalize``)."""
    prompt_len = len(tokenizer(prompt)["input_ids"])
    rows = [tokenizer(prompt + c)["input_ids"] for c in continuations]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows], device=model.device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
    logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    scores = []
    for i, (row, text) in enumerate(zip(rows, continuations)):
        start = min(prompt_len, len(row) - 1)
        targets = torch.tensor(row[start:], device=model.device)
        score = logprobs[i, start - 1:len(row) - 1].gather(-1, targets[:, None]).sum().item()
        scores.append(score / max(len(text.encode()), 1) if length_normalize else score)
    return scores


@torch.no_grad()
def classify(model: nn.Module, features: Sequence[dict], pad_token_id: int, batch_size: int = 32,
             num_choices: Sequence[int] | None = None, routing: RoutingCounter | None = None) -> list[int]:
    """Arg-max class per feature; with ``num_choices``, over each example's first ``num_choices[i]`` logits.

    Batches are formed in order of length (less padding) and the predictions returned in the features' order;
    ``routing``, when given, counts every batch's routing.
    """
    collate = Collator(pad_token_id, keep_task=False)
    order = sorted(range(len(features)), key=lambda i: feature_length(features[i]))
    predictions = [0] * len(features)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([features[i] for i in chunk])
        batch.pop("labels", None)
        logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float()
        if routing is not None:
            routing.add(batch)
        if num_choices is not None:
            real = torch.tensor([num_choices[i] for i in chunk], device=logits.device)
            padded = torch.arange(logits.shape[-1], device=logits.device)[None, :] >= real[:, None]
            logits = logits.masked_fill(padded, float("-inf"))
        for i, prediction in zip(chunk, logits.argmax(-1).tolist()):
            predictions[i] = prediction
    return predictions


def evaluate_accuracy(model: nn.Module, tokenizer, records: Sequence[dict], kind: str, *,
                      protocol: str = "auto", features: Sequence[dict] | None = None, template: str = "alpaca",
                      max_new_tokens: int = 32, num_beams: int = 1, length_normalize: bool = False,
                      batch_size: int = 16, routing: RoutingCounter | None = None) -> tuple[dict, list[dict]]:
    """Accuracy of ``model`` on ``records``: (metrics, per-record predictions). ``protocol`` ``auto`` is
    ``classification`` or ``multiple_choice`` for those data kinds (``classification`` given for multiple-choice
    data is read as ``multiple_choice``) and ``generation`` for instruction data;
    ``features`` (the tokenised records) are needed for classification, whose forwards also feed ``routing``
    (the other protocols leave it empty)."""
    encoder = kind in ("classification", "multiple_choice")
    if protocol == "auto" or (protocol == "classification" and kind == "multiple_choice"):
        protocol = kind if encoder else "generation"
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.protocol must be one of {('auto',) + PROTOCOLS}, got {protocol!r}")
    if (protocol in ENCODER_PROTOCOLS) != encoder or (protocol == "multiple_choice") != (kind == "multiple_choice"):
        raise ValueError(f"eval.protocol {protocol!r} does not apply to {kind} data")
    was_training = model.training
    model.eval()
    try:
        if protocol in ENCODER_PROTOCOLS:
            if features is None:
                raise ValueError("classification evaluation needs the tokenised features")
            choices = [len(r["choices"]) for r in records] if kind == "multiple_choice" else None
            predicted = classify(model, features, tokenizer.pad_token_id, batch_size, choices, routing)
            rows = [{"task": r["task"], "answer": r["label"], "prediction": p, "correct": p == r["label"]}
                    for r, p in zip(records, predicted)]
        else:
            records = with_options(records)
            prompts = [format_prompt(r, template) for r in records]
            if protocol == "generation":
                texts = generate(model, tokenizer, prompts, max_new_tokens, num_beams, batch_size)
                rows = []
                for record, text in zip(records, texts):
                    pred = extract_answer(text, record.get("options"), is_numeric(record["answer"]))
                    rows.append({"task": record["task"], "answer": record["answer"], "prediction": pred,
                                 "generated": text, "correct": is_correct(pred, record["answer"])})
            else:
                rows = []
                for record, prompt in zip(records, prompts):
                    options = record.get("options")
                    if not options:
                        raise ValueError(f"task {record['task']!r}: loglik evaluation needs answer options "
                                         "('options', 'choices' or an 'Answer format:' line)")
                    scores = option_scores(model, tokenizer, prompt, [continuation(record, o) for o in options],
                                           length_normalize)
                    pred = options[max(range(len(options)), key=scores.__getitem__)]
                    rows.append({"task": record["task"], "answer": record["answer"], "prediction": pred,
                                 "correct": is_correct(pred, record["answer"])})
    finally:
        model.train(was_training)
    return summarise(rows, protocol, max_new_tokens=max_new_tokens, num_beams=num_beams,
                     length_normalize=length_normalize), rows


def summarise(rows: Sequence[dict], protocol: str, **settings: Any) -> dict[str, Any]:
    """``{"protocol", "accuracy", "n", "tasks": {task: {"accuracy", "n"}}}`` (accuracy in [0, 1])."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(bool(row["correct"]))
    tasks = {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in by_task.items()}
    total = sum(bool(r["correct"]) for r in rows)
    metrics = {"protocol": protocol, "accuracy": total / max(len(rows), 1), "n": len(rows), "tasks": tasks}
    if protocol == "generation":
        metrics.update(max_new_tokens=settings["max_new_tokens"], num_beams=settings["num_beams"])
    if protocol == "loglik":
        metrics["length_normalize"] = settings["length_normalize"]
    return metrics


def lm_eval_harness(model: nn.Module, tokenizer, tasks: Sequence[str], batch_size: int = 16,
                    **options: Any) -> dict[str, Any]:
    """lm-evaluation-harness on the adapted model (``HFLM(pretrained=model)``): per-task ``acc`` in the
    same ``metrics`` layout. Needs ``pip install 'moela[eval]'``."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ValueError("eval.protocol lm_eval needs lm-evaluation-harness: pip install 'moela[eval]'") from None
    if not tasks:
        raise ValueError("eval.protocol lm_eval needs eval.lm_eval_tasks (e.g. [boolq, piqa])")
    results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                                      tasks=list(tasks), **options)["results"]
    per_task = {t: {"accuracy": r.get("acc,none"), "accuracy_norm": r.get("acc_norm,none")} for t, r in results.items()}
    accs = [v["accuracy"] for v in per_task.values() if v["accuracy"] is not None]
    return {"protocol": "lm_eval", "accuracy": sum(accs) / len(accs) if accs else None, "n": 0, "tasks": per_task}


# --- routing statistics -----------------------------------------------------------------------------------
class RoutingCounter:
    """Load per expert per module and measured active parameters per token, counted batch by batch.

    Call :meth:`add` with each batch right after ``model`` ran it (it reads the layers' ``last_stats``).
    ``load[i]``: fraction of the (non-padding) tokens' routing slots given to expert ``i`` (null experts
    last). Active parameters per token of a module: the mean over tokens of ``Σ_{selected real i} r_i
    (d_in + d_out)``; the model's figure is the sum over modules (METHODS.md §3).
    """

    def __init__(self, model: nn.Module):
        self.layers = list(moela_layers(model))
        self.costs = {name: torch.tensor(layer.ranks, dtype=torch.float64) * (layer.d_in + layer.d_out)
                      for name, layer in self.layers}  # parameters each expert adds per token
        self.counts = {name: torch.zeros(layer.num_slots, dtype=torch.float64) for name, layer in self.layers}
        self.active = {name: 0.0 for name, _ in self.layers}
        self.tokens = 0

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        mask = batch.get("attention_mask")
        mask = mask.reshape(-1, mask.shape[-1]) if mask is not None else None  # multiple choice: (B·C, T)
        n = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        self.tokens += n
        for name, layer in self.layers:
            cost = self.costs[name]
            if layer.last_stats is None:
                self.counts[name][0] += n
                self.active[name] += float(cost[0]) * n
                continue
            selected = layer.last_stats.selected.cpu()
            if mask is not None and tuple(mask.shape) == tuple(selected.shape[:-1]):
                selected = selected[mask.bool()]
            selected = selected.reshape(-1, layer.num_slots).double()
            self.counts[name] += selected.sum(0)
            self.active[name] += float((selected[:, :layer.num_experts] @ cost).sum())

    def result(self) -> dict[str, Any]:
        modules = {}
        for name, layer in self.layers:
            slots = self.counts[name].sum()
            modules[name] = {"ranks": layer.ranks, "num_null": layer.num_null,
                             "load": (self.counts[name] / slots.clamp_min(1)).tolist(),
                             "active_params_per_token": self.active[name] / max(self.tokens, 1)}
        trainable = sum(layer.lora_A.weight.numel() + layer.lora_B.weight.numel()
                        + (layer.router.weight.numel() if layer.router is not None else 0) for _, layer in self.layers)
        return {"tokens": self.tokens, "adapter_params": trainable,
                "active_params_per_token": sum(m["active_params_per_token"] for m in modules.values()),
                "modules": modules}


@torch.no_grad()
def routing_statistics(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """:class:`RoutingCounter`'s statistics of ``model`` over ``batches`` (run here, in eval mode)."""
    counter = RoutingCounter(model)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**{k: v.to(model.device) for k, v in batch.items() if k not in ("labels", "task")})
            counter.add(batch)
    finally:
        model.train(was_training)
    return counter.result()
