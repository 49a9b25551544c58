"""Activation recomputation (``plan.recompute`` = none | full | selective).

A recomputed module keeps only its inputs during the forward pass and replays its
forward during backward to rebuild the activations the gradients need
(``torch.utils.checkpoint`` without reentrancy, RNG state preserved, so dropout
replays the same masks).

Names do not change. Rather than wrapping a layer in a module that holds it as
``.module`` (which would rename every parameter ``blocks.0.module.attn...``),
``recompute_module`` turns the instance itself into an instance of a subclass of its
own class, ``Recomputed<Class>``, whose ``forward`` checkpoints the inherited one.
No function or class of torch or transformers is replaced, only that instance's
class changes (the technique FSDP2's ``fully_shard`` uses), so the module tree,
``named_parameters()``, ``state_dict()`` keys, ``get_submodule`` paths and
``isinstance`` checks are exactly what they were.

Hooks: the replay calls the inherited ``forward``, not ``__call__``, so forward
(pre-)hooks registered on a recomputed module itself run once per forward pass and not
again in backward, as with Hugging Face's own gradient checkpointing. Hooks on its
submodules do run again during the replay, inside backward.

Example:
    >>> model = plait.models.build("tiny")
    >>> apply_recompute(model, mode="selective", modules=["attn"])
    ['blocks.0.attn', 'blocks.1.attn']
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from plait.models.architectures import find_architecture

__all__ = ["RECOMPUTE_MODES", "Recomputed", "apply_recompute", "find_layer_list", "recompute_module"]

RECOMPUTE_MODES = ("none", "full", "selective")

# plait's GPT, then Hugging Face's decoder (Llama, Mistral, Qwen...), GPT-2, BERT, others.
LAYER_LIST_NAMES = (
    "blocks",
    "model.layers",
    "transformer.h",
    "encoder.layer",
    "model.decoder.layers",
    "gpt_neox.layers",
    "layers",
    "h",
)


class Recomputed(nn.Module):
    """Base of the ``Recomputed<Class>`` subclasses that :func:`recompute_module` creates.

    Not built directly: ``isinstance(module, Recomputed)`` says whether a module's
    activations are recomputed. Its forward checkpoints the original class's forward
    when the module is training and gradients are on; otherwise it runs it as is.
    """

    _recompute_base: type[nn.Module]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        forward = super().forward
        if not (self.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        _reject_kv_cache(self, kwargs)
        # Keyword values travel positionally: checkpoint reads a few keywords of its own
        # (debug, context_fn...), and it saves GPU RNG state only for devices of its args.
        replay = functools.partial(_call_split, forward, len(args), tuple(kwargs))
        return checkpoint(replay, *args, *kwargs.values(), use_reentrant=False)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The subclass is made at run time and cannot be pickled by name: rebuild it from
        # the original class, then let pickle restore the state as usual.
        _, _, state, *rest = super().__reduce_ex__(protocol)
        return (_rebuild_recomputed, (self._recompute_base,), state, *rest)


def _call_split(forward: Callable[..., Any], num_args: int, names: tuple[str, ...], *values: Any) -> Any:
    keywords = dict(zip(names, values[num_args:], strict=True))
    return forward(*values[:num_args], **keywords)


def _reject_kv_cache(module: nn.Module, kwargs: dict[str, Any]) -> None:
    if kwargs.get("use_cache"):
        raise ValueError(
            f"{type(module).__name__} was called with use_cache=True while its activations are "
            "recomputed: the replay in backward would append to the KV cache a second time; "
            "call the model with use_cache=False for training"
        )


def _rebuild_recomputed(base: type[nn.Module]) -> nn.Module:
    module = base.__new__(base)
    module.__class__ = _recomputed_class(base)
    return module


def _recomputed_class(base: type[nn.Module]) -> type[nn.Module]:
    def body(namespace: dict[str, Any]) -> None:
        namespace.update(_recompute_base=base, __module__=__name__, __doc__=base.__doc__)

    return types.new_class(f"Recomputed{base.__name__}", (Recomputed, base), exec_body=body)


def _base_class(module: nn.Module) -> type[nn.Module]:
    return module._recompute_base if isinstance(module, Recomputed) else type(module)


def recompute_module(module: nn.Module) -> None:
    """Recompute ``module``'s activations in backward from now on, in place; names stay the same.

    Example:
        >>> recompute_module(model.blocks[0])
        >>> type(model.blocks[0]).__name__
        'RecomputedBlock'
    """
    _recompute_as(module, {})


def _recompute_as(module: nn.Module, classes: dict[type[nn.Module], type[nn.Module]]) -> None:
    """Recompute `module`, reusing the subclass made for its class in `classes` (a compiled block's
    code guards on its module's type: layers of one class must share one Recomputed class)."""
    if isinstance(module, Recomputed):
        raise ValueError(f"recompute already applied to this {type(module).__name__}; apply it once")
    base = type(module)
    if base not in classes:
        classes[base] = _recomputed_class(base)
    module.__class__ = classes[base]


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer layers and its name, e.g. ``("blocks", model.blocks)``.

    A family of plait's architecture registry names its list. Otherwise the candidates are
    the ``nn.ModuleList``s with parameters whose children are all of one class; a known
    name (``blocks``, ``model.layers``, ``transformer.h``, ``encoder.layer``, ...) wins,
    then the most parameters.
    """
    known = find_architecture(model)
    if known is not None:
        return known.layers, model.get_submodule(known.layers)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and _is_layer_list(module)
    ]
    if not candidates:
        raise ValueError(
            f"found no list of transformer layers in {type(model).__name__}: no nn.ModuleList with "
            f"parameters holds children of one class (known names: {', '.join(LAYER_LIST_NAMES)}); "
            "pass recompute_modules=[...] explicitly (apply_recompute(..., mode='selective', "
            "modules=[...]) with patterns of submodule names of the model)"
        )
    return max(candidates, key=lambda item: (_is_known_name(item[0]), _num_parameters(item[1])))


def _is_layer_list(modules: nn.ModuleList) -> bool:
    classes = {_base_class(child) for child in modules}
    return len(classes) == 1 and _num_parameters(modules) > 0


def _is_known_name(name: str) -> bool:
    return any(name == known or name.endswith("." + known) for known in LAYER_LIST_NAMES)


def _num_parameters(module: nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())


def apply_recompute(
    model: nn.Module, *, mode: str, ratio: float = 1.0, modules: Sequence[str] | None = None
) -> list[str]:
    """Recompute activations of ``model``'s layers in backward; returns the names recomputed.

    ``mode="full"`` recomputes every layer of :func:`find_layer_list`. ``"selective"``
    recomputes the first ``ceil(ratio * num_layers)`` layers (Megatron's "block"
    method) or, with ``modules``, only the submodules of those layers whose names
    relative to the layer match one of the fnmatch patterns (``["attn"]``,
    ``["mlp.*_proj"]``). A model without a layer list takes ``modules`` relative to
    the model itself. ``"none"`` changes nothing.

    A Hugging Face model's ``config.use_cache`` is set to False: a KV cache written in
    forward would be written again by the replay.

    Example:
        >>> apply_recompute(plait.models.build("tiny", num_layers=4), mode="selective", ratio=0.5)
        ['blocks.0', 'blocks.1']
    """
    _check_arguments(mode, ratio, modules)
    if mode == "none":
        return []
    _check_not_applied(model)
    layers = _selected_layers(model, ratio=ratio, by_module=modules is not None)
    targets = layers if modules is None else _match_submodules(layers, modules)
    classes: dict[type[nn.Module], type[nn.Module]] = {}
    for _, module in targets:
        _recompute_as(module, classes)
    _disable_hf_kv_cache(model)
    return [name for name, _ in targets]


def _check_arguments(mode: str, ratio: float, modules: Sequence[str] | None) -> None:
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode {mode!r} is unknown; choose one of {', '.join(RECOMPUTE_MODES)}")
    if mode != "selective" and (ratio != 1.0 or modules is not None):
        raise ValueError(
            f"recompute mode {mode!r} takes no ratio or modules (got ratio={ratio!r}, modules={modules!r}); "
            "use mode='selective' to recompute part of the model"
        )
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"recompute ratio={ratio!r} must be in (0, 1]: the fraction of layers to recompute")
    if isinstance(modules, str) or (modules is not None and not modules):
        raise ValueError(f"recompute modules={modules!r} must be a non-empty list of patterns, e.g. ['attn']")


def _check_not_applied(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, Recomputed):
            raise ValueError(f"recompute already applied to {name or 'the model'}; apply it once per model")
        if getattr(module, "gradient_checkpointing", False) is True:
            raise ValueError(
                f"{name or 'the model'} already uses Hugging Face's gradient checkpointing; call "
                "model.gradient_checkpointing_disable() first, or leave plan.recompute='none'"
            )


def _selected_layers(model: nn.Module, *, ratio: float, by_module: bool) -> list[tuple[str, nn.Module]]:
    try:
        list_name, layers = find_layer_list(model)
    except ValueError:
        if not by_module or ratio != 1.0:
            raise
        return [("", model)]
    num_selected = math.ceil(ratio * len(layers))
    prefix = f"{list_name}." if list_name else ""
    return [(f"{prefix}{index}", layer) for index, layer in enumerate(layers) if index < num_selected]


def _match_submodules(layers: list[tuple[str, nn.Module]], patterns: Sequence[str]) -> list[tuple[str, nn.Module]]:
    matched: dict[str, nn.Module] = {}
    unused = set(patterns)
    for layer_name, layer in layers:
        for name, module in layer.named_modules():
            hits = {pattern for pattern in patterns if name and fnmatchcase(name, pattern)}
            unused -= hits
            if hits:
                matched[f"{layer_name}.{name}" if layer_name else name] = module
    if unused:
        names = [name for name, _ in layers[0][1].named_modules() if name]
        raise ValueError(
            f"recompute module pattern(s) {sorted(unused)} match no submodule of the layers; "
            f"a layer holds: {', '.join(names)}"
        )
    return _outermost(matched)


def _outermost(matched: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """Drop matches inside other matches: recomputing a module already recomputes its children."""
    return [
        (name, module)
        for name, module in matched.items()
        if not any(name.startswith(other + ".") for other in matched if other != name)
    ]


def _disable_hf_kv_cache(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False) is True:
        config.use_cache = False
