"""The model a recipe fine-tunes: a `plait train` checkpoint or a local Hugging Face directory.

Both go through plait's own loaders (`plait.train.generate.load_for_inference` for checkpoints,
`plait.checkpoint.hf_pretrained` for transformers directories); this module only gives recipes one
tokenizer interface over the two, with the chat template where the tokenizer has one.

Example:
    >>> model, tokenizer = load_base("runs/gpt-10m-eval/checkpoints/step-000300")  # doctest: +SKIP
    >>> ids = tokenizer.encode("def add(a, b):")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from plait.checkpoint.io import CONFIG_FILE, read_trainer_state
from plait.checkpoint.lengths import checkpoint_window, lineage
from plait.eval.sources import check_paths, eot_id, is_hf_dir


@dataclass(frozen=True)
class BaseTokenizer:
    """The base model's tokenizer: `tokenizers` encoding plus, for a transformers directory, its chat template.

    ``hf`` is the transformers tokenizer (None for a plait checkpoint, whose tokenizer has no chat template).
    """

    backend: Tokenizer = field(repr=False)
    eot_id: int
    hf: Any = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self.hf is not None and bool(getattr(self.hf, "chat_template", None))

    def to_json(self) -> str:
        return self.backend.to_str()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens (templates put those in as text)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The tokenizer's chat template applied to `messages` ({"role", "content"} dicts), as text."""
        if not self.has_chat_template:
            raise ValueError(
                'the base model\'s tokenizer has no chat template; set data.template = "plain" (the '
                "### Instruction/### Response template) or fine-tune a model whose tokenizer_config.json has one"
            )
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def load_base(path: str | Path) -> tuple[nn.Module, BaseTokenizer]:
    """The model (fp32, train mode, on CPU) and tokenizer at `path`: a plait checkpoint or an HF directory."""
    path = Path(path)
    check_paths([str(path)])
    if is_hf_dir(path):
        return _load_hf(path)
    from plait.train.generate import load_for_inference

    model, tokenizer = load_for_inference(path)
    return model.float().train(), BaseTokenizer(backend=tokenizer, eot_id=eot_id(tokenizer))


def _load_hf(path: Path) -> tuple[nn.Module, BaseTokenizer]:
    from plait.checkpoint.hf_pretrained import inspect_pretrained, load_pretrained_model

    pretrained = inspect_pretrained(path)
    model = load_pretrained_model(pretrained, tp_group=None, device=torch.device("cpu"))
    return model, _hf_tokenizer(path, pretrained.tokenizer.json, eot=pretrained.tokenizer.eot_id)


def _hf_tokenizer(path: Path, backend_json: str, *, eot: int) -> BaseTokenizer:
    from transformers import AutoTokenizer

    return BaseTokenizer(backend=Tokenizer.from_str(backend_json), eot_id=eot, hf=AutoTokenizer.from_pretrained(path))


def load_tokenizer(path: str | Path) -> BaseTokenizer:
    """The base's tokenizer alone (no weights read), for checks before launch."""
    path = Path(path)
    check_paths([str(path)])
    if is_hf_dir(path):
        from plait.checkpoint.hf_pretrained import inspect_pretrained

        pretrained = inspect_pretrained(path)
        return _hf_tokenizer(path, pretrained.tokenizer.json, eot=pretrained.tokenizer.eot_id)
    saved = read_trainer_state(path).get("tokenizer")
    if not saved:
        raise ValueError(f"{path} holds no tokenizer; fine-tune a checkpoint `plait train` wrote, or an HF directory")
    tokenizer = Tokenizer.from_str(saved)
    return BaseTokenizer(backend=tokenizer, eot_id=eot_id(tokenizer))


def base_window(path: str | Path) -> int | None:
    """The longest sequence to show the base (prompt and new tokens): the length a plait checkpoint was
    trained at, never past its context (`plait.checkpoint.lengths`); a Hugging Face directory's context
    (None where its config states none). Configs only, no weights read."""
    path = Path(path)
    if not is_hf_dir(path):
        return checkpoint_window(path)
    from plait.checkpoint.hf_pretrained import inspect_pretrained

    return inspect_pretrained(path).max_positions


def checkpoint_record(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, trainer-state entries) a checkpoint fine-tuned from `path` keeps, so that `plait eval`,
    `plait generate` and `plait export` read it as they read the base: the base's config.json and tokenizer,
    its transformers record (an HF model), its data record (so `plait eval` scores the same held-out split) and
    its trained length (`plait.checkpoint.lengths.lineage`: a fine-tune of a fine-tune keeps the longest)."""
    path = Path(path)
    if is_hf_dir(path):
        from plait.checkpoint.hf_pretrained import inspect_pretrained
        from plait.config import Config, ModelConfig
        from plait.train.setup import Validated, checkpoint_extra

        pretrained = inspect_pretrained(path)
        extra = checkpoint_extra(Validated(plan=Config().plan, model_config=None, pretrained=pretrained))
        config = Config(model=ModelConfig(pretrained=str(path))).to_dict()
        return config, {**extra, "tokenizer": pretrained.tokenizer.json, **lineage(config, {})}
    state = read_trainer_state(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    kept = {key: state[key] for key in ("tokenizer", "hf", "loader") if key in state}
    return config, {**kept, **lineage(config, state)}
