"""The `plait data` command: ``plait data prepare SRC... --out DIR``."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_data_parser(commands: Any) -> None:
    data = commands.add_parser("data", help="clean, deduplicate and tokenize a corpus for plait train")
    actions = data.add_subparsers(dest="action", required=True)
    prepare = actions.add_parser(
        "prepare",
        help="clean, deduplicate and tokenize SRC into DIR (then train with data.corpus = DIR)",
        description="Normalise, filter, deduplicate (exact + MinHash LSH) and scrub the sources, train or reuse "
        "a tokenizer, and write the packed shards plait train reads, with a report (report.md/json, lengths.png).",
    )
    prepare.add_argument(
        "sources", nargs="+", metavar="SRC", help="directories of text files, .jsonl/.parquet, or stdlib"
    )
    prepare.add_argument("--out", required=True, metavar="DIR", help="where the shards, tokenizer and report go")
    prepare.add_argument(
        "--config", default=None, metavar="RULES_TOML", help="filter, dedup, scrub and tokenizer rules"
    )
    prepare.add_argument("--field", default="text", help="the text field of .jsonl records / .parquet column")
    tokenizer = prepare.add_mutually_exclusive_group()
    tokenizer.add_argument(
        "--tokenizer", default=None, metavar="DIR", help="reuse this tokenizer.json (or its directory)"
    )
    tokenizer.add_argument("--vocab-size", type=int, default=None, help="train a tokenizer of N tokens (default 8192)")
    prepare.add_argument("--workers", type=int, default=None, help="processes cleaning files in parallel (default 2)")


def cmd_data(args: argparse.Namespace, argv: Any) -> int:
    try:
        import datasketch  # noqa: F401
    except ImportError:
        raise ValueError("plait data prepare needs datasketch (MinHash LSH): pip install 'plait[data]'") from None
    from plait.data.prepare.pipeline import prepare_corpus
    from plait.data.prepare.report import REPORT_MD
    from plait.data.prepare.rules import load_rules

    config = load_rules(args.config, workers=args.workers)
    if args.vocab_size is not None:
        import dataclasses

        config = dataclasses.replace(
            config, tokenizer=dataclasses.replace(config.tokenizer, vocab_size=args.vocab_size)
        )
    report = prepare_corpus(
        args.sources,
        args.out,
        config=config,
        field=args.field,
        tokenizer=args.tokenizer,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    out = report["output"]
    print(
        f"wrote {args.out}: {out['documents']:,} documents, {out['train_tokens']:,} train + {out['val_tokens']:,} "
        f"val tokens; see {args.out}/{REPORT_MD}; train on it with --set data.corpus={args.out} "
        f"--set data.vocab_size={out['vocab_size']}"
    )
    return 0
