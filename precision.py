"""The training step's arithmetic, ``--precision`` (no paper section: Algorithm 1's maths is unchanged).

``train.py`` runs each iteration of Algorithm 1 inside :func:`autocast`. fp32: nothing changes.
bf16: the step runs under ``torch.autocast(device, torch.bfloat16)``, so G, E, D_X, D_Z and the
VGG-19 compute in bf16 while the weights, their gradients and Adam's state stay fp32 (autocast
casts each weight on its way into a convolution or dense layer). Stays fp32 inside the region,
each said where it is computed: the gradient penalty's norm (``piad.gradient_penalty``), the γ
policy's gradient statistics (``weights_policy.GradientHistory.record``, on the fp32 parameter
gradients) and eq. (4)'s sums (the fused op accumulates in fp32 and returns fp32); eq. (6)'s
means of the critics' bf16 outputs are bf16 (their gradient, 1/B each, is exact). Evaluation
runs outside the region, in fp32.

Autocast caches the bf16 cast of each trainable weight for the rest of its region, keyed by the
tensor, not its values: after an optimizer step updates the weights in place, the cache would
feed the old ones to the next critic step. Inside the region every optimizer step clears it.
"""
from __future__ import annotations

import contextlib

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str):
    """The region of one training step at ``precision`` (``"fp32"`` or ``"bf16"``) on ``device``."""
    if precision == "fp32":
        yield
        return
    device_type = torch.device(device).type
    hook = register_optimizer_step_post_hook(lambda *_: torch.clear_autocast_cache())  # every optimizer
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    finally:
        hook.remove()
