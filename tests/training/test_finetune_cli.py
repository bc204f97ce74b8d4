"""`python -m train.finetune`: the shared training loop on chat data (answers-only loss, before/after
evaluation, data report), bad data lines, and the program refusing the wrong kind of data. LoRA from an
--init-from checkpoint (only adapters train, merged export) runs in tests/test_lora_checkpoint.py."""

import json
from pathlib import Path

import pytest

from mistral_jax.checkpoint.native import load_params
from mistral_jax.cli import finetune

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "finetune-tiny.toml"
BASE = {"mesh.devices": 2, "mesh.fsdp": 2}


def _argv(run_dir, *extra, **sets):
    argv = ["--config", str(TINY), "--run-dir", str(run_dir)]
    for k, v in {**BASE, **sets}.items():
        argv += ["--set", f"{k}={v}"]
    return argv + list(extra)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ft") / "full"
    assert finetune.main(_argv(run_dir)) == 0
    return run_dir


@pytest.mark.slow
def test_full_finetune_trains_on_answers_and_reports(full_run):
    s = json.loads((full_run / "summary.json").read_text())
    assert s["steps"] == 6 and s["heldout_loss"] < s["before_heldout_loss"]
    assert s["heldout_answers"] == s["before_heldout_answers"] == 4
    report = json.loads((full_run / "data_report.json").read_text())
    assert report["train_conversations"] == 200 and report["heldout_conversations"] == 20
    # the held-out loss counts answer tokens only: far fewer than all held-out tokens
    assert 0 < s["heldout_tokens"] < report["trainable_tokens"] < report["tokens"]
    rows = [json.loads(x) for x in (full_run / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all({"reference", "answer", "match"} <= set(r) for r in rows)
    cfg, params = load_params(full_run / "export")
    assert cfg.n_layers == 2 and "layers" in params


@pytest.mark.slow
def test_bad_lines_are_counted_or_stop_the_run(tmp_path, capsys):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                      {"role": "assistant", "content": f"a{i}"}]}) for i in range(40)]
    lines[3] = "{not json"
    lines[7] = json.dumps({"messages": [{"role": "robot", "content": "x"}]})
    lines[11] = json.dumps({"prompt": "only a prompt"})
    lines[20] = json.dumps({"messages": [{"role": "user", "content": "q"}]})
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(lines) + "\n")
    sets = {"data.source": "chat", "data.paths": f'["{data}"]', "train.steps": 2, "eval.answers": 0,
            "eval.before": "false", "eval.export": "false", "data.val_percent": 0.0}
    optional = {"train.init_from": str(tmp_path / "missing"), "train.init_from_optional": "true"}
    assert finetune.main(_argv(tmp_path / "skip", **sets, **optional)) == 0     # missing optional init: random
    assert f"train.init_from {tmp_path / 'missing'}: no such folder (train.init_from_optional): random init" \
        in capsys.readouterr().out
    report = json.loads((tmp_path / "skip" / "data_report.json").read_text())
    assert report["n_skipped"] == 4 and report["conversations"] == 36
    assert any(m.startswith(f"{data}:4: ") for m in report["messages"])
    capsys.readouterr()
    assert finetune.main(_argv(tmp_path / "stop", **{**sets, "data.on_error": "stop"})) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(f"error: {data}:4: "), err


def test_required_init_from_must_exist(tmp_path, capsys):
    assert finetune.main(_argv(tmp_path / "x", **{"train.init_from": str(tmp_path / "missing")})) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert err == [f"error: train.init_from {tmp_path / 'missing'}: no such folder"], err


def test_programs_refuse_the_other_kind_of_data(tmp_path, capsys):
    assert finetune.main(_argv(tmp_path / "x", **{"data.source": "stdlib"})) == 2
    err = capsys.readouterr().err
    assert "python -m train.finetune trains on 'chat' or 'chat-examples'" in err and "Traceback" not in err
