"""The example lm-evaluation-harness tasks that ship with the package (`tasks/`: zen_choice, stdlib_docs).

Their YAML files name their data by paths relative to the YAML's own folder. lm-eval hands
`dataset_kwargs.data_files` to `datasets.load_dataset`, which reads relative paths against the working
directory, so `task_config` returns a task's configuration with those paths made absolute: passed to
`lm_eval.simple_evaluate` as an inline task, it runs from any working directory and from an installed wheel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TASKS_DIR = Path(__file__).resolve().parent / "tasks"      # package data


def packaged_tasks() -> dict[str, Path]:
    """Task name -> YAML file, for every task in TASKS_DIR."""
    out = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(cfg, dict) and isinstance(cfg.get("task"), str):
            out[cfg["task"]] = path
    return out


def task_config(path: Path) -> dict[str, Any]:
    """The task configuration of YAML file `path`, its relative `dataset_kwargs.data_files` (a path, a list
    of paths, or split -> path(s)) resolved against the YAML's folder."""
    cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": _resolve(files, Path(path).parent)}
    return cfg


def _resolve(files: Any, folder: Path) -> Any:
    if isinstance(files, dict):
        return {k: _resolve(v, folder) for k, v in files.items()}
    if isinstance(files, list):
        return [_resolve(v, folder) for v in files]
    if isinstance(files, str) and "://" not in files:
        return str(folder / files)          # an absolute path stays as it is
    return files
