"""The `plait` command line: one subcommand a verb, usage errors on one line."""

from __future__ import annotations

import argparse
import sys
import typing

from plait.distributed.nodes import add_node_args


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (the usage itself is one --help away)."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"{self.prog}: error: {message}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(2)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="a TOML config, e.g. configs/gpt-tiny.toml (defaults if omitted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--nproc", type=int, default=None, help="ranks to launch on this machine (through torchrun)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="plait", description="Train large models on PyTorch with one plan.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model from a config")
    _add_config_args(train)
    add_node_args(train)
    train.add_argument(
        "--resume",
        default=None,
        metavar="auto|CHECKPOINT",
        help="continue a run: auto (the newest checkpoint under train.out_dir that verifies, or a fresh start "
        "when there is none) or a checkpoint directory",
    )
    train.add_argument(
        "--plan", default=None, metavar="auto|PLAN",
        help='auto: train with the planner\'s best plan; or a plan string in Plan\'s field names, e.g. '
        '"dp=2 tp=2 pp=1 zero=1 microbatches=4 recompute=none" (replaces the config\'s [plan])',
    )  # fmt: skip
    train.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="restart every rank up to N times when one fails (torchrun's elastic agent); each restart resumes "
        "from the newest complete checkpoint",
    )
    verify = commands.add_parser("verify", help="check a plan's losses against one plain process")
    _add_config_args(verify)
    verify.add_argument(
        "--out-dir",
        default=None,
        help="where the plan's run keeps its log, metrics.csv and last checkpoint (default: train.out_dir-verify)",
    )
    generate = commands.add_parser("generate", help="sample text from a checkpoint")
    generate.add_argument("checkpoint")
    generate.add_argument("--prompt", default="def ")
    generate.add_argument("--max-new-tokens", type=int, default=100)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, default=50)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens the model sees, prompt and new (default: the sequence length the checkpoint was trained at; "
        "at most its context)",
    )
    export = commands.add_parser("export", help="write a checkpoint as a Hugging Face model directory")
    export.add_argument("checkpoint")
    export.add_argument("--to", required=True, choices=["hf"], help="hf: config.json + model.safetensors")
    export.add_argument("out")
    export.add_argument(
        "--config",
        default=None,
        metavar="HF_CONFIG",
        help="a Hugging Face model's config (its directory or config.json) for a checkpoint saved without one",
    )
    import_ = commands.add_parser("import", help="turn a Hugging Face Llama or GPT-2 directory into a checkpoint")
    import_.add_argument("hf_dir")
    import_.add_argument("out")
    debug = commands.add_parser("debug", help="look inside a running job")
    debug.add_argument("what", choices=["stacks"], help="stacks: every rank's stack, and which collective it is in")
    debug.add_argument("out_dir", help="the job's train.out_dir (it keeps job.json there while it runs)")
    commands.add_parser("run", help="torchrun with its flags passed through", add_help=False)
    from plait.bench.cli import add_bench_parser
    from plait.data.prepare.cli import add_data_parser
    from plait.eval.cli import add_eval_parser
    from plait.planner.cli import add_plan_parser
    from plait.recipes.cli import add_finetune_parser

    add_plan_parser(commands)
    add_data_parser(commands)
    add_eval_parser(commands)
    add_finetune_parser(commands)
    add_bench_parser(commands)
    return parser
