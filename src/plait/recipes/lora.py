"""LoRA adapters on plait's models (and Hugging Face models) through peft, trainable under any plan.

`add_lora` injects peft's LoRA layers into the model instance (`peft.inject_adapter_in_model`): each
targeted Linear becomes peft's `lora.Linear` holding the frozen `base_layer` and the trainable
`lora_A`/`lora_B`. `plait.boost` then applies the plan as usual: ZeRO gives only the adapters
optimizer state, gradient buckets and gradient communication (frozen parameters stay whole and
replicated on every rank, under ZeRO-3 too), and tensor parallel splits the factors with their
base (plait.tensor.lora). A checkpoint keeps the factors beside the base weights; `plait export`
merges them (plait.checkpoint.lora_merge), and `save_adapter` writes them in peft's own format.

Example:
    >>> model = add_lora(plait.models.build("tiny"), LoraSettings(rank=4))  # doctest: +SKIP
    >>> trainable_fraction(model)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from plait.recipes.quantize import QUANTIZE_KINDS, base_linears, quantize_linears, quantized_numel

# plait's GPT: attention and MLP projections (Llama-style models add gate_proj; HF Llama uses the same names).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_NAME = "default"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraSettings:
    """The `[lora]` section of a fine-tuning config.

    ``target_modules`` are module names or name suffixes, as peft reads them ("q_proj" matches
    "blocks.0.attn.q_proj"); each must match at least one linear layer. Unset, they are those of
    the attention and MLP projections (``DEFAULT_TARGETS``) that the model has. ``quantize="int8"`` holds
    every frozen linear layer but the output head as int8 with one fp32 scale per output row
    (QLoRA-style; plait.recipes.quantize).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank={self.rank!r}: the adapter rank must be a positive integer, e.g. 8")
        if not self.alpha > 0:
            raise ValueError(
                f"lora.alpha={self.alpha!r}: the scale numerator must be positive (scaling = alpha / rank)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout!r}: choose a probability in [0, 1)")
        targets = self.target_modules
        if targets is not None and (not targets or not all(isinstance(t, str) and t for t in targets)):
            raise ValueError(
                f"lora.target_modules={list(targets)!r}: list module names, e.g. {list(DEFAULT_TARGETS[:2])}"
            )
        if self.quantize not in (None, *QUANTIZE_KINDS):
            raise ValueError(f"lora.quantize={self.quantize!r}: choose one of {list(QUANTIZE_KINDS)} or leave it unset")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def peft_config(self, targets: tuple[str, ...] | None = None) -> Any:
        """peft's LoraConfig for these settings, on `targets` (default: the settings' own)."""
        from peft import LoraConfig

        targets = targets or tuple(self.target_modules or DEFAULT_TARGETS)
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(targets))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")  # peft's rule for a list of target names


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2 linear layer


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def resolve_targets(model: nn.Module, settings: LoraSettings) -> tuple[str, ...]:
    """The settings' target names, or (unset) the default projections `model` has."""
    if settings.target_modules is not None:
        return tuple(settings.target_modules)
    linears = _linear_names(model)
    present = tuple(t for t in DEFAULT_TARGETS if any(_matches(name, t) for name in linears))
    return present or DEFAULT_TARGETS  # none present: check_targets names what the model has


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if name and _is_linear(module)]


