"""The `plait` command: train, run, verify, generate, export, import, plan."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from plait.config import Config, load_config
from plait.distributed.agent import launch_cli, strip_flag, under_torchrun
from plait.distributed.nodes import Nodes, add_node_args, strip_node_flags

if typing.TYPE_CHECKING:
    from plait.train.setup import Validated

RANKS_PER_CORE = 4  # more ranks per core than this: a warning (tests oversubscribe on purpose)


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


def _ranks_wanted(config: Config, nproc: int | None) -> int:
    if nproc is not None:
        if nproc < 1:
            raise ValueError(f"--nproc {nproc}: launch at least one rank")
        return nproc
    plan = config.plan
    if plan.dp == -1:
        return plan.tp * plan.pp * plan.cp
    return plan.dp * plan.tp * plan.pp * plan.cp


def _launch(
    nproc: int, argv: Sequence[str], *, nodes: Nodes | None = None, max_restarts: int = 0, out_dir: str | None = None
) -> int:
    """plait.distributed.agent.launch_cli, named here so tests can stand in for the launch."""
    return launch_cli(nproc, argv, nodes=nodes, max_restarts=max_restarts, out_dir=out_dir)


def _with_auto_plan(args: argparse.Namespace, argv: Sequence[str]) -> list[str]:
    """Replace `--plan auto` by the planner's best plan, as --set overrides every rank reads."""
    from plait.planner.auto import auto_plan, plan_overrides

    if under_torchrun():
        raise ValueError(
            "--plan auto chooses the plan before launch; run it as `plait train ... --nproc N --plan auto`"
        )
    config = load_config(args.config, args.overrides)
    nproc = args.nproc or 1
    plan, result = auto_plan(config, world_size=nproc)
    from plait.planner.report import why_best

    print(why_best(result))
    args.overrides = [*args.overrides, *plan_overrides(plan)[1::2]]
    return [*strip_flag(argv, "--plan"), *plan_overrides(plan)]


def _with_plan_string(args: argparse.Namespace, argv: Sequence[str]) -> list[str]:
    """Replace `--plan "KEY=VALUE ..."` by --set overrides of every plan field, as `--plan auto` does."""
    from plait.planner.auto import plan_overrides
    from plait.planner.plan_string import parse_plan

    overrides = plan_overrides(parse_plan(args.plan))
    args.overrides = [*args.overrides, *overrides[1::2]]
    return [*strip_flag(argv, "--plan"), *overrides]


def _preflight(config: Config, *, validated: Validated, resume: str | None, first_node: bool = True) -> None:
    """What only the launcher checks, once, before any rank starts (the ranks would race on it)."""
    from plait.train import preflight
    from plait.train.resume import check_resumable

    out_dir = Path(config.train.out_dir)
    preflight.check_out_dir_writable(out_dir)
    if first_node:  # nodes sharing out_dir: node 1 starting after node 0 began writing must not refuse
        preflight.check_out_dir_unused(out_dir, resume=resume)
    checkpoint, _ = preflight.resolve_resume(resume, out_dir=out_dir)  # verified: manifest and checksums
    if checkpoint is not None:
        check_resumable(checkpoint, config=config)
    preflight.check_data(config, pretrained=validated.pretrained)


def _check_rank_resume(resume: str | None, config: Config) -> None:
    """Under torchrun every rank runs the command: the launcher verified the files already."""
    from plait.train.preflight import AUTO
    from plait.train.resume import check_resumable

    if resume is None or resume == AUTO:
        return
    if not Path(resume).is_dir():
        raise ValueError(f"--resume {resume}: no such checkpoint directory; pick one under <out_dir>/checkpoints")
    check_resumable(Path(resume), config=config)


def _check_elastic(config: Config, *, nodes: Nodes, nproc: int | None) -> None:
    """An elastic job's world changes between restarts: dp must follow it, and --nproc fixes the ranks per node."""
    spec = f"--nnodes {nodes.min_nodes}:{nodes.num_nodes}"
    if nproc is None:
        raise ValueError(f"{spec} is elastic: pass --nproc with the ranks each node runs")
    if config.plan.dp != -1:
        raise ValueError(
            f"{spec} is elastic, so the world size changes between restarts, but plan.dp={config.plan.dp} is fixed; "
            "set plan.dp=-1 (dp follows the world)"
        )


