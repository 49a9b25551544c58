"""Cheap element-wise functions that keep only their inputs for backward and run again there.

Autograd keeps every intermediate an element-wise chain needs: RMSNorm keeps a float32 copy of its input
and the normalised tensor besides; SwiGLU keeps silu(gate) besides gate and up. Run through
`keep_inputs`, the chain keeps its inputs alone (which the layer holds anyway: the residual stream, the
gate and up projections) and is re-run in backward, where autograd differentiates it as before, so
gradients are the same bits. Megatron counts its layer this way (the norms' inputs, SwiGLU's two).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _KeepInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        return fn(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs = [
            x.detach().requires_grad_(needed)
            for x, needed in zip(ctx.saved_tensors, ctx.needs_input_grad[1:], strict=True)
        ]
        wanted = [x for x in inputs if x.requires_grad]
        with torch.enable_grad():
            out = ctx.fn(*inputs)
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return (None, *(next(grads) if x.requires_grad else None for x in inputs))


def keep_inputs(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """`fn(*inputs)`, keeping only `inputs` for backward (and `fn` re-run there); `fn` itself when no
    gradient is being recorded, or under torch.compile, whose partitioner already re-runs cheap
    element-wise chains in backward (and cannot trace the re-run's autograd.grad: a graph break)."""
    if not torch.is_grad_enabled() or not any(x.requires_grad for x in inputs) or torch.compiler.is_compiling():
        return fn(*inputs)
    return _KeepInputs.apply(fn, *inputs)
