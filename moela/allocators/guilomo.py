"""``guilomo``: expert counts and ranks learned as GuidedSelection Vectors by bilevel search (METHODS.md §4.6).

Every target gets a search layer with ``E_max`` experts of rank ``r_max``, an expert GSV ``g`` and a rank GSV
``u_i`` per expert. The GSVs (outer variables) minimise the validation loss of the adapter weights (inner
variables) trained on the training split, DARTS-style; the read-out turns them into a plan that the caller
trains from scratch. The search swaps the target modules for search layers and puts the originals back.

With the published mechanics (``estimator="selected"``, ``init_scale=1``, GSV lr 3e-3) only the selected GSV
entry gets a gradient and the start values differ by more than a short search moves them, so the read-out is
mostly the seed-drawn start (measured: BENCHMARKS.md). moela's defaults therefore start the GSVs nearly flat
(``init_scale=0.01``), give *every* entry ``k`` the gradient it would get if it were selected (``"dense"``),
and stop early only once the GSVs have settled. ``plan.meta["unmoved"]`` records the share of read-outs that
equal their start, and a warning is issued when more than half do.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import process_group
from ..layer import LoraMoELinear, RouterStats
from ..model import balance_loss
from ..plan import AllocationPlan, ModulePlan, find_targets
from .budget import apportion, finish, fit, parse_budget, routed, target_dims
from .probe import Cost, holdout, pad_id, size, swapped, to_device
from .registry import register

RANK_OFF = 1e-4  # scale of the rank rows beyond the selected prefix


class PrefixSelect(torch.autograd.Function):
    """``mask_j = 1`` for ``j ≤ n`` and ``off`` beyond, ``n = max(floor, argmax_j σ_j)`` per row of ``σ``.

    Straight-through backward with ``c_k = Σ_{j≤k} ∂L/∂mask_j · σ_j``: ``dense=False`` (the public code) gives
    ``c_n`` to the selected entry and ``leak · ∂L/∂mask_j`` to the others; ``dense=True`` gives every entry
    ``k`` its ``c_k`` (the gradient it would get were it selected), so the GSVs compare every prefix length.
    """

    @staticmethod
    def forward(ctx, sig: torch.Tensor, floor: int, off: float, dense: bool = False, leak: float = 0.0
                ) -> torch.Tensor:
        n = sig.argmax(-1, keepdim=True).clamp_min(floor)
        prefix = torch.arange(sig.shape[-1], device=sig.device) <= n
        ctx.save_for_backward(sig, n)
        ctx.dense, ctx.leak = dense, leak
        return torch.where(prefix, torch.ones_like(sig), torch.full_like(sig, off))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        sig, n = ctx.saved_tensors
        running = (grad * sig).cumsum(-1)
        if ctx.dense:
            return running, None, None, None, None
        idx = torch.arange(sig.shape[-1], device=sig.device)
        return torch.where(idx == n, running.gather(-1, n), ctx.leak * grad), None, None, None, None


class GSVLinear(LoraMoELinear):
    """Search layer: column gate ``ĝ_{c(j)} m_{c(j)} · s_{c(j)} · e_j · ρ_j``.

    ``m`` = :class:`PrefixSelect` of ``σ(g)`` (floor ``n_min − 1``). ``expert_mask="gate"`` (default): experts
    beyond the prefix get ``−∞`` router logits and the gates of the others are multiplied by ``m`` (= 1),
    through which the mask's gradient flows. ``"logits"`` (public code): ``+0.5`` / ``−1e4`` added to the
    router logits, so the gradient reaches ``m`` only through the softmax. ``ρ`` = :class:`PrefixSelect` of
    ``σ(u_i)``, ``1e-4`` beyond the prefix; ``e`` per-rank scales. GSVs start at ``softmax(init_scale · randn)``;
    ``b_std > 0`` draws ``B ~ N(0, b_std)`` (public code: 0.02) so that mask gradients are non-zero at once.
    """

    def __init__(self, base: nn.Module, experts: int = 8, rank: int = 8, top_k: int = 2, alpha: float = 16.0,
                 min_experts: int = 2, init_scale: float = 1.0, b_std: float = 0.0, expert_mask: str = "gate",
                 dense: bool = False, rank_leak: float = RANK_OFF):
        if experts < 2 or not 1 <= min_experts <= experts:
            raise ValueError(f"guilomo needs experts >= 2 and 1 <= min_experts <= experts, got {experts}, {min_experts}")
        if expert_mask not in ("gate", "logits"):
            raise ValueError(f"guilomo expert_mask must be 'gate' or 'logits', got {expert_mask!r}")
        super().__init__(base, [rank] * experts, top_k=top_k, alpha=alpha, adapter_dtype=torch.float32)
        device = self.lora_A.weight.device
        self.min_experts, self.expert_mask, self.dense, self.rank_leak = min_experts, expert_mask, dense, rank_leak
        self.expert_gsv = nn.Parameter((init_scale * torch.randn(experts, device=device)).softmax(-1))
        self.rank_gsv = nn.Parameter((init_scale * torch.randn(experts, rank, device=device)).softmax(-1))
        self.rank_scale = nn.Parameter(torch.ones(experts * rank, device=device))
        if b_std > 0:
            with torch.no_grad():
                self.lora_B.weight.normal_(0.0, b_std)

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert mask (E,), rank mask (E, r)) with straight-through gradients into the GSVs."""
        return (PrefixSelect.apply(self.expert_gsv.sigmoid(), self.min_experts - 1, 0.0, self.dense, 0.0),
                PrefixSelect.apply(self.rank_gsv.sigmoid(), 0, RANK_OFF, self.dense, self.rank_leak))

    def column_gates(self, x: torch.Tensor) -> torch.Tensor:
        expert, rank = self.masks()
        if self.expert_mask == "logits":
            logits = self.router(x) + torch.where(expert > 0, 0.5 * expert, torch.full_like(expert, -1e4))
            gate_mask = torch.ones_like(expert)
        else:
            logits = self.router(x).masked_fill(expert.detach() == 0, float("-inf"))
            gate_mask = expert
        selected = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(self.top_k, -1).indices, True)
        gates = logits.masked_fill(~selected, float("-inf")).softmax(-1).nan_to_num(0.0) * gate_mask
        self.last_stats = RouterStats(logits, selected)
        return gates.index_select(-1, self.column_expert) * self.column_scale * self.rank_scale * rank.flatten()

    def readout(self) -> tuple[int, list[int]]:
        """``(argmax g + 1, [argmax u_i + 1 for every expert])``: the raw read-out, before ``n_min``."""
        return int(self.expert_gsv.argmax()) + 1, [int(r) + 1 for r in self.rank_gsv.argmax(-1)]

    def selection(self) -> tuple[int, list[int]]:
        """Read-out: ``max(n_min, argmax g + 1)`` experts, expert i of rank ``argmax u_i + 1``."""
        count, ranks = self.readout()
        experts = max(self.min_experts, count)
        return experts, ranks[:experts]


