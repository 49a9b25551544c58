"""QLoRA-style frozen bases: linear layers held as int8 with one fp32 scale per output row.

bitsandbytes' 4-bit NF4 kernels need a GPU; on CPU plait keeps each targeted layer's weight as
symmetric per-channel int8 (absmax / 127 per output row), a quarter of the fp32 bytes, and
dequantizes it in forward. The layer stays an `nn.Linear` (a subclass swapped onto the instance),
so peft wraps it like any other; its weight is a buffer, not a parameter, so no optimizer, ZeRO
bucket or gradient ever sees it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZE_KINDS = ("int8",)


class Int8Linear(nn.Linear):
    """A frozen linear layer: int8 ``weight`` (out, in) times fp32 ``weight_scale`` (out,), dequantized in forward."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_int8(linear.weight.detach())
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scale"


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 per-row scale) with weight ~= int8 * scale[:, None]."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return weight.float() * scale.float()[:, None]


def base_linears(model: nn.Module) -> list[str]:
    """The linear layers QLoRA holds in low-bit form: every nn.Linear but the output head (``lm_head``, or one
    whose weight is tied to another module's, like the embedding), which stays as it is."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not name.endswith("lm_head") and owners[id(module.weight)] == 1
    ]


def quantize_linears(model: nn.Module, names: list[str], *, kind: str) -> None:
    """Swap each named nn.Linear of `model` for its int8 form, in place."""
    if kind not in QUANTIZE_KINDS:
        raise ValueError(f"quantize={kind!r}: choose one of {list(QUANTIZE_KINDS)}")
    for name in names:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise ValueError(f"{name} is a {type(module).__name__}; lora.quantize holds only nn.Linear layers as int8")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, Int8Linear(module))


def quantized_numel(model: nn.Module) -> int:
    """Weight elements held as int8 (buffers, so `model.parameters()` leaves them out)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, Int8Linear))
