"""Quantized linears are inference only: a backward through a compiled graph that has them fails loudly.

The custom ops have no autograd formula and read detached inputs, so without this a backward
would silently leave ``grad=None`` on quantized layers (or fail with an unrelated message).
Under grad mode, when some input of the graph requires grad, each floating output gets an
autograd node whose backward raises an error naming the quantized layers.  Nothing is added
under ``torch.no_grad()`` / ``torch.inference_mode()`` (the way to run a policy).
"""
from __future__ import annotations

import torch


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layers, out, source):
        ctx.layers = layers
        return out.view_as(out)

    @staticmethod
    def backward(ctx, *grads):
        shown = ", ".join(ctx.layers[:4]) + (f" and {len(ctx.layers) - 4} more" if len(ctx.layers) > 4 else "")
        raise RuntimeError(
            f"quantvla: cannot backpropagate through quantized linears ({shown}): the W4A8 ops are inference "
            "only. Run the compiled policy under torch.no_grad() or torch.inference_mode(), or leave these "
            "layers out of `include` to train them.")


def guard_outputs(outputs, args, layers: tuple[str, ...]):
    """``outputs`` as they are, or (under grad mode with a grad-requiring input) with a raising backward."""
    if not layers or not torch.is_grad_enabled():
        return outputs
    source = next((a for a in args if isinstance(a, torch.Tensor) and a.requires_grad), None)
    if source is None:
        return outputs

    def wrap(o):
        return _NoBackward.apply(layers, o, source) if isinstance(o, torch.Tensor) and o.is_floating_point() else o

    if isinstance(outputs, (list, tuple)):
        return type(outputs)(wrap(o) for o in outputs)
    return wrap(outputs)
