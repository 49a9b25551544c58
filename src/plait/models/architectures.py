"""The registry of architectures: what plait knows about each model family, in one place.

Every strand reads it: pipeline parallel (where the layers, embeddings, final norm and
head live, what a stage computes before its first layer), tensor parallel (styles for
the modules a config's ``base_model_tp_plan`` does not cover), activation recomputation
(the layer list) and checkpoints (the names of the parts). An entry is a small table of
dotted module paths; stages call the model's own modules and transformers' own mask
builders, never a copy of a model's forward.

Adding a Hugging Face family is one entry here plus a line in the parity test's list of
tiny configs. An unknown family gets an error naming the entry to add.

Example:
    >>> arch = architecture_of(transformers.Qwen2ForCausalLM(config))
    >>> arch.layers, arch.embed, arch.norm
    ('model.layers', 'model.embed_tokens', 'model.norm')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from plait.models.architecture_spec import Architecture
from plait.models.architecture_table import ARCHITECTURES, UNSPLITTABLE

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "architecture_of",
    "find_architecture",
    "model_type_of",
    "present_paths",
    "suggested_entry",
    "unsplittable_reason",
]


def unsplittable_reason(model: nn.Module, *, purpose: str) -> str | None:
    """The refusal for a family that `purpose` (pipeline or tensor parallelism) cannot split, or None."""
    model_type = model_type_of(model)
    reason = UNSPLITTABLE.get(model_type or "")
    return (
        f"{purpose} is not available for {type(model).__name__} (model_type {model_type!r}): {reason}"
        if reason
        else None
    )


def _is_plait_gpt(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("embed", "blocks", "norm_f", "lm_head"))


def model_type_of(model: nn.Module) -> str | None:
    """``"plait"`` for plait's GPT, the config's ``model_type`` for a Hugging Face model, else None."""
    if _is_plait_gpt(model):
        return "plait"
    return getattr(getattr(model, "config", None), "model_type", None)


def _base_prefix(model: nn.Module) -> str | None:
    """Path of the base model inside a Hugging Face task model ("model", "transformer"), "" when
    ``model`` is the base model itself, None for plait's GPT."""
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ("" if prefix else None)


def _resolved(entry: Architecture, prefix: str) -> Architecture:
    """``entry`` with its base-model paths prefixed; the head is the task model's own (none on a bare base model)."""

    def full(path: str) -> str:
        return f"{prefix}.{path}" if prefix else path

    def full_all(paths: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(full(path) for path in paths)

    return dataclasses.replace(
        entry,
        layers=full(entry.layers),
        embed=full(entry.embed),
        norm=full(entry.norm) if entry.norm else None,
        head=entry.head if prefix else None,
        positions=full(entry.positions) if entry.positions else None,
        before_positions=full_all(entry.before_positions),
        after_embed=full_all(entry.after_embed),
        after_norm=full_all(entry.after_norm),
        rotary=full(entry.rotary) if entry.rotary else None,
    )


def find_architecture(model: nn.Module) -> Architecture | None:
    """The registry entry for ``model`` with paths from its root, or None when unknown or laid out otherwise."""
    entry = ARCHITECTURES.get(model_type_of(model) or "")
    if entry is None:
        return None
    prefix = _base_prefix(model)
    resolved = entry if prefix is None else _resolved(entry, prefix)
    names = {name for name, _ in model.named_modules()}
    needed = [resolved.layers, resolved.embed, *([resolved.head] if resolved.head else [])]
    return resolved if all(path in names for path in needed) else None


def architecture_of(model: nn.Module, *, purpose: str = "this") -> Architecture:
    """The registry entry for ``model``, paths from its root; ValueError naming the missing entry.

    ``purpose`` names what asked (``"pipeline parallelism"``), for the message.
    """
    entry = find_architecture(model)
    if entry is not None:
        return entry
    refusal = unsplittable_reason(model, purpose=purpose)
    if refusal:
        raise ValueError(refusal)
    model_type = model_type_of(model)
    if model_type in ARCHITECTURES:
        known = ARCHITECTURES[model_type]
        raise ValueError(
            f"{purpose} needs {type(model).__name__} laid out as the {model_type!r} entry of plait's architecture "
            f"registry says (layers at {known.layers!r}, embeddings at {known.embed!r} inside the base model, "
            f"head {known.head!r}), but the model has no such modules; use the base model or the class with "
            "that head, or add a registry entry for this layout"
        )
    raise ValueError(
        f"{purpose} does not know {type(model).__name__} (model_type={model_type!r}): plait's architecture "
        f"registry has no entry {model_type!r} (it knows {', '.join(sorted(ARCHITECTURES))}). Add "
        f"{suggested_entry(model)} to plait.models.architectures (check it against the model's forward: "
        "extra work there, such as scaling logits, needs its field), or train without this strand"
    )


def suggested_entry(model: nn.Module) -> str:
    """An ``Architecture(...)`` to start from: read off the config's ``base_model_pp_plan`` where
    transformers declares one (embeddings, then the layer list, then the final norm), else a template."""
    model_type = model_type_of(model)
    pp_plan = getattr(getattr(model, "config", None), "base_model_pp_plan", None) or {}
    names = list(pp_plan)
    base = model.base_model if isinstance(getattr(model, "base_model", None), nn.Module) else model
    layer_lists = [name for name in names if isinstance(getattr(base, name, None), nn.ModuleList)]
    if not layer_lists:
        return f"Architecture({model_type!r}, layers=..., embed=..., norm=..., ...)"
    at = names.index(layer_lists[0])
    fields = [f"layers={names[at]!r}", f"embed={names[0]!r}"]
    fields += [f"after_embed={tuple(names[1:at])!r}"] if at > 1 else []
    fields.append(f"norm={names[at + 1]!r}" if at + 1 < len(names) else "norm=None")
    fields += ["rotary='rotary_emb'"] if isinstance(getattr(base, "rotary_emb", None), nn.Module) else []
    return f"Architecture({model_type!r}, {', '.join(fields)})"


def present_paths(model: nn.Module, paths: Sequence[str]) -> list[str]:
    """The ``paths`` that name a module of ``model``: a config may leave optional parts out (OPT's
    ``project_in`` is None when the widths agree)."""
    names = {name for name, _ in model.named_modules()}
    return [path for path in paths if path in names]