def _fill(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def hypergradient(weights: Sequence[torch.Tensor], arch: Sequence[torch.Tensor], train_loss: Callable[[], torch.Tensor],
                  val_loss: Callable[[], torch.Tensor], xi: float, second_order: bool = False) -> list[torch.Tensor]:
    """``∇_α L_val`` (first order), or the DARTS unrolled hypergradient of ``L_val(w − ξ ∇_w L_train(w, α), α)``:
    ``∇_α L_val(w', α) − ξ (∇_α L_train(w⁺, α) − ∇_α L_train(w⁻, α)) / 2ε`` with ``w± = w ± ε v``,
    ``v = ∇_{w'} L_val(w', α)``, ``ε = 0.01 / ‖v‖``. The weights are restored exactly; no ``.grad`` is touched.
    """
    if not second_order:
        return _fill(torch.autograd.grad(val_loss(), arch, allow_unused=True), arch)
    g_train = _fill(torch.autograd.grad(train_loss(), weights, allow_unused=True), weights)
    saved = [w.detach().clone() for w in weights]
    try:
        with torch.no_grad():
            for w, g in zip(weights, g_train):
                w.sub_(xi * g)
        grads = _fill(torch.autograd.grad(val_loss(), [*weights, *arch], allow_unused=True), [*weights, *arch])
        v, direct = grads[:len(weights)], grads[len(weights):]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in v))
        if norm == 0:
            return direct
        eps = 0.01 / float(norm)
        sides = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for w, w0, g in zip(weights, saved, v):
                    w.copy_(w0 + sign * eps * g)
            sides.append(_fill(torch.autograd.grad(train_loss(), arch, allow_unused=True), arch))
    finally:
        with torch.no_grad():
            for w, w0 in zip(weights, saved):
                w.copy_(w0)
    return [d - xi * (p - m) / (2 * eps) for d, p, m in zip(direct, *sides)]


