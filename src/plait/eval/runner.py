"""`plait eval`: checkpoints x tasks on lm-evaluation-harness, under a plan, one report.

Every input is checked before anything is written or any rank starts (paths, task names, downloads,
tokenizers); then each rank loads each checkpoint, applies the plan (plait.boost), and lm_eval runs
the same tasks on every rank over `PlaitLM`, whose scorer shares the work over dp. The main rank
writes ``results.json``, ``results.md`` and, for several checkpoints, ``metrics.png``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from plait.checkpoint.lengths import inference_window
from plait.config import Plan
from plait.eval.sources import (
    Checkpoint,
    EvalData,
    check_paths,
    check_tokenizers,
    eot_id,
    eval_data,
    is_hf_dir,
    read_checkpoint,
)
from plait.eval.taskdata import TaskSizes, write_task_data
from plait.eval.tasks import (
    TASKS_DIR,
    check_other_tasks,
    other_task_names,
    plait_task_config,
    plait_task_names,
    split_names,
)


@dataclass
class EvalRequest:
    """What to evaluate, on which tasks, under which plan, written where."""

    paths: list[str]
    tasks: str = "perplexity,next_token,code_completion"
    plan: Plan | None = None
    out_dir: str | None = None
    include_path: str | None = None
    batch_size: int = 16
    limit: int | None = None  # samples per task (lm_eval's limit), for a quick look
    threads: int = 1  # intra-op threads per rank, as plait train's train.threads
    max_length: int | None = None  # tokens per scored window; default: the length each checkpoint was trained at
    sizes: TaskSizes = field(default_factory=TaskSizes)

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("plait eval needs at least one checkpoint or Hugging Face directory")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size}: score at least 1 sequence per forward")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit}: use 1 or more samples per task (or leave it out: all)")
        if self.threads < 1:
            raise ValueError(f"--threads {self.threads}: give each rank at least 1 intra-op thread")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"--max-length {self.max_length}: score windows of at least 2 tokens")
        if self.plan is not None:
            _check_plan(self.plan)


def _check_plan(plan: Plan) -> None:
    if plan.cp > 1:
        raise ValueError(
            f"plait eval runs under dp, tp, pp, ep and ZeRO 0-3; cp={plan.cp} is not supported for evaluation: "
            "its forward needs each sequence sharded over the cp ranks, which the scorer does not do; "
            "use tp or pp to split a model too big for one rank"
        )


@dataclass(frozen=True)
class Prepared:
    """Checked inputs: the checkpoints, the eval data, the task list and where output goes."""

    checkpoints: list[Checkpoint]
    data: EvalData
    plait_tasks: list[str]
    other_tasks: list[str]
    task_manager: Any
    out_dir: Path


def prepare(request: EvalRequest, *, imported_dir: Path, task_manager: Any = None) -> Prepared:
    """Every check, before anything is written (imports of Hugging Face directories go to ``imported_dir``)."""
    check_paths(request.paths)
    names = split_names(request.tasks)
    others = other_task_names(names)
    if others:
        task_manager = task_manager or _task_manager(request.include_path, defaults=True)
        check_other_tasks(others, task_manager)
    checkpoints = [_checkpoint(Path(path), imported_dir=imported_dir) for path in request.paths]
    for checkpoint in checkpoints:
        window(checkpoint, override=request.max_length)  # a too-long --max-length is refused before any rank starts
    data = eval_data(checkpoints[0])
    check_tokenizers(checkpoints, data)
    out_dir = Path(request.out_dir) if request.out_dir else _default_out(checkpoints[0].path)
    return Prepared(checkpoints, data, plait_task_names(names), others, task_manager, out_dir)


def _checkpoint(path: Path, *, imported_dir: Path) -> Checkpoint:
    if not is_hf_dir(path):
        return read_checkpoint(path)
    from plait.checkpoint.hf_export import import_hf

    target = imported_dir / f"{len(list(imported_dir.iterdir()))}-{path.name}"
    import_hf(path, target)
    return read_checkpoint(target, origin=path)


def _default_out(first: Path) -> Path:
    """<out_dir>/eval for a checkpoint under <out_dir>/checkpoints, else beside the checkpoint."""
    parent = first.resolve().parent
    return parent.parent / "eval" if parent.name == "checkpoints" else parent / f"{first.name}-eval"


def _task_manager(include_path: str | None, *, defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *([include_path] if include_path else [])]
    return TaskManager(include_path=paths, include_defaults=defaults)


def run_eval(request: EvalRequest, *, task_manager: Any = None) -> dict[str, Any]:
    """Evaluate every checkpoint on every task; returns the results (every rank), written by the main rank."""
    from plait.distributed.launch import is_main_rank
    from plait.eval.report import write_report

    torch.set_num_threads(request.threads)  # torch's default, every core per rank, oversubscribes a shared machine
    with tempfile.TemporaryDirectory(prefix="plait-eval-") as imported:
        prepared = prepare(request, imported_dir=Path(imported), task_manager=task_manager)
        task_files = write_task_data(
            prepared.data.part,
            _tokenizer(prepared.data.tokenizer_json),
            Path(imported) / "tasks",
            sizes=request.sizes,
        )
        tasks = [plait_task_config(task, task_files[task]) for task in prepared.plait_tasks] + prepared.other_tasks
        manager = prepared.task_manager or _task_manager(request.include_path, defaults=False)
        rows = [
            _evaluate(checkpoint, tasks, request=request, task_manager=manager) for checkpoint in prepared.checkpoints
        ]
        results = {
            "data": {
                "source": prepared.data.source,
                "split": prepared.data.part.split,
                **_counts(task_files),
                "chance_code_choice": 1 / request.sizes.num_choices,
            },
            "plan": dataclasses.asdict(request.plan) if request.plan else None,
            "checkpoints": rows,
        }
        if is_main_rank():
            write_report(results, prepared.out_dir)
    return results


def _tokenizer(tokenizer_json: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def _counts(task_files: dict[str, Path]) -> dict[str, int]:
    return {f"num_{task}": len(path.read_text().splitlines()) for task, path in task_files.items()}


def _evaluate(checkpoint: Checkpoint, tasks: list[Any], *, request: EvalRequest, task_manager: Any) -> dict[str, Any]:
    import lm_eval

    from plait.eval.adapter import PlaitLM
    from plait.train.generate import load_for_inference

    model, tokenizer = load_for_inference(checkpoint.path)
    max_length = window(checkpoint, override=request.max_length)
    scorer = _scorer(model, max_length=max_length, request=request)
    lm = PlaitLM(scorer, tokenizer, eot_id=eot_id(tokenizer))
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=request.limit,
        bootstrap_iters=1000,  # a mean's standard error is closed-form; only median-like metrics resample
        log_samples=False,
        task_manager=task_manager,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    return {
        "checkpoint": str(checkpoint.path),
        "label": checkpoint.label,
        "step": checkpoint.step,
        "max_length": max_length,
        "results": _metrics(output),
    }


def window(checkpoint: Checkpoint, *, override: int | None) -> int:
    """The tokens each of the checkpoint's scored windows holds (plait.checkpoint.lengths)."""
    return inference_window(
        label=str(checkpoint.origin or checkpoint.path),
        context=checkpoint.context,
        trained=checkpoint.trained_length,
        override=override,
    )


