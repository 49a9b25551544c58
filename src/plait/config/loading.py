"""TOML files and `--set section.key=value` overrides as a checked Config."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from pathlib import Path
from typing import Any

from plait.config.data import DataConfig
from plait.config.model import ModelConfig
from plait.config.plan import Plan
from plait.config.run import Config
from plait.config.task import TaskConfig
from plait.config.train import TrainConfig
from plait.config.value_types import checked_value, matches

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "plan": Plan,
    "train": TrainConfig,
    "task": TaskConfig,
}


def _closest(word: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(text: str, kind: Any) -> Any:
    """Parse a --set value: TOML syntax first; bare words, and anything a string field gets, as strings."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if not matches(value, kind) and matches(text, kind):
        return text  # --set train.out_dir=2024 names a directory "2024"
    return value


_LIST_EXAMPLES = {"pp_split": [4], "recompute_modules": ["attn"]}  # their defaults, [], show no element type


def _example(cls: type, key: str) -> Any:
    spec = {f.name: f for f in dataclasses.fields(cls)}[key]
    if spec.default_factory is dataclasses.MISSING:
        return spec.default
    return _LIST_EXAMPLES.get(key, spec.default_factory())


def _table(name: str, values: Any) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ValueError(f"[{name}] must be a table of settings (got {values!r}); write [{name}] on its own line")
    return dict(values)


def build_section(name: str, values: dict[str, Any], *, sections: typing.Mapping[str, type] = SECTIONS) -> Any:
    """One TOML table as its dataclass, every key checked against the field's type (see plait.config.value_types)."""
    cls = sections[name]
    if cls is ModelConfig:
        return _model_section(values)
    types = _field_types(cls)
    for key in values:
        if key not in types:
            raise ValueError(f"unknown key {name}.{key}{_closest(key, types)}; valid keys: {', '.join(types)}")
    checked = {
        key: checked_value(f"{name}.{key}", value, types[key], example=_example(cls, key))
        for key, value in values.items()
    }
    return cls(**checked)


def _model_section(values: dict[str, Any]) -> ModelConfig:
    """[model]: `preset` and `pretrained` by name; every other key overrides a preset field."""
    for key in ("preset", "pretrained"):
        if key in values:
            kind = _field_types(ModelConfig)[key]
            checked_value(f"model.{key}", values[key], kind, example=_example(ModelConfig, key) or "models/qwen2-0.5b")
    pretrained = values.get("pretrained")
    if pretrained is not None and values.get("preset") not in (None, ModelConfig.preset):
        raise ValueError(
            f"model.preset={values['preset']!r} and model.pretrained={pretrained!r} both name a model; keep one"
        )
    preset = values.get("preset", ModelConfig.preset)
    overrides = {k: v for k, v in values.items() if k not in ("preset", "overrides", "pretrained")}
    overrides.update(values.get("overrides", {}))
    return ModelConfig(preset=preset, overrides=overrides, pretrained=pretrained)


def _section_of(key: str) -> str | None:
    return next((name for name, cls in SECTIONS.items() if key in _field_types(cls)), None)


def config_from_dict(raw: dict[str, Any]) -> Config:
    for name in raw:
        if name not in SECTIONS and _section_of(name) is not None:
            raise ValueError(f"{name} is outside any section; put it under [{_section_of(name)}]")
        if name not in SECTIONS:
            raise ValueError(f"unknown config section [{name}]{_closest(name, SECTIONS)}; valid: {', '.join(SECTIONS)}")
    return Config(**{name: build_section(name, raw.get(name, {})) for name in SECTIONS})


def apply_overrides(
    raw: dict[str, Any], overrides: typing.Sequence[str], *, sections: typing.Mapping[str, type] = SECTIONS
) -> dict[str, Any]:
    """Apply `section.key=value` strings to a raw config dict (a new dict); `sections` names the tables."""
    merged = {name: _table(name, raw.get(name, {})) for name in sections} | {
        k: v for k, v in raw.items() if k not in sections
    }
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--set {item!r}: write it as section.key=value, e.g. --set plan.dp=2")
        path, text = item.split("=", 1)
        section, key = path.split(".", 1)
        if section not in sections:
            raise ValueError(
                f"--set {item!r}: unknown section {section!r}{_closest(section, sections)}; valid: {', '.join(sections)}"
            )
        types = _field_types(sections[section])
        if sections[section] is not ModelConfig and key not in types:
            raise ValueError(
                f"--set {item!r}: unknown key {path}{_closest(key, types)}; valid keys: {', '.join(types)}"
            )
        merged[section][key] = _coerce(text, types.get(key, Any))
    return merged


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML config (or start from defaults) and apply --set overrides."""
    raw = read_toml(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides))


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML config file as a dict, or one ValueError line saying what is wrong with the file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {path} is a directory; pass a TOML file, such as configs/gpt-tiny.toml")
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist; pass a TOML file such as configs/gpt-tiny.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"config file {path} is not valid TOML: {err}; fix it (see configs/gpt-tiny.toml)") from None
    return raw
