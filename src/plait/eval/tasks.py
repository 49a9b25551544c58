"""Which lm-eval tasks `plait eval` runs: plait's own (YAML here, data written locally) or any task
lm-eval finds on this machine whose data is local. A task whose data would be downloaded is refused."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).parent / "tasks"
# plait's names for its own tasks, and the lm-eval tasks behind each.
PLAIT_TASKS = {
    "perplexity": ("plait_perplexity",),
    "next_token": ("plait_next_token",),
    "code_completion": ("plait_code_choice", "plait_code_line"),
}
PLAIT_TASK_NAMES = tuple(name for names in PLAIT_TASKS.values() for name in names)
# Dataset builders that read files named in data_files: local when those files exist.
_FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def split_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--tasks {text!r} names no task; try --tasks {','.join(PLAIT_TASKS)}")
    return list(dict.fromkeys(names))


def plait_task_names(names: Sequence[str]) -> list[str]:
    """The plait_* tasks among ``names`` (in plait's order), expanding perplexity, next_token, code_completion."""
    wanted = {task for name in names for task in PLAIT_TASKS.get(name, (name,)) if task in PLAIT_TASK_NAMES}
    return [task for task in PLAIT_TASK_NAMES if task in wanted]


def other_task_names(names: Sequence[str]) -> list[str]:
    return [name for name in names if name not in PLAIT_TASKS and name not in PLAIT_TASK_NAMES]


def plait_task_config(task: str, data_file: Path) -> dict[str, Any]:
    """plait's YAML for ``task`` with its locally written data file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(TASKS_DIR / f"{task}.yaml", resolve_func=True)  # process_results: a file beside the YAML
    # datasets caches beside the data file (a temporary directory), not in the user's ~/.cache
    kwargs = {"data_files": {"test": str(data_file)}, "cache_dir": str(data_file.parent / "datasets-cache")}
    return {**config, "dataset_kwargs": kwargs}


def check_other_tasks(names: Sequence[str], task_manager: Any) -> None:
    """Refuse, in one line naming the task, a name lm-eval does not know or whose data is not local."""
    index = task_manager.task_index
    for name in names:
        if name not in index:
            raise ValueError(_unknown(name, known=list(index)))
        for leaf, config in _leaf_configs(name, task_manager):
            reason = _download_reason(config)
            if reason:
                via = "" if leaf == name else f" (in {name})"
                raise ValueError(
                    f"task {leaf!r}{via} needs a download ({reason}); plait eval runs only tasks whose data is on this "
                    f"machine: plait's own ({', '.join(PLAIT_TASKS)}) or a task YAML whose dataset_path is a local "
                    "directory or a json/csv/parquet builder with local data_files (--include-path DIR)"
                )


def _unknown(name: str, *, known: list[str]) -> str:
    close = difflib.get_close_matches(name, [*PLAIT_TASKS, *known], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return (
        f"unknown task {name!r}: plait's tasks are {', '.join(PLAIT_TASKS)}, or any of the {len(known)} tasks "
        f"lm-eval indexes here (lm-eval ls tasks; --include-path DIR adds your own YAML){hint}"
    )


def _leaf_configs(name: str, task_manager: Any, depth: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """(task name, its YAML config) of every task under ``name`` (a task, group or tag)."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager.task_index[name]
    if entry.kind == Kind.TAG:
        members = [other for other, e in task_manager.task_index.items() if name in e.tags]
    elif entry.kind == Kind.GROUP:
        members = [item for item in (entry.cfg or {}).get("task", []) if isinstance(item, str)]
    else:
        config = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else dict(entry.cfg or {})
        return [(name, config)]
    members = [member for member in members if member in task_manager.task_index and depth < 8]
    return [leaf for member in members for leaf in _leaf_configs(member, task_manager, depth + 1)]


def _download_reason(config: dict[str, Any]) -> str | None:
    """Why the task's data is not on this machine (None when it is, or when it cannot be told)."""
    path = config.get("dataset_path")
    if path is None:
        return None  # a Python task or custom loader: it says for itself
    if path in _FILE_BUILDERS:
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        missing = [f for f in _file_list(files) if not Path(f).exists()]
        if files is None or missing:
            return f"dataset {path} files {missing[:1] or 'unset'} are not here"
        return None
    if Path(str(path)).expanduser().exists():
        return None
    return f"dataset {path} from the Hugging Face hub"


def _file_list(files: Any) -> list[str]:
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for value in files.values() for f in _file_list(value)]
    if isinstance(files, list):
        return [f for value in files for f in _file_list(value)]
    return []
