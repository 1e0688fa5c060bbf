"""Fused relative-perceptual-L1 op (paper §3.1, eq. (3)-(4)): Python side of ``csrc/``.

The compiled extension ``piad_C`` registers ``torch.ops.piad.rel_perc_l1`` (per-sample loss,
shape (N,)) and ``torch.ops.piad.rel_perc_l1_backward`` (gradient w.r.t. ``fx``). This module
adds what the C++ side does not: fake (meta) kernels for ``torch.compile`` and the autograd
formula. The denominator of eq. (4) depends on ``fx`` only and is a constant in backward, so

    d loss[n] / d fx = g[n] sign(fx - fy) / std[c] / (den[n] + eps),   d loss / d fy = -(that).

Nothing happens at import time; call :func:`load` (``losses.py`` does, lazily). Build the
extension with ``pip install --no-build-isolation -e .``; without it :func:`load` returns False
and the pure-PyTorch reference ``losses.rel_perc_l1_torch`` is used instead.
"""
from __future__ import annotations

import threading

import torch

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_error: str = ""


def _fake_forward(fx, fy, mean, std, eps):
    return fx.new_empty(fx.shape[0])


def _fake_backward(grad, fx, fy, mean, std, eps):
    return torch.empty_like(fx)


def _setup_context(ctx, inputs, output):
    fx, fy, mean, std, eps = inputs
    ctx.save_for_backward(fx, fy, mean, std)
    ctx.eps = eps


def _backward(ctx, grad):
    fx, fy, mean, std = ctx.saved_tensors
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_y):
        return None, None, None, None, None
    if not need_x:  # only fy (the reconstruction's features): the gradient is linear in grad
        return None, torch.ops.piad.rel_perc_l1_backward(-grad, fx, fy, mean, std, ctx.eps), None, None, None
    gx = torch.ops.piad.rel_perc_l1_backward(grad, fx, fy, mean, std, ctx.eps)
    return gx, (-gx if need_y else None), None, None, None


def _setup_context_bw(ctx, inputs, output):
    grad, fx, fy, mean, std, eps = inputs
    ctx.save_for_backward(fx, fy, mean, std)
    ctx.eps = eps


def _double_backward(ctx, gg):
    # The backward output is linear in `grad` and piecewise constant in fx, fy (sign, constant
    # denominator), so only `grad` receives a gradient: sum over elements of gg * d out/d grad.
    fx, fy, mean, std = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    unit = torch.ops.piad.rel_perc_l1_backward(fx.new_ones(fx.shape[0]), fx, fy, mean, std, ctx.eps)
    return (gg * unit).flatten(1).sum(1), None, None, None, None, None


def load() -> bool:
    """Import the extension once and register fake kernels and autograd; False if not built."""
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            try:
                import piad_C  # noqa: F401  (registers torch.ops.piad.* on import)
            except ImportError as err:
                _error, _loaded = f"{type(err).__name__}: {err}", False
                return False
            packet = torch.ops.piad.rel_perc_l1
            if not getattr(packet, "_piad_registered", False):  # once per process (reloads)
                torch.library.register_fake("piad::rel_perc_l1")(_fake_forward)
                torch.library.register_fake("piad::rel_perc_l1_backward")(_fake_backward)
                torch.library.register_autograd("piad::rel_perc_l1", _backward,
                                                setup_context=_setup_context)
                torch.library.register_autograd("piad::rel_perc_l1_backward", _double_backward,
                                                setup_context=_setup_context_bw)
                packet._piad_registered = True
            _loaded = True
    return _loaded


def available(device: torch.device | str = "cpu") -> bool:
    """True when the extension is loaded and has a kernel for ``device``'s type."""
    if not load():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("piad::rel_perc_l1", key)


def rel_perc_l1(fx: torch.Tensor, fy: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                eps: float = 1e-6) -> torch.Tensor:
    """Eq. (3)-(4) per sample, shape (N,), with the fused kernels (differentiable in fx, fy)."""
    if not torch.compiler.is_compiling() and not available(fx.device):  # traced: checked eagerly
        why = _error or f"no kernel for device type {fx.device.type!r}"
        raise RuntimeError(f"fused relative-perceptual-L1 op unavailable ({why}); build it with "
                           "`pip install --no-build-isolation -e .` or use losses.rel_perc_l1_torch")
    return torch.ops.piad.rel_perc_l1(fx, fy, mean, std, float(eps))
