"""The training run's hardening: one-line errors for bad input, resume compatibility, the lr schedule and
MFU peak kept across --resume, and a metrics file that survives old runs and torn writes."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mistral_jax.model import flops
from mistral_jax.training import optim
from mistral_jax.training import run_config as rc_lib
from mistral_jax.training.metrics import read_metrics
from mistral_jax.checkpoint.train_state import TrainCheckpointer
from mistral_jax.training.run import run
from mistral_jax.cli import pretrain
from tests.conftest import xla_flags

REPO = Path(__file__).resolve().parents[2]
TINY_TOML = REPO / "configs" / "pretrain-tiny.toml"
BASE = {"mesh.devices": 2, "mesh.fsdp": 2, "train.progress": "false", "checkpoint.every": 2,
        "checkpoint.async_save": "false", "eval.batches": 0}
MEASURED_PEAK = 1.5e9


def _sets(**kw) -> list[str]:
    return [f"{k}={v}" for k, v in {**BASE, **kw}.items()]


def _argv(run_dir: Path, *sets: str, resume: bool = False) -> list[str]:
    argv = ["--config", str(TINY_TOML), "--run-dir", str(run_dir)]
    for s in sets:
        argv += ["--set", s]
    return argv + (["--resume"] if resume else [])


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """4 steps (checkpoints at 2 and 4) with --resume in a folder that has no checkpoint but an old
    metrics.jsonl; the MFU peak is 'measured' as MEASURED_PEAK."""
    run_dir = tmp_path_factory.mktemp("first") / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 100, "loss": 0.5}) + "\n")
    rc = rc_lib.load(TINY_TOML, _sets(**{"train.steps": 4, "train.peak_flops": 0, "train.profile_steps": "1:2"}))
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flops, "measure_peak_flops", lambda *a, **k: MEASURED_PEAK)
        summary = run(rc, run_dir, resume=True, log=lines.append)
    return run_dir, lines, summary


@pytest.mark.slow
def test_fresh_run_starts_a_new_metrics_file(first_run):
    run_dir, lines, summary = first_run
    assert any("--resume: no checkpoint in" in line and "starting a fresh run" in line for line in lines)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert summary["final_train_loss"] == records[-1]["loss"] != 0.5
    assert json.loads((run_dir / "metrics.old-1.jsonl").read_text())["step"] == 100
    assert any("moved metrics.jsonl" in line for line in lines)
    assert summary["peak_flops"] == MEASURED_PEAK and summary["schedule_steps"] == 4


def _tb_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the TensorBoard event files in `folder` (TFRecord framing, Event protos)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event
    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


@pytest.mark.slow
def test_tensorboard_events_match_the_metrics_file(first_run):
    run_dir, _, _ = first_run
    scalars = _tb_scalars(run_dir / "tensorboard")
    records = read_metrics(run_dir / "metrics.jsonl")
    assert sorted(scalars["train/loss"]) == [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert scalars["train/loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)
        assert scalars["train/lr"][r["step"]] == pytest.approx(r["lr"], rel=1e-6)


@pytest.mark.slow
def test_profile_steps_write_a_trace(first_run):
    run_dir, lines, _ = first_run
    traces = list((run_dir / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, list((run_dir / "profile").rglob("*"))
    assert any("profile of steps 1..2 written" in line for line in lines), lines


def test_profile_steps_flag_is_checked_before_anything_runs(tmp_path, capsys):
    assert pretrain.main(_argv(tmp_path / "run") + ["--profile-steps", "5"]) == 1
    assert _errors(capsys) == ["error: --profile-steps: expected A:B with integers 0 <= A <= B (steps to trace), "
                               "got '5'"]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sets, named", [
    (["model.overrides.dim=128"], ["model.dim 64 -> 128"]),
    (["model.overrides.n_layers=3"], ["model.n_layers 2 -> 3"]),
    (["data.seq_len=32", "data.batch_size=4"], ["data.seq_len 64 -> 32", "data.batch_size 8 -> 4"]),
    (["data.seed=1"], ["data.seed 0 -> 1"]),
    (["optim.lr=0.01", "optim.b2=0.99"], ["optim.lr 0.003 -> 0.01", "optim.b2 0.95 -> 0.99"]),
])
def test_resume_refuses_changed_fields_before_restoring(first_run, tmp_path, capsys, sets, named):
    run_dir = tmp_path / "run"
    shutil.copytree(first_run[0], run_dir)
    assert pretrain.main(_argv(run_dir, *_sets(**{"train.steps": 6}), *sets, resume=True)) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith("error: --resume: the checkpoint (step 4 in")
    for name in named:
        assert name in errors[0]
    assert "train.*" in errors[0]  # says what may change


@pytest.mark.slow
def test_resume_with_more_steps_keeps_schedule_peak_and_tolerates_torn_metrics(first_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(first_run[0], run_dir)
    with open(run_dir / "metrics.jsonl", "a") as f:  # a killed run had logged step 5, then tore a write
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n" + '{"step": 6, "lo')

    def no_measuring(*a, **k):
        raise AssertionError("the peak was measured again on resume")

    monkeypatch.setattr(flops, "measure_peak_flops", no_measuring)
    rc = rc_lib.load(TINY_TOML, _sets(**{"train.steps": 6, "train.peak_flops": 0}))
    lines: list[str] = []
    summary = run(rc, run_dir, resume=True, log=lines.append)
    assert any("dropped 1 unreadable line" in line for line in lines)
    assert any("dropped 1 record(s) after checkpoint step 4" in line for line in lines)
    assert any("keeping the checkpoint's warmup + cosine length of 4 steps" in line for line in lines)
    raw = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw] == [1, 2, 3, 4, 5, 6] and raw[4]["loss"] != 123.0
    # the lr follows the original 4-step schedule (then stays at its final value), not a 6-step one
    schedule = optim.learning_rate_schedule(rc.optim, 4)
    np.testing.assert_allclose([r["lr"] for r in raw], [float(schedule(k - 1)) for k in range(1, 7)], rtol=1e-6)
    assert raw[5]["lr"] == pytest.approx(rc.optim.lr * rc.optim.min_lr_ratio)
    assert summary["peak_flops"] == MEASURED_PEAK and summary["schedule_steps"] == 4
    assert raw[5]["mfu"] == pytest.approx(raw[5]["tokens_per_s"] * summary["flops_per_token"] / MEASURED_PEAK)
    # ... and the optimizer used it too: an uninterrupted 6-step run on a 4-step schedule matches exactly.
    rc_b = rc_lib.load(TINY_TOML, _sets(**{"train.steps": 6, "optim.schedule_steps": 4}))
    run(rc_b, tmp_path / "uninterrupted", log=lambda s: None)
    want = [(r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(tmp_path / "uninterrupted" / "metrics.jsonl")]
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in raw] == want


@pytest.mark.slow
def test_explicit_schedule_steps_restretches_and_mesh_may_change_on_resume(first_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(first_run[0], run_dir)
    # the mesh may change on resume too: 2 -> 4 devices on fsdp (orbax reshards the restored state)
    rc = rc_lib.load(TINY_TOML, _sets(**{"train.steps": 5, "optim.schedule_steps": 8, "train.peak_flops": 1e9,
                                         "mesh.devices": 4, "mesh.fsdp": 4}))
    lines: list[str] = []
    summary = run(rc, run_dir, resume=True, log=lines.append)
    assert any("optim.schedule_steps=8 re-stretches" in line for line in lines)
    assert any("mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in line for line in lines)
    assert summary["steps"] == 5 and summary["final_train_loss"] < read_metrics(run_dir / "metrics.jsonl")[0]["loss"]
    assert summary["schedule_steps"] == 8 and summary["peak_flops"] == 1e9  # a configured peak wins
    assert read_metrics(run_dir / "metrics.jsonl")[-1]["lr"] == pytest.approx(
        float(optim.learning_rate_schedule(rc.optim, 8)(4)), rel=1e-6)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty").mkdir()
    for i in range(3):
        (d / "empty" / f"e{i}.txt").write_text("  \n")
    (d / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    (d / "badckpt").mkdir()
    (d / "badckpt" / "config.json").write_text("{not json")
    return d


@pytest.mark.parametrize("sets, extra, code, message", [
    (["optim.b1=2.0"], [], 2, r"\[optim\] field 'b1': Input should be less than 1 \(got 2.0\)"),
    (["mesh.devices=-2"], [], 2, r"\[mesh\] field 'devices': Input should be greater than or equal to 0"),
    (["data.seq_len=2048"], [], 2, r"max_seq_len=1024 is below data.seq_len=2048"),
    (["data.source=files", "data.paths=['{d}/empty/*.txt']"], [], 1, r"none of the 3 files has any text"),
    (["data.source=files", "data.paths=['{d}/nothing/*.txt']"], [], 1, r"no files found for source='files'"),
    (["mesh.devices=0", "mesh.fsdp=-1", "mesh.tensor=3"], [], 1, r"\[mesh\]: make_mesh: 8 devices not divisible"),
    (["mesh.devices=8", "mesh.fsdp=4", "mesh.data=1"], [], 1, r"\[mesh\]: make_mesh: mesh shape .* needs 4 devices"),
    (["mesh.devices=16"], [], 1, r"\[mesh\] field 'devices' is 16 but only 8 devices exist"),
    (["mesh.devices=8", "mesh.fsdp=8", "data.batch_size=4"], [], 1, r"cannot be split over data\*fsdp=8"),
    (["data.tokenizer={d}/tokenizer.model"], [], 1, r"\[data\] field 'tokenizer' .*tokenizer.model"),
    ([], ["--init-from", "{d}/does-not-exist"], 1, r"--init-from .*does-not-exist"),
    ([], ["--init-from", "{d}/badckpt"], 1, r"--init-from .*badckpt: "),
])
def test_bad_input_is_one_error_line(bad_inputs, tmp_path, capsys, sets, extra, code, message):
    sets = [s.replace("{d}", str(bad_inputs)) for s in sets]
    argv = _argv(tmp_path / "run", *_sets(**{"train.steps": 2}), *sets) + [a.replace("{d}", str(bad_inputs))
                                                                           for a in extra]
    assert pretrain.main(argv) == code
    errors = _errors(capsys)
    assert len(errors) == 1, errors
    assert re.search(message, errors[0]), errors[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing was trained


@pytest.mark.slow   # one of the everyday subset's longest (issue 20, point 7)
def test_cli_process_prints_one_line_and_exits(tmp_path):
    """In a real process: one `error:` line on stderr and nothing else (no thread traceback at exit)."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "train.pretrain", *_argv(tmp_path / "run", *_sets()),
                           "--init-from", str(tmp_path / "missing")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --init-from {tmp_path / 'missing'}: "), proc.stderr


def test_checkpointer_close_awaits_the_startup_cleanup(tmp_path):
    """The deterministic half of the test above: close() leaves no orbax clean-up thread running."""
    ckpt = TrainCheckpointer(tmp_path / "checkpoints")
    ckpt.close()
    assert getattr(ckpt._manager, "_cleanup_tmp_directory_future", "absent") is None  # reset once awaited
