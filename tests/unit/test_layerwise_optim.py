"""LAMB and LARS in one process: against the papers' update written out per tensor, and against timm's."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import pytest
import torch

from plait.optim import Lamb, Lars, lamb, lars

STEPS = 5


def fixed_tensors() -> list[torch.Tensor]:
    """A matrix, a vector, a zero matrix (its trust ratio is 1) and a matrix with a zero gradient."""
    gen = torch.Generator().manual_seed(3)
    return [
        torch.randn(6, 5, generator=gen),
        torch.randn(5, generator=gen),
        torch.zeros(4, 3),
        torch.randn(2, 3, generator=gen),
    ]


def gradients(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(6, 5, generator=gen), torch.randn(5, generator=gen), torch.randn(4, 3, generator=gen)]
    return [*grads, torch.zeros(2, 3)]


def run(make, *, groups: bool = False) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(t.clone()) for t in fixed_tensors()]
    optimizer = make(
        [{"params": params[:1] + params[2:]}, {"params": params[1:2], "weight_decay": 0.0}] if groups else params
    )
    for step in range(STEPS):
        for param, grad in zip(params, gradients(step), strict=True):
            param.grad = grad.clone()
        optimizer.step()
    return [p.detach() for p in params]


def lamb_by_the_paper(*, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, clip: bool):
    params = fixed_tensors()
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for step in range(1, STEPS + 1):
        for i, (w, g) in enumerate(zip(params, gradients(step - 1), strict=True)):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            update = (m[i] / (1 - betas[0] ** step)) / ((v[i] / (1 - betas[1] ** step)).sqrt() + eps) + weight_decay * w
            ratio = w.norm() / update.norm() if w.norm() > 0 and update.norm() > 0 else torch.tensor(1.0)
            params[i] = w - lr * (ratio.clamp(max=1.0) if clip else ratio) * update
    return params


def lars_by_the_paper(*, lr: float, momentum: float, weight_decay: float, trust_coeff: float, eps: float):
    params = fixed_tensors()
    buffers: list[torch.Tensor | None] = [None] * len(params)
    for step in range(STEPS):
        for i, (w, g) in enumerate(zip(params, gradients(step), strict=True)):
            local = trust_coeff * w.norm() / (g.norm() + weight_decay * w.norm() + eps)
            local = local if w.norm() > 0 and g.norm() > 0 else torch.tensor(1.0)
            d = (g + weight_decay * w) * local
            buffers[i] = d.clone() if buffers[i] is None else momentum * buffers[i] + d
            params[i] = w - lr * buffers[i]
    return params


@pytest.mark.parametrize("clip", [False, True])
def test_lamb_follows_the_paper(clip: bool) -> None:
    options = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    got = run(lambda p: Lamb(p, **options, trust_clip=clip))
    for ours, reference in zip(got, lamb_by_the_paper(**options, clip=clip), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_lars_follows_the_paper() -> None:
    options = dict(lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coeff=0.02, eps=1e-8)
    got = run(lambda p: Lars(p, **options))
    for ours, reference in zip(got, lars_by_the_paper(**options), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_vectors_are_neither_decayed_nor_adapted() -> None:
    """The factories' groups: matrices adapted and decayed; the vector takes the plain Adam / momentum step."""
    model = torch.nn.Linear(5, 6)
    for factory, plain in ((lamb(lr=0.1), "Adam"), (lars(lr=0.1), "SGD")):
        optimizer = factory(model.parameters())
        decays = {tuple(p.shape): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        assert decays[(6, 5)] > 0 and decays[(6,)] == 0, plain


def timm_optim(name: str):
    """timm's optimizer module, loaded on its own: `import timm` pulls torchvision, whose build here
    does not match this torch."""
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    if "_timm_optim" not in sys.modules:
        package = types.ModuleType("_timm_optim")
        package.__path__ = [os.path.join(os.path.dirname(spec.origin), "optim")]
        sys.modules["_timm_optim"] = package
    return importlib.import_module(f"_timm_optim.{name}")


@pytest.mark.parametrize("clip", [False, True])
def test_lamb_equals_timms(clip: bool) -> None:
    timm_lamb = timm_optim("lamb").Lamb
    options = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    ours = run(lambda p: Lamb(p, **options, trust_clip=clip), groups=True)
    theirs = run(lambda p: timm_lamb(p, **options, trust_clip=clip, max_grad_norm=None), groups=True)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip", [False, True])
def test_lars_equals_timms(clip: bool) -> None:
    timm_lars = timm_optim("lars").Lars
    options = dict(lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coeff=0.02, eps=1e-8, trust_clip=clip)
    ours = run(lambda p: Lars(p, **options), groups=True)
    theirs = run(lambda p: timm_lars(p, **options), groups=True)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