def check_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The names of the linear layers `targets` pick; ValueError naming any target that matches none."""
    linears = _linear_names(model)
    missing = [t for t in targets if not any(_matches(name, t) for name in linears)]
    if missing:
        shown = ", ".join(linears[:6]) + (", ..." if len(linears) > 6 else "")
        raise ValueError(
            f"lora.target_modules {missing} match no linear layer of {type(model).__name__}; "
            f"its linear layers include: {shown or 'none'}"
        )
    return [name for name in linears if any(_matches(name, t) for t in targets)]


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA adapters into `model` in place (every other parameter frozen); returns the model."""
    from peft import inject_adapter_in_model

    targets = resolve_targets(model, settings)
    check_targets(model, targets)
    if settings.quantize is not None:
        quantize_linears(model, base_linears(model), kind=settings.quantize)
    return inject_adapter_in_model(settings.peft_config(targets), model, adapter_name=ADAPTER_NAME)


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts of `model`: tied parameters once, int8-held base weights included."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized_numel(model)


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole model state's LoRA factors under peft's saved names (``base_model.model.<module>.lora_A.weight``)."""
    marker = f".{ADAPTER_NAME}.weight"
    return {
        f"base_model.model.{name.removesuffix(marker)}.weight": tensor.detach().contiguous()
        for name, tensor in state.items()
        if name.endswith(marker) and (".lora_A." in name or ".lora_B." in name)
    }


def save_adapter(state: dict[str, torch.Tensor], settings: LoraSettings, out_dir: str | Path) -> Path:
    """Write the adapters alone in peft's format (``adapter_config.json``, ``adapter_model.safetensors``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state(state)
    if not tensors:
        raise ValueError("the state holds no LoRA factors (no '.lora_A.default.weight' entries); train with [lora]")
    settings.peft_config().save_pretrained(str(out_dir))
    safetensors.torch.save_file(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return out_dir


def lora_record(settings: LoraSettings, model: nn.Module) -> dict[str, Any]:
    """What a checkpoint's trainer state keeps (``extra={"lora": ...}``) so export can merge the adapters of
    `model`: the scaling, and the layers whose base keeps GPT-2's Conv1D layout (weight (in, out))."""
    conv1d = [name for name, m in model.named_modules() if name.endswith("base_layer") and _is_conv1d(m)]
    extra = {
        "scaling": settings.scaling,
        "adapter": ADAPTER_NAME,
        "conv1d": [n.removesuffix(".base_layer") for n in conv1d],
    }
    return {"lora": settings.to_dict() | extra}


def read_settings(record: dict[str, Any]) -> LoraSettings:
    fields = {f.name for f in dataclasses.fields(LoraSettings)}
    return LoraSettings(**{key: value for key, value in record.items() if key in fields})


def save_adapter_of_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a LoRA run's checkpoint's adapters alone, in peft's format (its trainer state's record)."""
    from plait.checkpoint.io import load_checkpoint

    model_state, trainer_state, _ = load_checkpoint(Path(checkpoint_dir))
    if "lora" not in trainer_state:
        raise ValueError(f"{checkpoint_dir} is not a checkpoint of a LoRA run (no 'lora' record); train with [lora]")
    return save_adapter(model_state, read_settings(trainer_state["lora"]), out_dir)


def _is_rank_zero() -> bool:
    import os

    import torch.distributed as dist

    return dist.get_rank() == 0 if dist.is_initialized() else int(os.environ.get("RANK", "0")) == 0


def base_skeleton(path: str | Path) -> nn.Module:
    """The base model's modules on the meta device (names and shapes; no weights read): a Hugging Face
    directory through plait's inspect_pretrained, a plait checkpoint from its config.json."""
    import json

    from plait.checkpoint.hf_pretrained import inspect_pretrained
    from plait.checkpoint.io import CONFIG_FILE
    from plait.config import config_from_dict
    from plait.eval.sources import is_hf_dir
    from plait.models import build
    from plait.train.setup import model_config_for

    path = Path(path)
    if is_hf_dir(path):
        return inspect_pretrained(path).meta_model
    raw = json.loads((path / CONFIG_FILE).read_text())
    with torch.device("meta"):
        return build(model_config_for(config_from_dict(raw)))


def preflight(config: Any) -> None:
    """The [lora] checks that need no process group: target modules against the base's module names, and an
    int8 base or adapter dropout only without tp (one line each, before launch)."""
    settings = config.section("lora")
    if settings.quantize is not None and config.plan.tp > 1:
        raise ValueError(
            f"lora.quantize={settings.quantize!r} with plan.tp={config.plan.tp}: an int8 base cannot be split over "
            "tp; set plan.tp=1 (dp and ZeRO work) or leave lora.quantize unset"
        )
    if settings.dropout > 0 and config.plan.tp > 1:
        raise ValueError(
            f"lora.dropout={settings.dropout} with plan.tp={config.plan.tp}: tp ranks would drop different inputs "
            "of the replicated adapter factor; set lora.dropout=0"
        )
    skeleton = base_skeleton(config.base.path)
    check_targets(skeleton, resolve_targets(skeleton, settings))


def prepare(config: Any, *, sft_data: Any = None) -> tuple[nn.Module, Any, Any]:
    """The LoRA recipe's (model with adapters, RecipeData, CheckpointRecord) for a FinetuneConfig; `sft_data`
    (plait.recipes.sft.SFTData) reuses rows already built for the same base and data section."""
    from plait.recipes.base import checkpoint_record, load_base
    from plait.recipes.loop import CheckpointRecord
    from plait.recipes.sft import SFTData

    settings = config.section("lora")
    model, tokenizer = load_base(config.base.path)
    if sft_data is None:
        sft_data = SFTData.build(config.data, tokenizer, model=model, seed=config.train.seed)
    model = add_lora(model, settings)
    config_dict, extra = checkpoint_record(config.base.path)
    record = CheckpointRecord(config=config_dict, extra={**extra, **lora_record(settings, model)})
    return model, sft_data.recipe_data(global_batch=config.train.global_batch), record


def run(config: Any) -> Any:
    """`plait finetune` with recipe.kind = "lora": SFT (plait.recipes.sft's data and loss) of the base with
    LoRA adapters per the [lora] table; the last checkpoint's adapters also go to <out_dir>/adapter."""
    from plait.checkpoint.io import checkpoint_name
    from plait.losses import causal_lm
    from plait.recipes.loop import train_recipe

    model, data, record = prepare(config)
    summary = train_recipe(config, model, loss_fn=causal_lm, data=data, record=record)
    if _is_rank_zero():
        last = Path(summary.out_dir) / "checkpoints" / checkpoint_name(summary.steps)
        save_adapter_of_checkpoint(last, Path(summary.out_dir) / "adapter")
    return summary