def _scorer(model: torch.nn.Module, *, max_length: int, request: EvalRequest) -> Any:
    from plait.eval.pipeline_logits import PipelineLogits
    from plait.eval.scorer import Scorer
    from plait.train.generate import _context_length

    if max_length > _context_length(model):  # the configs read before loading said otherwise: never run past it
        raise ValueError(f"a window of {max_length} tokens exceeds the model's {_context_length(model)} positions")
    if request.plan is None or _world_size() == 1:
        return Scorer(model, max_length=max_length, batch_size=request.batch_size)
    import plait
    from plait.losses import causal_lm

    engine = plait.boost(
        model,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.0),
        loss_fn=causal_lm,
        plan=_boost_plan(request.plan),
    )
    ranks = _data_ranks(engine, plan=request.plan)
    # under pp a rank holds some stages only: every pp rank gets the last stage's logits
    scored = engine.model if engine.pipeline is None else PipelineLogits(engine)
    # under ZeRO-3 the KV cache's decoder calls the model's parts, not the forward whose hooks gather
    # the parameters: greedy generation then runs whole rows
    cache = request.plan.zero != 3
    return Scorer(scored, max_length=max_length, batch_size=request.batch_size, ranks=ranks, kv_cache=cache)


def _data_ranks(engine: Any, *, plan: Plan) -> Any:
    """dp ranks share the requests, except under ZeRO-3 (each forward all-gathers the parameters over dp)
    and ep (each MoE layer exchanges tokens over ep): there every rank scores every request, so all run
    the same forwards in lockstep (unequal shares, or rows stopping at different steps, would hang)."""
    from plait.eval.scorer import DataRanks

    if plan.zero == 3 or plan.ep > 1:
        return DataRanks()
    return DataRanks(rank=engine.dp_rank, size=engine.dp_size, group=engine.mesh.group("data"))


def _boost_plan(plan: Plan) -> Plan:
    """The plan with enough micro-batches for its pipeline schedule's checks: evaluation never runs the
    schedule (each batch goes through the stages in turn), so `--plan "pp=2"` needs no microbatches=."""
    if plan.pp == 1:
        return plan
    return dataclasses.replace(plan, microbatches=-(-max(plan.microbatches, plan.pp) // plan.pp) * plan.pp)


def _world_size() -> int:
    """The launched world: the joined group's, or torchrun's WORLD_SIZE before boost joins it."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def _metrics(output: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm_eval's results (its 'acc,none' keys; 'acc_stderr' where lm_eval gives one)."""
    metrics: dict[str, dict[str, float]] = {}
    for task, values in (output or {}).get("results", {}).items():
        for key, value in values.items():
            name, _, _ = key.partition(",")
            if isinstance(value, int | float) and name not in ("alias", "sample_len"):
                metrics.setdefault(task, {})[name] = float(value)
    return metrics
