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
equal their start, and a warning is issued when more than half do. ``budget_search=True`` prices the
selection's parameters during the search, so that under a budget capacity moves to the modules whose
validation loss gains most (BENCHMARKS.md, allocation recovery).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..distributed import process_group
from ..layer import LoraMoELinear, RouterStats
from ..model import balance_loss
from ..plan import AllocationPlan, ModulePlan, find_targets
from .budget import TOLERANCE, apportion, finish, fit, parse_budget, plan_cost, routed, target_dims
from .probe import Cost, holdout, pad_id, progress, size, swapped, to_device
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
        if experts < 2 or not 0 <= min_experts <= experts:
            raise ValueError(f"guilomo needs experts >= 2 and 0 <= min_experts <= experts, got {experts}, "
                             f"{min_experts}")
        if expert_mask not in ("gate", "logits"):
            raise ValueError(f"guilomo expert_mask must be 'gate' or 'logits', got {expert_mask!r}")
        if min_experts == 0 and (expert_mask != "gate" or not dense):
            raise ValueError("guilomo min_experts=0 needs expert_mask='gate' and estimator='dense': otherwise a module "
                             "switched off gets no gradient and can never be switched on again")
        super().__init__(base, [rank] * experts, top_k=top_k, alpha=alpha, adapter_dtype=torch.float32)
        device = self.lora_A.weight.device
        self.min_experts, self.expert_mask, self.dense, self.rank_leak = min_experts, expert_mask, dense, rank_leak
        # With min_experts = 0 the expert GSV gets a leading entry for "no expert" (entry k reads out k experts),
        # started at 0, below the others (softmax values), so that every module starts with experts: a module
        # without one gets no gradient of the loss and could never be switched on.
        self.none_entry = int(min_experts == 0)
        start = (init_scale * torch.randn(experts + self.none_entry, device=device)).softmax(-1)
        self.expert_gsv = nn.Parameter(torch.cat([start.new_zeros(self.none_entry), start[self.none_entry:]]))
        self.rank_gsv = nn.Parameter((init_scale * torch.randn(experts, rank, device=device)).softmax(-1))
        self.rank_scale = nn.Parameter(torch.ones(experts * rank, device=device))
        if b_std > 0:
            with torch.no_grad():
                self.lora_B.weight.normal_(0.0, b_std)

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert mask (E,), rank mask (E, r)) with straight-through gradients into the GSVs."""
        expert = PrefixSelect.apply(self.expert_gsv.sigmoid(), self.min_experts - 1 + self.none_entry, 0.0, self.dense,
                                    0.0)[self.none_entry:]
        if self.none_entry and self.expert_mask == "gate":  # a module switched off keeps expert 0 at RANK_OFF, so
            # that the loss still tells its GSV whether switching it on would help (its weights barely train)
            expert = torch.cat([expert[:1] + RANK_OFF * (expert[:1].detach() == 0), expert[1:]])
        return (expert,
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

    def soft_cost(self) -> torch.Tensor:
        """``Σ_i m_i (d_in + (d_in + d_out) Σ_j ρ_ij)``: the trainable parameters of the selection, with the masks'
        straight-through gradients (a router row per expert; the read-out's exact cost differs by one row)."""
        expert, rank = self.masks()
        return (expert * (self.d_in + (self.d_in + self.d_out) * rank.sum(-1))).sum()

    def readout(self) -> tuple[int, list[int]]:
        """``(argmax g + 1, [argmax u_i + 1 for every expert])``: the raw read-out, before ``n_min`` (``argmax g``
        with ``min_experts=0``, whose GSV entry 0 is "no expert")."""
        return int(self.expert_gsv.argmax()) + 1 - self.none_entry, [int(r) + 1 for r in self.rank_gsv.argmax(-1)]

    def selection(self) -> tuple[int, list[int]]:
        """Read-out: ``max(n_min, count)`` experts (:meth:`readout`), expert i of rank ``argmax u_i + 1``."""
        count, ranks = self.readout()
        experts = max(self.min_experts, count)
        return experts, ranks[:experts]


class RowAdam(torch.optim.Optimizer):
    """Adam whose second moment is shared by each row (the mean of ``g²`` over the last dimension).

    Per-entry Adam moves every entry whose gradient keeps its sign by about ``lr`` per step whatever the
    gradient's size, so the order of a GSV's entries, and its argmax read-out, changes only where gradients
    differ in sign. With one scale per row, entries move in proportion to their gradients, and the argmax goes
    to the prefix whose (cumulative, :class:`PrefixSelect`) gradient is most negative.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.5, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"], state["m"] = 0, torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p[..., :1])
                state["step"] += 1
                state["m"].lerp_(p.grad, 1 - beta1)
                state["v"].lerp_(p.grad.pow(2).mean(-1, keepdim=True), 1 - beta2)
                m_hat = state["m"] / (1 - beta1 ** state["step"])
                v_hat = state["v"] / (1 - beta2 ** state["step"])
                p.sub_(group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]))


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


def _mean(grads: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """``grads`` averaged over the processes when several run."""
    _, world = process_group()
    if world == 1:
        return grads
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    return [f.view_as(g) for f, g in zip((flat / world).split([g.numel() for g in grads]), grads)]


def _rms(tensors: Sequence[torch.Tensor]) -> float:
    return float(torch.sqrt(torch.mean(torch.cat([t.detach().flatten() for t in tensors]).double() ** 2)))


def _step(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """One optimizer step with ``grads``."""
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()
    for p in params:
        p.grad = None


def search(model: nn.Module, names: list[str], train: list[dict], val: list[dict], *, experts: int, rank: int,
           top_k: int, alpha: float, min_experts: int, lr: float, gsv_lr: float, steps: int, second_order: bool,
           balance: float, check_every: int, patience: int, seed: int, cost: Cost, settle: float | None = None,
           layer_options: dict | None = None, budget: int | None = None, budget_lr: float = 0.1
           ) -> tuple[dict[str, GSVLinear], dict[str, tuple[int, list[int]]], dict[str, float]]:
    """Run the bilevel search on search layers swapped in for ``names``; return them (detached from the model,
    which gets its own modules, flags and mode back) and their start read-outs. Early stop: the selections
    unchanged for ``patience`` checks ``check_every`` steps apart and, with ``settle``, no GSV's sigmoid moved
    by more than ``settle`` between two checks. The search runs in eval mode (no dropout), so the seed
    fixes the result. With several processes each step takes one batch per process and averages the gradients
    over them, so the GSVs stay identical on every process.

    With a ``budget`` the search is constrained (moela; the public code has no budget): the outer objective is
    ``L_val + λ u · C(masks) / budget``, ``C`` the selection's parameters (:meth:`GSVLinear.soft_cost`), ``u`` the
    ratio of the hypergradient's RMS (a moving average, 0.9) to the price gradient's (so that λ is in units of
    the loss signal however that grows while the adapters learn), and after every step dual ascent
    ``λ ← max(0, λ + budget_lr · (cost(read-out) / budget − 1))``. The GSVs are trained by :class:`RowAdam`. A
    prefix then grows only where its validation benefit beats its price. Returns the layers, their start
    read-outs and ``{"lambda": λ, "readout_cost": cost / budget}`` (empty without a budget)."""
    device = next(model.parameters()).device

    def make(base: nn.Module) -> GSVLinear:
        return GSVLinear(base, experts, rank, top_k, alpha, min_experts, **(layer_options or {}))

    with swapped(model, names, make, seed) as layers:
        start = {name: layer.readout() for name, layer in layers.items()}
        weights = [p for l in layers.values() for p in (l.lora_A.weight, l.lora_B.weight, l.router.weight, l.rank_scale)]
        arch = [p for l in layers.values() for p in (l.expert_gsv, l.rank_gsv)]
        inner = torch.optim.AdamW(weights, lr=lr, weight_decay=0.0)
        outer = (RowAdam(arch, lr=gsv_lr) if budget  # per-entry Adam would not let the price reorder a GSV
                 else torch.optim.AdamW(arch, lr=gsv_lr, betas=(0.5, 0.999), weight_decay=0.0))

        def loss_on(batch: dict, coef: float) -> Callable[[], torch.Tensor]:
            inputs, _ = to_device(batch, device)

            def loss() -> torch.Tensor:
                out = model(**inputs).loss
                return out + coef * balance_loss(model, inputs.get("attention_mask")) if coef else out
            return loss

        def readout_cost() -> int:
            return sum(routed(r, top_k).cost(l.d_in, l.d_out) for l in layers.values() if (r := l.selection()[1]))

        lam, scale, spent = 0.0, 0.0, readout_cost() / budget if budget else 0.0
        last, stable, previous = None, 0, torch.cat([p.detach().sigmoid().flatten() for p in arch])
        rank, world = process_group()
        for step in (bar := progress(range(steps), "guilomo search")):
            at = step * world + rank  # several processes: each takes its own batch of the step
            train_loss = loss_on(train[at % len(train)], balance)
            val_loss = loss_on(val[at % len(val)], 0.0)
            hyper = _mean(hypergradient(weights, arch, train_loss, val_loss, lr, second_order))
            if budget:
                price = _fill(torch.autograd.grad(sum(l.soft_cost() for l in layers.values()) / budget, arch,
                                                  allow_unused=True), arch)
                scale = _rms(hyper) if not scale else 0.9 * scale + 0.1 * _rms(hyper)
                unit = scale / max(_rms(price), 1e-30)
                hyper = [h + lam * unit * c for h, c in zip(hyper, price)]
            _step(outer, arch, hyper)
            _step(inner, weights, _mean(_fill(torch.autograd.grad(train_loss(), weights, allow_unused=True), weights)))
            if budget:
                spent = readout_cost() / budget
                lam = max(0.0, lam + budget_lr * (spent - 1.0))
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
    return layers, start, {"lambda": lam, "readout_cost": spent} if budget else {}


def unmoved(layers: dict[str, GSVLinear], start: dict[str, tuple[int, list[int]]]) -> dict[str, float]:
    """Share of expert-count read-outs, and of the rank read-outs of the experts in the plan, equal to their
    start (both before the ``n_min`` floor)."""
    end = {n: l.readout() for n, l in layers.items()}
    counts = [end[n][0] == start[n][0] for n in layers]
    ranks = [a == b for n in layers for a, b in list(zip(end[n][1], start[n][1]))[:layers[n].selection()[0]]]
    return {"experts": sum(counts) / len(counts), "ranks": sum(ranks) / max(1, len(ranks))}


@register("guilomo", needs_data=True, needs_weights=True)
def guilomo_plan(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None, seed: int = 0,
                 experts: int = 8, rank: int = 8, min_experts: int = 2, top_k: int = 2, alpha: float = 16.0,
                 lr: float = 1e-3, gsv_lr: float = 2e-2, epochs: float = 1.0, max_steps: int = 300,
                 second_order: bool = False, val_fraction: float = 0.1, batch_size: int = 8,
                 examples: int | None = None, balance: float = 1e-3, check_every: int = 10, patience: int = 5,
                 estimator: str = "dense", init_scale: float = 0.01, b_std: float = 0.02, expert_mask: str = "gate",
                 rank_leak: float = RANK_OFF, settle: float | None = 1e-3, budget_search: bool = False,
                 budget_lr: float = 0.1) -> AllocationPlan:
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

    Budget (moela; the public method has none). By default the search is unconstrained and its read-out is
    scaled to the budget afterwards, which keeps its shape but cannot move capacity between modules. With
    ``budget_search=True`` the search itself is held to the budget by a Lagrangian price on the selection's
    parameters (dual step ``budget_lr``; :func:`search`) and the GSVs are trained by :class:`RowAdam` (with
    per-entry Adam the price cannot reorder a GSV's entries), so a prefix grows only where its validation
    benefit beats its price. ``min_experts=0`` then lets the search switch a module off (the expert GSV gets
    a "no expert" entry). The read-out is fitted to the budget exactly as before.
    """
    if estimator not in ("dense", "selected"):
        raise ValueError(f"guilomo estimator must be 'dense' or 'selected', got {estimator!r}")
    names = find_targets(model, targets)
    dims = target_dims(model, names)
    target = parse_budget(budget, model, targets)
    smallest = plan_cost({n: routed([1] * min_experts, top_k) for n in names}, dims) if min_experts else 0
    if target is not None and smallest > target * (1 + TOLERANCE):  # no read-out can fit: say so before the search
        raise ValueError(f"guilomo: budget {target:,} is below the minimum of {smallest:,} parameters that any "
                         f"read-out costs ({min_experts} rank-1 experts on each of the {len(names)} target modules); "
                         f"raise the budget or lower min_experts")
    train, val = holdout(data, val_fraction, batch_size, seed, pad_id(model), examples)
    steps = max(1, min(max_steps, round(epochs * len(train))))
    cost = Cost("guilomo")
    layer_options = {"init_scale": init_scale, "b_std": b_std, "expert_mask": expert_mask,
                     "dense": estimator == "dense", "rank_leak": rank_leak}
    layers, start, dual = search(model, names, train, val, experts=experts, rank=rank, top_k=top_k, alpha=alpha,
                                 min_experts=min_experts, lr=lr, gsv_lr=gsv_lr, steps=steps,
                                 second_order=second_order, balance=balance, check_every=check_every,
                                 patience=patience, seed=seed, cost=cost, settle=settle, layer_options=layer_options,
                                 budget=target if budget_search else None, budget_lr=budget_lr)
    still = unmoved(layers, start)
    if max(still.values()) > 0.5:
        warnings.warn(f"guilomo: {100 * still['experts']:.0f}% of the expert counts and {100 * still['ranks']:.0f}% "
                      f"of the ranks read out equal their random start: the plan reflects the seed more than the "
                      f"data (search longer, or raise gsv_lr)", stacklevel=2)
    chosen = {n: pick for n in names if (pick := layers[n].selection())[0]}  # min_experts=0: modules may be off
    if not chosen:
        raise ValueError("guilomo: the search read out no expert in any module (min_experts=0); search longer"
                         + (", lower budget_lr" if budget_search else "") + " or raise min_experts")
    if target is None:
        modules: dict[str, ModulePlan] = {n: routed(r, top_k) for n, (_, r) in chosen.items()}
    else:
        flat = [(n, r) for n in chosen for r in chosen[n][1]]

        def build(total: int) -> dict:
            ranks: dict[str, list[int]] = {n: [] for n in chosen}
            for (n, _), r in zip(flat, apportion([r for _, r in flat], total, lo=1)):
                ranks[n].append(r)
            return {n: routed(r, top_k) for n, r in ranks.items()}

        modules, _ = fit(build, target, dims, lo=len(flat),
                         minimum=f"{len(flat)} experts of rank 1 read out, at least {min_experts} per module; "
                                 + ("search longer or raise budget_lr" if budget_search else
                                    "budget_search=True holds the search to the budget"))
    scores = {"expert_gsv": {n: l.expert_gsv.detach().sigmoid().tolist() for n, l in layers.items()},
              "rank_gsv": {n: l.rank_gsv.detach().sigmoid().tolist() for n, l in layers.items()}}
    options = {"experts": experts, "rank": rank, "min_experts": min_experts, "top_k": top_k, "alpha": alpha,
               "lr": lr, "gsv_lr": gsv_lr, "epochs": epochs, "max_steps": max_steps, "second_order": second_order,
               "val_fraction": val_fraction, "batch_size": batch_size, "examples": examples, "balance": balance,
               "check_every": check_every, "patience": patience, "seed": seed, "estimator": estimator,
               "init_scale": init_scale, "b_std": b_std, "expert_mask": expert_mask, "rank_leak": rank_leak,
               "settle": settle, "budget_search": budget_search, "budget_lr": budget_lr}
    plan = finish(modules, dims, "guilomo", options, target, scores, cost.report())
    plan.meta["unmoved"] = still
    if dual:
        plan.meta["budget_search"] = dual
    return plan
