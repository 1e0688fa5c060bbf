"""Fused relative-perceptual-L1 op (paper §3.1, eq. (3)-(4)): Python side of ``csrc/``.

The compiled extension ``piad_C`` registers ``torch.ops.piad.rel_perc_l1`` (per-sample loss,
shape (N,)) and ``torch.ops.piad.rel_perc_l1_backward`` (gradient w.r.t. ``fx``). This module
imports it and adds what the C++ side does not: fake kernels (shape checks with ``torch._check``)
for ``torch.compile`` and the autograd formula. The denominator of eq. (4) depends on ``fx``
only and is a constant in backward, so

    d loss[n] / d fx = g[n] sign(fx - fy) / std[c] / (den[n] + eps),   d loss / d fy = -(that).

The op is differentiable once: nothing differentiates the loss twice (torch warns that the
backward op has no autograd kernel if asked to).

``losses.py`` imports this module at its top (optionally: a copied ``losses.py`` works without it).
Build the extension with ``pip install --no-build-isolation -e .``; without it :func:`is_built`
returns False and the pure-PyTorch reference ``losses.rel_perc_l1_torch`` is used instead.
"""
from __future__ import annotations

import torch

try:
    import piad_C  # noqa: F401  (loading the library registers torch.ops.piad.*)
    _error = ""
except ImportError as err:
    piad_C, _error = None, f"{type(err).__name__}: {err}"


def _check_inputs(fx, fy, mean, std, eps):
    """The shape checks of csrc/rel_perc_l1.h, same messages, for fake (traced) tensors."""
    torch._check(fx.dim() >= 2, lambda: f"features must have shape (N, C, *), got fx.shape={tuple(fx.shape)}")
    torch._check(fx.shape == fy.shape,
                 lambda: f"fx and fy must have the same shape, got {tuple(fx.shape)} and {tuple(fy.shape)}")
    torch._check(fx.dtype == fy.dtype, lambda: f"fx and fy must have the same dtype, got {fx.dtype} and {fy.dtype}")
    for name, t in (("mean", mean), ("std", std)):
        torch._check(t.shape == fx.shape[1:2], lambda: f"{name} must be 1-D with one entry per channel "
                     f"(C={fx.shape[1]}), got shape {tuple(t.shape)}")
    torch._check(eps >= 0, lambda: f"eps must be >= 0, got {eps}")


def _fake_forward(fx, fy, mean, std, eps):
    _check_inputs(fx, fy, mean, std, eps)
    return fx.new_empty(fx.shape[0], dtype=loss_dtype(fx.dtype))


def loss_dtype(features: torch.dtype) -> torch.dtype:
    """The loss' dtype for features of dtype ``features``: the kernels' accumulation type (csrc/
    rel_perc_l1.h), float32 for bf16 and half, so eq. (4)'s reduction is never below fp32."""
    return torch.promote_types(features, torch.float32)


def _fake_backward(grad, fx, fy, mean, std, eps):
    _check_inputs(fx, fy, mean, std, eps)
    torch._check(grad.shape == fx.shape[:1],
                 lambda: f"grad must have shape (N,) = ({fx.shape[0]},), got {tuple(grad.shape)}")
    xp = fx.movedim(1, -1)  # as the kernels write it: channels_last stays so, else contiguous
    if fx.dim() >= 3 and not fx.is_contiguous() and xp.is_contiguous():
        return torch.empty_like(xp).movedim(-1, 1)
    return fx.new_empty(fx.shape)


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


if piad_C is not None:
    torch.library.register_fake("piad::rel_perc_l1")(_fake_forward)
    torch.library.register_fake("piad::rel_perc_l1_backward")(_fake_backward)
    torch.library.register_autograd("piad::rel_perc_l1", _backward, setup_context=_setup_context)


def is_built() -> bool:
    """True when the extension is built and imported (its ops, fake kernels and autograd are registered)."""
    return piad_C is not None


def available(device: torch.device | str = "cpu") -> bool:
    """True when the extension is loaded and has a kernel for ``device``'s type."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return is_built() and key is not None and torch.ops.piad.rel_perc_l1.default.has_kernel_for_dispatch_key(key)


def rel_perc_l1(fx: torch.Tensor, fy: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                eps: float = 1e-6) -> torch.Tensor:
    """Eq. (3)-(4) per sample, shape (N,), with the fused kernels (differentiable in fx, fy)."""
    if not torch.compiler.is_compiling() and not available(fx.device):  # traced: checked eagerly
        why = _error or f"no kernel for device type {fx.device.type!r}"
        raise RuntimeError(f"fused relative-perceptual-L1 op unavailable ({why}); build it with "
                           "`pip install --no-build-isolation -e .` or use losses.rel_perc_l1_torch")
    return torch.ops.piad.rel_perc_l1(fx, fy, mean, std, float(eps))
