"""The `plait` command: train, run, verify, generate, export, import, plan."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from plait.cli.checkpoints import cmd_export, cmd_generate, cmd_import
from plait.cli.delegated import cmd_bench, cmd_data, cmd_debug, cmd_eval, cmd_finetune, cmd_plan
from plait.cli.parser import build_parser
from plait.cli.train import cmd_train
from plait.cli.verify import cmd_verify

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = {
    "plan": cmd_plan,
    "train": cmd_train,
    "verify": cmd_verify,
    "generate": cmd_generate,
    "export": cmd_export,
    "import": cmd_import,
    "debug": cmd_debug,
    "data": cmd_data,
    "eval": cmd_eval,
    "bench": cmd_bench,
    "finetune": cmd_finetune,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        from plait.distributed.launch import torchrun

        return torchrun(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed on one line
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return COMMANDS[args.command](args, argv)
    except (ValueError, TypeError) as err:
        print(f"plait {args.command}: error: {err}", file=sys.stderr)
        return 2
