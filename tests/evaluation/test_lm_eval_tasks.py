"""The example lm-eval tasks that ship in the package: found by name, their data found from any working folder,
their metrics declared in full (lm-eval warns of none)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from mistral_jax.cli.lm_eval import task_specs  # noqa: E402
from mistral_jax.evaluation import lm_eval_tasks  # noqa: E402


def test_packaged_tasks_resolve_their_data_from_any_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tasks = lm_eval_tasks.packaged_tasks()
    assert sorted(tasks) == ["stdlib_docs", "zen_choice"]
    for name, path in tasks.items():
        cfg = lm_eval_tasks.task_config(path)
        assert cfg["task"] == name and cfg["dataset_path"] == "json"
        data = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert data.is_absolute() and data.parent == lm_eval_tasks.TASKS_DIR
        assert json.loads(data.read_text().splitlines()[0])


def test_data_file_paths_of_every_form_resolve_against_the_yaml_folder(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                 "    train: [a.jsonl, /abs/b.jsonl]\n    test: https://example.org/c.jsonl\n")
    files = lm_eval_tasks.task_config(y)["dataset_kwargs"]["data_files"]
    assert files == {"train": [str(tmp_path / "a.jsonl"), "/abs/b.jsonl"], "test": "https://example.org/c.jsonl"}
    y.write_text("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files: d.jsonl\n")
    assert lm_eval_tasks.task_config(y)["dataset_kwargs"]["data_files"] == str(tmp_path / "d.jsonl")


def test_task_specs_packaged_first_then_lm_eval_names_and_unknown_ones_named():
    specs = task_specs(["zen_choice", "hellaswag"], ["hellaswag", "zen_choice"], None)
    assert isinstance(specs[0], dict) and specs[0]["task"] == "zen_choice" and specs[1] == "hellaswag"
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\]; pass --include-path"):
        task_specs(["zen_choice", "nope"], [], None)
    with pytest.raises(ValueError, match=r"\['nope'\] \(none in mine nor among the example tasks"):
        task_specs(["nope"], [], Path("mine"))


def test_packaged_tasks_declare_aggregation_and_direction_of_every_metric(tmp_path, caplog):
    from lm_eval.api.task import ConfigurableTask

    for name, path in lm_eval_tasks.packaged_tasks().items():
        cfg = lm_eval_tasks.task_config(path)
        cfg["dataset_kwargs"]["cache_dir"] = str(tmp_path / "hf_cache")
        with caplog.at_level(logging.WARNING):
            task = ConfigurableTask(config=cfg)
        for m in cfg["metric_list"]:
            assert {"aggregation", "higher_is_better"} <= set(m), f"{path}: metric {m['metric']} lacks them"
            assert task.higher_is_better()[m["metric"]] is m["higher_is_better"], f"{path}: {m['metric']}"
    warned = [r.getMessage() for r in caplog.records if "is defined, but" in r.getMessage()]
    assert not warned, warned
