"""keep_inputs under torch.compile: traced as the plain element-wise chain, with no graph break."""

from __future__ import annotations

import torch

from plait.models.kept_inputs import keep_inputs


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * weight


def _grads(fn) -> list[torch.Tensor]:
    torch.manual_seed(0)
    x, weight = torch.randn(4, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    (fn(x, weight) * torch.arange(8.0)).sum().backward()
    return [x.grad, weight.grad]


def test_keep_inputs_compiles_into_one_graph_with_the_eager_gradients() -> None:
    # fullgraph=True raises at a graph break (the re-run's torch.autograd.grad inside backward broke every
    # RMSNorm and SwiGLU of a compiled Llama block); dynamo's eager backend keeps the test to seconds.
    compiled = torch.compile(lambda x, w: keep_inputs(_rms_norm, x, w), fullgraph=True, backend="eager")
    eager = _grads(lambda x, w: keep_inputs(_rms_norm, x, w))
    for got, want in zip(_grads(compiled), eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
