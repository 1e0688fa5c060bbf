"""Gradient-normalizing weights policy (paper §3.3, Algorithms 2 and 3, eq. (10)-(12)).

For ``L_total = l_1 + γ·l_2`` (eq. 10) the policy picks γ so that both losses move the
weights equally, ``||∂l_1/∂w|| = γ·||∂l_2/∂w||`` (eq. 12), averaged over layers and over time:

* Algorithm 2 (:meth:`GradientHistory.record`): after backpropagating one loss, store for
  every tracked layer the norm of the gradient of its weight: ``norm`` (one of :data:`NORMS`)
  is the standard deviation by default (what the authors' implementation stores, supplement
  §1.2) or the L2 norm (what Algorithm 2 says). For a tensor of ``n`` entries with mean ``m``,
  ``std² = l2²/n - m²``, so the two agree up to the constant ``√n`` per layer (which cancels
  in the ratio) whenever the gradient mean is ~0.
* Algorithm 3 (:meth:`GradientHistory.weight`): per layer, exponentially smooth each
  loss's history, keep the last N entries, take the ratios numerator/denominator; then reduce.

Where the paper's text and the authors' code disagree, the default follows the code:
* Reduction: paper (Alg. 3): mean of ratios per layer, then mean over layers
  (``reduce="mean"``); authors' code: the median of all (layer × time) ratios pooled
  (``reduce="pooled-median"``, default). ``"median"`` (median over per-layer means) is offered too.
* Smoothing, N and history: see :data:`DEFAULT_SMOOTHING`, :data:`DEFAULT_LAST_N` and
  :data:`DEFAULT_HISTORY` (smoothing ``s_0 = v_0``, ``s_t = s·s_{t-1} + (1 - s)·v_t``; with a
  bounded history it starts again from the oldest record kept; ``max_history=None`` keeps all).
With n_weight = 100 (supplement §1.2), 200 records span 20,000 iterations.

Layers a loss does not reach (``grad`` is None or exactly zero) are recorded as NaN
("missing"); a layer with any missing entry in either history is left out of the ratio, so
e.g. ``L_adv(G)`` vs ``L_rec`` measured on G and E together only uses G's layers. A loss that
reaches no tracked layer at all (``L_adv(E)`` for G's history) is not recorded. If no layer is
left, :meth:`weight` raises. A layer whose denominator is 0 (e.g. the std of a
constant gradient) is skipped too, so γ is never inf or NaN.
"""
from __future__ import annotations

import copy
import math
import statistics
from collections import OrderedDict
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

NORMS = ("std", "l2")  # authors' code (the default), Algorithm 2's text
POLICIES = ("gradnorm", "fixed")  # Algorithms 2-3 (§3.3), or γ_G, γ_E held fixed
REDUCES = ("pooled-median", "mean", "median")  # the default first
DEFAULT_SMOOTHING = 0.95  # authors' code: EWMA with α = 0.05 (the paper gives no value)
DEFAULT_LAST_N = 200      # authors' code (the paper gives no value)
DEFAULT_HISTORY = 200     # authors' code keeps the last 200 records; paper: all

_TRACKED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
            nn.ConvTranspose3d, nn.Linear)


def default_layers(name: str, module: nn.Module) -> bool:
    """Track every convolution and dense layer (paper: "for each convolutional layer")."""
    return isinstance(module, _TRACKED)