def _warn_oversubscribed(nproc: int) -> None:
    """Many ranks per core run (tests oversubscribe on purpose), but slowly: say so, once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if nproc > RANKS_PER_CORE * cores:
        print(
            f"plait: warning: --nproc {nproc} starts {nproc / cores:.0f} ranks per CPU core on {cores} cores; "
            f"above {RANKS_PER_CORE} per core they mostly wait for a core, so steps will be slow",
            file=sys.stderr,
        )


def cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.train.setup import validate

    if args.plan == "auto":
        argv = _with_auto_plan(args, argv)
    elif args.plan:
        argv = _with_plan_string(args, argv)
    config = load_config(args.config, args.overrides)
    nodes = Nodes.from_args(args)  # one node unless --nnodes
    if nodes.elastic and not under_torchrun():
        _check_elastic(config, nodes=nodes, nproc=args.nproc)
        for count in nodes.node_counts[:-1]:  # the world may shrink to any of these after a node is lost
            validate(config, world_size=args.nproc * count)
        if args.resume is None:  # a rank a restart or a joining node starts continues the run (checked below)
            argv = [*argv, "--resume", "auto"]
    nproc = nodes.world_size(_ranks_wanted(config, args.nproc), per_node=args.nproc is not None)
    # every input error surfaces here, before any rank starts
    validated = validate(config, world_size=nproc, ranks_per_node=nodes.ranks_per_node(nproc))
    if under_torchrun():
        _check_rank_resume(args.resume, config)
    else:
        _preflight(config, validated=validated, resume=args.resume, first_node=nodes.is_first)
        _warn_oversubscribed(nodes.ranks_per_node(nproc))
    if (nproc > 1 or nodes.num_nodes > 1) and not under_torchrun():
        if args.max_restarts < 0:
            raise ValueError(f"--max-restarts {args.max_restarts}: use 0 (no restart) or more")
        per_node, rank_argv = nodes.ranks_per_node(nproc), strip_node_flags(strip_flag(argv, "--nproc"))
        return _launch(per_node, rank_argv, nodes=nodes, max_restarts=args.max_restarts, out_dir=config.train.out_dir)
    from plait.train.loop import run_training

    try:
        summary = run_training(config, resume=args.resume)  # rank 0 logs the summary line
        if summary.stopped_by is not None:  # SIGINT/SIGTERM: saved and stopped (128 + N, as a shell reports it)
            return 128 + getattr(signal.Signals, summary.stopped_by, signal.SIGINT).value
    except (ValueError, OSError) as err:  # raised after start-up: a run-time fault, one line, exit 3
        print(f"plait train: error during the run: {err}", file=sys.stderr)
        return 3
    return 0


def cmd_verify(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.train.setup import validate
    from plait.train.verify import compare, verification_config

    config = load_config(args.config, args.overrides)
    nproc = _ranks_wanted(config, args.nproc)
    validated = validate(config, world_size=nproc)
    out_dir = args.out_dir or f"{config.train.out_dir.rstrip('/')}-verify"  # kept: the run's log explains a FAIL
    run_config = verification_config(config, out_dir)
    _check_verify_out_dir(Path(out_dir))
    _preflight(run_config, validated=validated, resume=None)
    train_argv = ["train", *([args.config] if args.config else []), *_sets_for(run_config)]
    code = _launch(nproc, train_argv)
    if code != 0:
        return code
    from plait.train.logs import read_metrics

    plan_losses = [row["loss"] for row in read_metrics(Path(out_dir) / "metrics.csv") if "loss" in row]
    groups = validated.plan.dp * validated.plan.microbatches  # MoE routes per rank and micro-batch
    comparison = compare(plan_losses, config, num_routing_groups=groups)
    print(comparison.table())
    print(f"the plan's run (log, metrics.csv, last checkpoint) is in {out_dir}")
    return 0 if comparison.passed else 1


def _check_verify_out_dir(out_dir: Path) -> None:
    from plait.train.preflight import earlier_run

    evidence = earlier_run(out_dir)
    if evidence is not None:
        raise ValueError(
            f"{out_dir} holds an earlier verification ({evidence}); delete it, or pass --out-dir with an unused directory"
        )


def _sets_for(config: Config) -> list[str]:
    """--set arguments that reproduce `config`: its data, plan, train and task sections and the model's choice."""
    import dataclasses

    values = {
        f"{section}.{key}": value
        for section in ("data", "plan", "train", "task")
        for key, value in dataclasses.asdict(getattr(config, section)).items()
    }
    values["model.preset"] = config.model.preset
    values |= {f"model.{key}": value for key, value in config.model.overrides.items()}
    if config.model.pretrained is not None:
        values["model.pretrained"] = config.model.pretrained
    return [item for key, value in values.items() for item in ("--set", f"{key}={_toml_value(value)}")]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str | list):
        return json.dumps(value)  # a TOML basic string, or an array of them
    return str(value)


def cmd_generate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.train.generate import check_sampling, generate_text

    check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
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


_PLAN_COUNTS = {"nodes": 1, "gpus_per_node": 1, "global_batch": 1, "seq": 2, "top": 1, "microbatches": 1}


def _check_plan_counts(args: argparse.Namespace) -> None:
    """The planner's counts are positive (0 used to be replaced silently, or blamed on another flag)."""
    for name, least in _PLAN_COUNTS.items():
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and value < least:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {value}: use {least} or more")


def cmd_debug(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.train.debug import debug_stacks

    return debug_stacks(Path(args.out_dir))


def cmd_data(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.data.prepare.cli import cmd_data as run_data

    return run_data(args, argv)


def cmd_plan(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.planner.cli import run_plan

    _check_plan_counts(args)
    return run_plan(args)


def cmd_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.eval.cli import cmd_eval as run_eval

    return run_eval(args, argv)


def cmd_finetune(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.recipes.cli import cmd_finetune as run_finetune

    return run_finetune(args, argv)


def cmd_bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.bench.cli import cmd_bench as run_bench

    return run_bench(args, argv)


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


if __name__ == "__main__":
    sys.exit(main())
