"""``prune``: give the budget to the modules whose warm-up adapters the held-out loss cannot do without.

moela's own allocator (no paper; issue 14 item 7, see BENCHMARKS.md "Allocation recovery"). A rank-``rank``
LoRA on every target is trained ``warmup`` steps (AdamW, eval mode) on the training split of the probe data.
Then, round after round, every remaining adapter is switched off in turn and its importance is the rise of
the held-out loss, ``I_m = L_val(all remaining but m) − L_val(all remaining)``; the ``drop`` share of the
remaining modules with the smallest ``I_m`` lose their adapters for good, and the others are trained ``refit``
more steps, so that what a dropped adapter did can move to the modules that really need an update — an
adapter that only imitated a needed update elsewhere is dropped without loss once the needed one is learnt.
This stops when ``keep`` (a share of the targets) remain; their importances are measured once more after the
last refit (``plan.meta["scores"]["final"]``). The survivors split the budget's rank equally (``ranks="equal"``,
the default) or in proportion to those importances (``"importance"``), as ``⌈R_m / expert_rank⌉`` experts of
equal rank with top-k routing; the other targets get no adapter.

``estimate="taylor"`` estimates every ``I_m`` of a round at once instead of switching each adapter off: with
``c_m`` scaling adapter ``m``'s output, ``I_m = L(c_m = 0) − L(c = 1) ≈ −∂L/∂c_m + ½ ∂²L/∂c_m²`` (the
second-order Taylor expansion of the switch-off), the Hessian's diagonal by Hutchinson's estimator
``E[z ⊙ Hz]`` over ``probes`` Rademacher vectors ``z`` per held-out batch. A round then costs one forward, one
backward and ``probes`` Hessian-vector products per held-out batch, whatever the number of modules (the attention
runs on PyTorch's math kernel, which has second derivatives); the exact ablation costs one held-out pass per
remaining module.

``restarts > 1`` runs that many independent searches (seeds ``seed``, ``seed + 1``, …: each its own split of the
probe into training and held-out examples and its own adapter initialisation) and keeps the targets that survive
most often (ties: larger summed final importance), as in stability selection; their ``final`` importance is the
mean over the searches that kept them (``plan.meta["scores"]["votes"]`` counts them).

Cost, per restart: ``warmup + refit · rounds`` training steps and, per round and once at the end, one held-out
pass per remaining module and a reference pass (``rounds ≈ log(keep) / log(1 − drop)``; ``estimate="taylor"``: the
passes above). Memory: that of LoRA training at rank ``rank``; a Taylor estimate keeps its backward's graph for the
Hessian-vector products, several times a training step's activations on the same batch.
Several processes: each runs the whole search on all the probe data, without communication; the seed makes
their plans equal (the run pipeline keeps the main process's in any case).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..layer import LoraMoELinear
from ..plan import AllocationPlan, find_targets
from .budget import DEFAULT_BUDGET, apportion, finish, fit, parse_budget, routed, target_dims
from .probe import Cost, holdout, pad_id, swapped, to_device
from .registry import register


def held_out_loss(model: nn.Module, val: list[dict], device: torch.device) -> float:
    """Mean of ``model(**batch).loss`` over the held-out batches."""
    with torch.no_grad():
        return sum(float(model(**to_device(b, device)[0]).loss) for b in val) / len(val)


def ablation_importance(model: nn.Module, layers: dict[str, LoraMoELinear], alive: list[str], val: list[dict],
                        device: torch.device) -> dict[str, float]:
    """``{path: L(all alive but m) − L(all alive)}`` for the ``alive`` adapters: one held-out pass each."""
    reference = held_out_loss(model, val, device)
    importance = {}
    for name in alive:
        layers[name].disabled = True
        importance[name] = held_out_loss(model, val, device) - reference
        layers[name].disabled = False
    return importance


def taylor_importance(model: nn.Module, layers: dict[str, LoraMoELinear], alive: list[str], val: list[dict],
                      device: torch.device, probes: int, generator: torch.Generator) -> dict[str, float]:
    """``{path: −∂L/∂c_m + ½ ∂²L/∂c_m²}`` at ``c = 1`` for the ``alive`` adapters (module docstring), ``L`` the
    mean held-out loss, the second derivatives by Hutchinson's estimator with ``probes`` vectors per batch."""
    scale = torch.ones(len(alive), device=device, requires_grad=True)
    hooks = [layers[name].lora_B.register_forward_hook(lambda _m, _i, out, i=i: out * scale[i].to(out.dtype))
             for i, name in enumerate(alive)]
    grad, curvature = torch.zeros(len(alive), device=device), torch.zeros(len(alive), device=device)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            for batch in val:
                loss = model(**to_device(batch, device)[0]).loss / len(val)
                (g,) = torch.autograd.grad(loss, scale, create_graph=True)
                grad += g.detach()
                for k in range(probes):
                    z = (torch.randint(0, 2, (len(alive),), generator=generator) * 2 - 1).to(device, torch.float32)
                    (hz,) = torch.autograd.grad(g @ z, scale, retain_graph=k < probes - 1)
                    curvature += z * hz / probes
    except RuntimeError as error:
        if "derivative for" not in str(error):
            raise
        raise ValueError(f"prune estimate='taylor' needs second derivatives through the model, and one of its "
                         f"operations has none ({error}); use estimate='ablation'") from None
    finally:
        for hook in hooks:
            hook.remove()
    return dict(zip(alive, (-grad + 0.5 * curvature).tolist()))