def exp_smoothing(values: list[float], smoothing: float) -> list[float]:
    """``s_0 = v_0``, ``s_t = smoothing·s_{t-1} + (1 - smoothing)·v_t``; 0 means no smoothing."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else smoothing * out[-1] + (1.0 - smoothing) * v)
    return out


class GradientHistory:
    """Per-loss, per-layer history of gradient norms of one module (Algorithm 2).

    ``layers`` is a predicate ``(qualified_name, submodule) -> bool`` choosing the submodules
    whose ``.weight`` is tracked (default: every Conv*d / ConvTranspose*d / Linear).
    """

    def __init__(self, module: nn.Module, *, norm: str = "std",
                 layers: Callable[[str, nn.Module], bool] | None = None,
                 max_history: int | None = DEFAULT_HISTORY):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if max_history is not None and max_history < 1:
            raise ValueError(f"max_history must be positive or None, got {max_history}")
        select = layers or default_layers
        self.norm, self.max_history = norm, max_history
        self.params: OrderedDict[str, torch.Tensor] = OrderedDict(
            (name, m.weight) for name, m in module.named_modules()
            if select(name, m) and isinstance(getattr(m, "weight", None), torch.Tensor))
        if not self.params:
            raise ValueError("no layer of the module is tracked")
        # history[loss][layer] -> one value per record() call (NaN = layer not reached)
        self.history: dict[str, dict[str, list[float]]] = {}

    def __len__(self) -> int:
        """Number of losses with a history."""
        return len(self.history)

    def record(self, loss_name: str) -> None:
        """Algorithm 2: append the norm (``self.norm``) of every tracked layer's current ``.grad``.
        A loss that reaches none of the tracked layers (every ``.grad`` None) is not recorded."""
        grads = [p.grad for p in self.params.values()]
        if all(g is None for g in grads):
            return
        entry = self.history.setdefault(loss_name, {layer: [] for layer in self.params})
        present = [g.detach() if g.dtype == torch.float64 else g.detach().float() for g in grads if g is not None]
        # (norm, L2 norm) per layer, in one device sync; the L2 norm tells an all-zero gradient
        norm = (lambda g: g.std(correction=0)) if self.norm == "std" else torch.linalg.vector_norm
        values = iter(torch.stack([torch.stack([norm(g), g.abs().amax()]) for g in present]).tolist())
        for layer, g in zip(self.params, grads):
            value, largest = next(values) if g is not None else (math.nan, math.nan)
            if largest == 0.0:
                value = math.nan  # an all-zero gradient: the loss does not reach this layer
            series = entry[layer]
            series.append(value)
            if self.max_history is not None:
                del series[:-self.max_history]  # keep the last max_history records

    def _series(self, loss_name: str) -> dict[str, list[float]]:
        if loss_name not in self.history:
            known = ", ".join(self.history) or "none"
            raise ValueError(f"no gradient history for loss {loss_name!r} (recorded: {known})")
        return self.history[loss_name]

    def layer_ratios(self, numerator: str, denominator: str, *, last_n: int = DEFAULT_LAST_N,
                     smoothing: float = DEFAULT_SMOOTHING) -> dict[str, list[float]]:
        """Algorithm 3, lines 2-4: per layer, the last ``last_n`` ratios of the smoothed
        histories (~ eq. (12)), only over layers both losses reach."""
        if last_n < 1:
            raise ValueError(f"last_n must be positive, got {last_n}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        num, den = self._series(numerator), self._series(denominator)
        out = {}
        for layer in self.params:
            a, b = num[layer], den[layer]
            if not a or not b or not all(map(math.isfinite, a + b)):
                continue  # layer missing from one of the losses
            va = exp_smoothing(a, smoothing)[-last_n:]
            vb = exp_smoothing(b, smoothing)[-last_n:]
            n = min(len(va), len(vb))  # both usually have the same length
            if min(vb[-n:]) <= 0.0:
                continue  # e.g. a constant gradient has std 0: no finite ratio
            out[layer] = [x / y for x, y in zip(va[-n:], vb[-n:])]
        return out

    def layer_weights(self, numerator: str, denominator: str, *, last_n: int = DEFAULT_LAST_N,
                      smoothing: float = DEFAULT_SMOOTHING) -> dict[str, float]:
        """Algorithm 3, line 5: γ per layer, the mean of its ratios."""
        ratios = self.layer_ratios(numerator, denominator, last_n=last_n, smoothing=smoothing)
        return {layer: statistics.fmean(r) for layer, r in ratios.items()}

    def weight(self, numerator: str, denominator: str, *, last_n: int = DEFAULT_LAST_N,
               smoothing: float = DEFAULT_SMOOTHING, reduce: str = REDUCES[0]) -> float:
        """Algorithm 3: γ with ``||∂l_num|| ≈ γ·||∂l_den||`` (eq. 12), for ``l_num + γ·l_den``.

        reduce: one of :data:`REDUCES` (see the module docstring)."""
        if reduce not in REDUCES:
            raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
        kw = dict(last_n=last_n, smoothing=smoothing)
        if reduce == "pooled-median":  # every (layer, record) ratio in one pool
            values = [r for rs in self.layer_ratios(numerator, denominator, **kw).values() for r in rs]
        else:  # line 5: one γ per layer
            values = list(self.layer_weights(numerator, denominator, **kw).values())
        if not values:
            raise ValueError(f"no tracked layer is reached by both {numerator!r} and "
                             f"{denominator!r}")
        return float(statistics.fmean(values) if reduce == "mean" else statistics.median(values))  # line 7

    def state_dict(self) -> dict:
        """Plain Python containers (``torch.save``/``torch.load(weights_only=True)`` safe)."""
        return {"norm": self.norm, "layers": list(self.params), "max_history": self.max_history,
                "history": copy.deepcopy(self.history)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the history; the tracked layers and the norm must be the same. A state saved
        when both norms were recorded (``history[loss][norm][layer]``) gives this one's norm."""
        if list(state["layers"]) != list(self.params):
            raise ValueError("state was saved for different layers: "
                             f"{list(state['layers'])} vs {list(self.params)}")
        history = copy.deepcopy(dict(state["history"]))
        if any(set(series) == set(NORMS) for series in history.values()):  # both norms recorded
            history = {loss: series[self.norm] for loss, series in history.items()}
        elif state["norm"] != self.norm:
            raise ValueError(f"state records the {state['norm']!r} norm, this history the {self.norm!r} norm")
        self.max_history = state.get("max_history", self.max_history)
        self.history = history


def record_losses(histories: GradientHistory | Iterable[GradientHistory],
                  losses: Mapping[str, torch.Tensor],
                  params: Iterable[torch.Tensor]) -> None:
    """Algorithm 1, lines 10-12: for each loss, reset gradients, backpropagate, record.

    ``params`` are the parameters the losses train (e.g. G's and E's); they must include every
    layer the histories track. Gradients are computed with ``torch.autograd.grad`` (graph
    retained, so the caller can backpropagate the same losses afterwards), so parameters not
    in ``params`` (e.g. the critics') keep their ``.grad`` untouched. On return the ``.grad``
    of ``params`` is None.

    Example: ``record_losses([hist_G, hist_E], {"adv_G": l_g, "adv_E": l_e, "rec": l_rec},
    [*G.parameters(), *E.parameters()])``, then ``hist_G.weight("adv_G", "rec")``.
    """
    histories = [histories] if isinstance(histories, GradientHistory) else list(histories)
    params = [p for p in params if p.requires_grad]
    ids = {id(p) for p in params}
    for h in histories:
        missing = [name for name, p in h.params.items() if p.requires_grad and id(p) not in ids]
        if missing:
            raise ValueError(f"tracked layers not among params: {missing}")
    try:
        for name, loss in losses.items():
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = g
            for h in histories:
                h.record(name)
    finally:
        for p in params:
            p.grad = None
