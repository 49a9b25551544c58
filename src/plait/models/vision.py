"""Vision transformers from transformers' own classes (plait does not re-implement them): ViT and Swin
image classifiers with named sizes. Dropout and stochastic depth are off unless overridden, so runs
are reproducible and plans can be checked against one process.

    model = build_vision("vit-tiny", image_size=32, num_channels=1, num_labels=10)
    logits = model(pixel_values=images).logits  # (batch, num_labels)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

# name -> (family, config fields); image size, channels and classes come from the data.
_VIT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "qkv_bias": True}
_SWIN = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0}
VISION_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # tests: 2 heads and an even MLP width (tp=2), 4 layers (pp=2)
    "vit-tiny": ("vit", {**_VIT, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
                         "intermediate_size": 64, "patch_size": 8}),
    # the digits recipe: 64 patches of 4x4 on a 32x32 image, ~0.8M parameters
    "vit-small": ("vit", {**_VIT, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                          "intermediate_size": 256, "patch_size": 4}),
    # ViT-B/16 (86M at 224x224)
    "vit-100m": ("vit", {**_VIT, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                         "intermediate_size": 3072, "patch_size": 16}),
    "swin-tiny": ("swin", {**_SWIN, "embed_dim": 16, "depths": [2, 2], "num_heads": [2, 4], "window_size": 4,
                           "patch_size": 4}),
    # Swin-B (88M at 224x224)
    "swin-100m": ("swin", {**_SWIN, "embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32],
                           "window_size": 7, "patch_size": 4}),
}  # fmt: skip


def vision_preset_names() -> list[str]:
    return sorted(VISION_PRESETS)


def is_vision_preset(name: str) -> bool:
    return name in VISION_PRESETS


def vision_config(name: str, *, image_size: int, num_channels: int, num_labels: int, **overrides: Any) -> Any:
    """The transformers config of preset `name` for images of `image_size` x `image_size` pixels."""
    if name not in VISION_PRESETS:
        raise ValueError(f"unknown vision preset {name!r}; choose one of {', '.join(vision_preset_names())}")
    family, fields = VISION_PRESETS[name]
    config_class = _classes()[family][0]
    fields = {**fields, "image_size": image_size, "num_channels": num_channels, "num_labels": num_labels}
    unknown = sorted(key for key in overrides if not hasattr(config_class(), key))
    if unknown:
        raise ValueError(
            f"model.{', model.'.join(unknown)} {'is not a field' if len(unknown) == 1 else 'are not fields'} of "
            f"{config_class.__name__}; drop the override(s) or use the config's names (e.g. hidden_size)"
        )
    return config_class(**{**fields, **overrides})


def build_vision(name: str, *, image_size: int, num_channels: int, num_labels: int, **overrides: Any) -> nn.Module:
    """A freshly initialised ViTForImageClassification / SwinForImageClassification of preset `name`."""
    config = vision_config(name, image_size=image_size, num_channels=num_channels, num_labels=num_labels, **overrides)
    model_class = _classes()[VISION_PRESETS[name][0]][1]
    return model_class(config)


def _classes() -> dict[str, tuple[Callable[..., Any], Callable[..., nn.Module]]]:
    import transformers  # here: plait's own models do not need transformers

    return {
        "vit": (transformers.ViTConfig, transformers.ViTForImageClassification),
        "swin": (transformers.SwinConfig, transformers.SwinForImageClassification),
    }