def prune_search(model: nn.Module, names: list[str], train: list[dict], val: list[dict], *, rank: int, lr: float,
                 warmup: int, refit: int, drop: float, keep: int, seed: int, cost: Cost, estimate: str = "ablation",
                 probes: int = 4) -> tuple[dict[str, float], list[dict[str, float]]]:
    """The survivors' importances after the last refit (``{path: I_m}``, in target order) and those of every
    round. Adapters are swapped in for ``names`` and the model gets its own modules, flags and mode back."""
    device = next(model.parameters()).device
    step = 0

    def train_steps(count: int, optimizer: torch.optim.Optimizer) -> None:
        nonlocal step
        for _ in range(count):
            batch = train[step % len(train)]
            loss = model(**to_device(batch, device)[0]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            cost.add(batch)
            step += 1

    generator = torch.Generator().manual_seed(seed)
    with swapped(model, names, lambda base: LoraMoELinear(base, [rank], top_k=1), seed) as layers:
        def ablate(alive: list[str]) -> dict[str, float]:
            if estimate == "taylor":
                return taylor_importance(model, layers, alive, val, device, probes, generator)
            return ablation_importance(model, layers, alive, val, device)

        optimizer = torch.optim.AdamW([p for l in layers.values() for p in (l.lora_A.weight, l.lora_B.weight)],
                                      lr=lr, weight_decay=0.0)
        train_steps(warmup, optimizer)
        alive, rounds = list(names), []
        while len(alive) > keep:
            importance = ablate(alive)
            rounds.append(importance)
            dropped = min(len(alive) - keep, max(1, int(drop * len(alive))))
            for name in sorted(alive, key=lambda n: importance[n])[:dropped]:
                layers[name].disabled = True
                layers[name].requires_grad_(False)
                alive.remove(name)
            train_steps(refit, optimizer)
        final = ablate(alive)
    return final, rounds


@register("prune", needs_data=True, needs_weights=True, every_target=False)
def prune_plan(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None, seed: int = 0,
               rank: int = 4, lr: float = 2e-3, warmup: int = 100, refit: int = 20, drop: float = 0.25,
               keep: float = 0.2, expert_rank: int = 8, top_k: int = 2, examples: int = 256, batch_size: int = 16,
               val_fraction: float = 0.25, ranks: str = "equal", restarts: int = 1, estimate: str = "ablation",
               probes: int = 4) -> AllocationPlan:
    """Iterative pruning of warm-up adapters by held-out ablation (module docstring); the ``keep`` share of the
    targets (at least one) survives and shares the budget equally (``ranks="equal"``) or in proportion to the
    survivors' final importances (``"importance"``), in experts of rank ≤ ``expert_rank``.
    ``restarts``: independent searches whose most frequent survivors are kept; ``estimate`` of the importances:
    ``"ablation"`` (each adapter switched off in turn) or ``"taylor"`` (all at once, ``probes`` Hutchinson vectors
    per held-out batch; module docstring).
    Without a budget: as many parameters as uniform 4 experts of rank 8 on every target."""
    if not 0 < keep <= 1 or not 0 < drop < 1:
        raise ValueError(f"prune needs 0 < keep <= 1 and 0 < drop < 1, got keep={keep}, drop={drop}")
    if ranks not in ("importance", "equal"):
        raise ValueError(f"prune ranks must be 'importance' or 'equal', got {ranks!r}")
    if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 1:
        raise ValueError(f"prune restarts must be an integer >= 1, got {restarts!r}")
    if estimate not in ("ablation", "taylor"):
        raise ValueError(f"prune estimate must be 'ablation' or 'taylor', got {estimate!r}")
    if not isinstance(probes, int) or isinstance(probes, bool) or probes < 1:
        raise ValueError(f"prune probes must be an integer >= 1, got {probes!r}")
    names = find_targets(model, targets)
    dims = target_dims(model, names)
    target = parse_budget(budget if budget is not None else DEFAULT_BUDGET, model, targets)
    cost = Cost("prune")
    kept = max(1, round(keep * len(names)))
    searches = []
    for run in range(restarts):
        train, val = holdout(data, val_fraction, batch_size, seed + run, pad_id(model), examples)
        searches.append(prune_search(model, names, train, val, rank=rank, lr=lr, warmup=warmup, refit=refit,
                                     drop=drop, keep=kept, seed=seed + run, cost=cost, estimate=estimate,
                                     probes=probes))
    votes = Counter(name for final, _ in searches for name in final)
    summed = {name: sum(final.get(name, 0.0) for final, _ in searches) for name in votes}
    chosen = set(sorted(votes, key=lambda n: (-votes[n], -summed[n]))[:kept])
    survivors = [n for n in names if n in chosen]
    final = {n: summed[n] / votes[n] for n in survivors}
    weights = [max(final[n], 0.0) if ranks == "importance" else 1.0 for n in survivors]

    def build(total: int) -> dict:
        plan = {}
        for name, r in zip(survivors, apportion(weights, total, lo=1)):
            plan[name] = routed(apportion([1.0] * math.ceil(r / expert_rank), r, lo=1), top_k)
        return plan

    modules, _ = fit(build, target, dims, lo=len(survivors),
                     minimum=f"one rank-1 expert on each of the {len(survivors)} surviving modules")
    options = {"rank": rank, "lr": lr, "warmup": warmup, "refit": refit, "drop": drop, "keep": keep,
               "expert_rank": expert_rank, "top_k": top_k, "examples": examples, "batch_size": batch_size,
               "val_fraction": val_fraction, "seed": seed, "ranks": ranks, "restarts": restarts,
               "estimate": estimate, "probes": probes}
    scores = {"rounds": searches[0][1], "final": final}
    if restarts > 1:  # the first search's rounds above; every search's survivors and their importances here
        scores.update(votes=dict(votes), searches=[{"final": f, "rounds": r} for f, r in searches])
    return finish(modules, dims, "prune", options, target, scores, cost.report())
