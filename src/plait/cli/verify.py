"""`plait verify`: the plan's losses against one plain process."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from plait.cli import launching
from plait.cli.launching import preflight, ranks_wanted
from plait.config import Config, load_config


def cmd_verify(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.train.setup import validate
    from plait.train.verify import compare, verification_config

    config = load_config(args.config, args.overrides)
    nproc = ranks_wanted(config, args.nproc)
    validated = validate(config, world_size=nproc)
    out_dir = args.out_dir or f"{config.train.out_dir.rstrip('/')}-verify"  # kept: the run's log explains a FAIL
    run_config = verification_config(config, out_dir)
    _check_verify_out_dir(Path(out_dir))
    preflight(run_config, validated=validated, resume=None)
    train_argv = ["train", *([args.config] if args.config else []), *sets_for(run_config)]
    code = launching.launch(nproc, train_argv)
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


def sets_for(config: Config) -> list[str]:
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