def _step(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """One optimizer step with ``grads``, averaged over the processes when several run."""
    _, world = process_group()
    if world > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        grads = [f.view_as(g) for f, g in zip((flat / world).split([g.numel() for g in grads]), grads)]
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()
    for p in params:
        p.grad = None


def search(model: nn.Module, names: list[str], train: list[dict], val: list[dict], *, experts: int, rank: int,
           top_k: int, alpha: float, min_experts: int, lr: float, gsv_lr: float, steps: int, second_order: bool,
           balance: float, check_every: int, patience: int, seed: int, cost: Cost, settle: float | None = None,
           layer_options: dict | None = None) -> tuple[dict[str, GSVLinear], dict[str, tuple[int, list[int]]]]:
    """Run the bilevel search on search layers swapped in for ``names``; return them (detached from the model,
    which gets its own modules, flags and mode back) and their start read-outs. Early stop: the selections
    unchanged for ``patience`` checks ``check_every`` steps apart and, with ``settle``, no GSV's sigmoid moved
    by more than ``settle`` between two checks. The search runs in eval mode (no dropout), so the seed
    fixes the result. With several processes each step takes one batch per process and averages the gradients
    over them, so the GSVs stay identical on every process."""
    device = next(model.parameters()).device

    def make(base: nn.Module) -> GSVLinear:
        return GSVLinear(base, experts, rank, top_k, alpha, min_experts, **(layer_options or {}))

    with swapped(model, names, make, seed) as layers:
        start = {name: layer.readout() for name, layer in layers.items()}
        weights = [p for l in layers.values() for p in (l.lora_A.weight, l.lora_B.weight, l.router.weight, l.rank_scale)]
        arch = [p for l in layers.values() for p in (l.expert_gsv, l.rank_gsv)]
        inner = torch.optim.AdamW(weights, lr=lr, weight_decay=0.0)
        outer = torch.optim.AdamW(arch, lr=gsv_lr, betas=(0.5, 0.999), weight_decay=0.0)

        def loss_on(batch: dict, coef: float) -> Callable[[], torch.Tensor]:
            inputs, _ = to_device(batch, device)

            def loss() -> torch.Tensor:
                out = model(**inputs).loss
                return out + coef * balance_loss(model, inputs.get("attention_mask")) if coef else out
            return loss

        last, stable, previous = None, 0, torch.cat([p.detach().sigmoid().flatten() for p in arch])
        rank, world = process_group()
        for step in (bar := tqdm(range(steps), desc="guilomo search", leave=False)):
            at = step * world + rank  # several processes: each takes its own batch of the step
            train_loss = loss_on(train[at % len(train)], balance)
            val_loss = loss_on(val[at % len(val)], 0.0)
            _step(outer, arch, hypergradient(weights, arch, train_loss, val_loss, lr, second_order))
            _step(inner, weights, _fill(torch.autograd.grad(train_loss(), weights, allow_unused=True), weights))
            cost.add(train[at % len(train)])
            cost.examples += size(val[at % len(val)])
            if (step + 1) % check_every == 0:
                chosen = [l.selection() for l in layers.values()]
                now = torch.cat([p.detach().sigmoid().flatten() for p in arch])
                settled = settle is None or float((now - previous).abs().max()) <= settle
                stable = stable + 1 if chosen == last and settled else 0
                last, previous = chosen, now
                bar.set_postfix(stable=stable)
                if stable >= patience:
                    break
    return layers, start


def unmoved(layers: dict[str, GSVLinear], start: dict[str, tuple[int, list[int]]]) -> dict[str, float]:
    """Share of expert-count read-outs, and of the rank read-outs of the experts in the plan, equal to their
    start (both before the ``n_min`` floor)."""
    end = {n: l.readout() for n, l in layers.items()}
    counts = [end[n][0] == start[n][0] for n in layers]
    ranks = [a == b for n in layers for a, b in list(zip(end[n][1], start[n][1]))[:layers[n].selection()[0]]]
    return {"experts": sum(counts) / len(counts), "ranks": sum(ranks) / len(ranks)}


@register("guilomo", needs_data=True, needs_weights=True)
def guilomo(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None, seed: int = 0,
            experts: int = 8, rank: int = 8, min_experts: int = 2, top_k: int = 2, alpha: float = 16.0,
            lr: float = 1e-3, gsv_lr: float = 2e-2, epochs: float = 1.0, max_steps: int = 300,
            second_order: bool = False, val_fraction: float = 0.1, batch_size: int = 8, examples: int | None = None,
            balance: float = 1e-3, check_every: int = 10, patience: int = 5, estimator: str = "dense",
            init_scale: float = 0.01, b_std: float = 0.02, expert_mask: str = "gate", rank_leak: float = RANK_OFF,
            settle: float | None = 1e-3) -> AllocationPlan:
    """GuiLoMo: bilevel GSV search, then read-out to a plan (experts ∈ [min_experts, experts], ranks ∈ [1, rank]).

    The search runs ``epochs`` passes over the training split (at most ``max_steps`` steps), stopping early
    once the selections have not changed for ``patience`` checks ``check_every`` steps apart. ``lr``: inner
    AdamW (paper: 3e-4 over 4 epochs; higher here for a short search); ``gsv_lr``: outer AdamW, betas
    (0.5, 0.999) (public code 3e-3). With a budget, the read-out ranks are scaled together (counts kept).

    Mechanics (public code in brackets): ``estimator`` "dense" or ["selected"] (:class:`PrefixSelect`);
    ``init_scale`` of the GSVs' random start [1.0]; ``b_std`` of the supernet's ``B`` [0.02]; ``expert_mask``
    "gate" or ["logits"] (:class:`GSVLinear`); ``rank_leak`` gradient factor of unselected rank entries with
    "selected" [1e-4]; ``settle``: early stop also needs every GSV sigmoid to move ≤ ``settle`` per check
    [None: the public code has no early stop; moela's earlier one watched the selections only].
    """
    if estimator not in ("dense", "selected"):
        raise ValueError(f"guilomo estimator must be 'dense' or 'selected', got {estimator!r}")
    names = find_targets(model, targets)
    dims = target_dims(model, names)
    target = parse_budget(budget, model, targets)
    train, val = holdout(data, val_fraction, batch_size, seed, pad_id(model), examples)
    steps = max(1, min(max_steps, round(epochs * len(train))))
    cost = Cost("guilomo")
    layer_options = {"init_scale": init_scale, "b_std": b_std, "expert_mask": expert_mask,
                     "dense": estimator == "dense", "rank_leak": rank_leak}
    layers, start = search(model, names, train, val, experts=experts, rank=rank, top_k=top_k, alpha=alpha,
                           min_experts=min_experts, lr=lr, gsv_lr=gsv_lr, steps=steps, second_order=second_order,
                           balance=balance, check_every=check_every, patience=patience, seed=seed, cost=cost,
                           settle=settle, layer_options=layer_options)
    still = unmoved(layers, start)
    if max(still.values()) > 0.5:
        warnings.warn(f"guilomo: {100 * still['experts']:.0f}% of the expert counts and {100 * still['ranks']:.0f}% "
                      f"of the ranks read out equal their random start: the plan reflects the seed more than the "
                      f"data (search longer, or raise gsv_lr)", stacklevel=2)
    chosen = {n: layers[n].selection() for n in names}
    if target is None:
        modules: dict[str, ModulePlan] = {n: routed(r, top_k) for n, (_, r) in chosen.items()}
    else:
        flat = [(n, r) for n in names for r in chosen[n][1]]

        def build(total: int) -> dict:
            ranks: dict[str, list[int]] = {n: [] for n in names}
            for (n, _), r in zip(flat, apportion([r for _, r in flat], total, lo=1)):
                ranks[n].append(r)
            return {n: routed(r, top_k) for n, r in ranks.items()}

        modules, _ = fit(build, target, dims, lo=len(flat),
                         minimum=f"{len(flat)} experts of rank 1 (at least {min_experts} per module)")
    scores = {"expert_gsv": {n: l.expert_gsv.detach().sigmoid().tolist() for n, l in layers.items()},
              "rank_gsv": {n: l.rank_gsv.detach().sigmoid().tolist() for n, l in layers.items()}}
    options = {"experts": experts, "rank": rank, "min_experts": min_experts, "top_k": top_k, "alpha": alpha,
               "lr": lr, "gsv_lr": gsv_lr, "epochs": epochs, "max_steps": max_steps, "second_order": second_order,
               "val_fraction": val_fraction, "batch_size": batch_size, "examples": examples, "balance": balance,
               "check_every": check_every, "patience": patience, "seed": seed, "estimator": estimator,
               "init_scale": init_scale, "b_std": b_std, "expert_mask": expert_mask, "rank_leak": rank_leak,
               "settle": settle}
    plan = finish(modules, dims, "guilomo", options, target, scores, cost.report())
    plan.meta["unmoved"] = still
    return plan
