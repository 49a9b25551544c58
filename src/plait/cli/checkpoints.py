"""`plait generate`, `plait export` and `plait import`: work on one checkpoint."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def cmd_generate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.train.generate import check_sampling, generate_text

    check_sampling(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, max_length=args.max_length
    )
    path = Path(args.checkpoint)
    if not path.is_dir():
        raise ValueError(f"{path} is not a checkpoint directory; use one under <out_dir>/checkpoints")
    text = generate_text(
        path,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        max_length=args.max_length,
    )
    print(text)
    return 0


def cmd_export(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import json

    from plait.checkpoint.hf_export import HF_CONFIG_FILE, export_hf

    export_hf(args.checkpoint, args.out, hf_config=args.config)
    architectures = json.loads((Path(args.out) / HF_CONFIG_FILE).read_text()).get("architectures") or ["?"]
    print(f"wrote {args.out} ({architectures[0]}); load it with transformers.AutoModelForCausalLM.from_pretrained")
    return 0


def cmd_import(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.checkpoint.hf_config import ARCHITECTURES
    from plait.checkpoint.hf_export import import_hf

    if not Path(args.hf_dir).is_dir():
        raise ValueError(f"{args.hf_dir} is not a directory; pass a Hugging Face model directory (save_pretrained)")
    family = import_hf(args.hf_dir, args.out)
    print(f"wrote plait checkpoint {args.out} from {ARCHITECTURES[family]} weights")
    return 0
