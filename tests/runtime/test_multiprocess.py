"""Multi-process programs: 2 processes x 2 CPU devices on localhost (jax.distributed, gloo collectives)
against 1 process x 4 devices: pretraining with its export and sample, fine-tuning, generation and
evaluation; kill and resume; a dead or stalled peer (one line, exit status 1); start-up failures (one line, exit
status 2); each process reads its own data shards or chat lines; the mesh keeps each data slice within one
process."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mistral_jax.data import text as data_lib
from mistral_jax.training import run_config as rc_lib
from mistral_jax.data.shards import merge_states
from mistral_jax.data.tokenizer import Tokenizer
from tests.conftest import compile_cache_env, xla_flags

REPO = Path(__file__).resolve().parents[2]
TINY_TOML = REPO / "configs" / "pretrain-tiny.toml"
SETS = {"data.shards": 2, "train.steps": 6, "checkpoint.every": 3, "checkpoint.async_save": "false",
        "train.progress": "false", "data.pattern": "json/*.py", "data.val_percent": 0.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(run_dir: Path, extra: dict | None = None, resume: bool = False, program: str = "train.pretrain",
         config: Path = TINY_TOML, sets: dict | None = None) -> list[str]:
    argv = [sys.executable, "-m", program, "--config", str(config), "--run-dir", str(run_dir)]
    for k, v in {**(SETS if sets is None else sets), **(extra or {})}.items():
        argv += ["--set", f"{k}={v}"]
    return argv + (["--resume"] if resume else [])


def _env(devices: int) -> dict:
    """The environment of a program run here: `devices` CPU devices, and the session's compilation cache (a
    resumed or repeated run loads the programs its first run compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu",
            "PYTHONUNBUFFERED": "1", **compile_cache_env()}


def _start_pair(run_dir: Path, log_dir: Path, resume: bool = False, extra: dict | None = None,
                heartbeat: int = 30, env: dict | None = None, **cmd) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for i in range(2):
        log = open(log_dir / f"p{i}{'-resume' if resume else ''}.log", "w")
        procs.append(subprocess.Popen(
            _cmd(run_dir, extra, resume, **cmd) + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                            "--process-id", str(i), "--heartbeat-timeout", str(heartbeat)],
            cwd=REPO, env={**_env(2), **(env or {})}, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs, timeout=600) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _ref_and_pair(base: Path, extra: dict | None = None, pair_extra: dict | None = None, pair_env: dict | None = None,
                  **cmd) -> Path:
    """Runs a training program as 1 process x 4 devices (base/ref) and as 2 processes x 2 devices (base/two)
    at the same time (the pair with `pair_extra` settings and `pair_env` variables too); both must exit 0."""
    ref_log = open(base / "ref.log", "w")
    ref = subprocess.Popen(_cmd(base / "ref", extra, **cmd), cwd=REPO, env=_env(4), stdout=ref_log,
                           stderr=subprocess.STDOUT)
    pair = _start_pair(base / "two", base, extra={**(extra or {}), **(pair_extra or {})}, env=pair_env, **cmd)
    codes = _wait(pair) + _wait([ref])
    assert codes == [0, 0, 0], [(p, (base / p).read_text()[-2000:]) for p in ("p0.log", "p1.log", "ref.log")]
    return base


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process x 4 devices (reference) and 2 processes x 2 devices, both 6 steps, then an export and a
    sample; the pair also logs to an offline Weights & Biases run."""
    return _ref_and_pair(tmp_path_factory.mktemp("mp"), {"eval.export": "true", "eval.sample_tokens": 8},
                         pair_extra={"train.wandb_project": "mp-test"}, pair_env={"WANDB_MODE": "offline"})


def _assert_same_export(a: Path, b: Path) -> None:
    """Both native exports load (checksums verified) and hold the same params: Adam's normalised step turns
    the two runs' float32 rounding differences in near-zero gradients into differences of a few 1e-6 in a
    handful of weights, so all weights agree within 1e-4 and all but 0.1% within 1e-6 (a misplaced shard
    differs by the weights' scale, ~1e-2, in every element)."""
    import jax
    import numpy as np

    from mistral_jax.checkpoint.native import load_params

    (cfg_a, pa), (cfg_b, pb) = load_params(a), load_params(b)
    assert cfg_a == cfg_b
    la, lb = jax.tree_util.tree_leaves_with_path(pa), jax.tree_util.tree_leaves_with_path(pb)
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (k, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=0, err_msg=str(k))
        assert np.mean(np.abs(x - y) > 1e-6) < 1e-3, k
    assert not [p.name for p in b.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_equal_one_process(runs):
    ref, two = _losses(runs / "ref"), _losses(runs / "two")
    assert sorted(two) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        assert abs(two[step] - ref[step]) <= 1e-5, (step, two[step], ref[step])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_side_effects_happen_once(runs):
    two = runs / "two"
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]          # one writer, not two
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (runs / "p1.log").read_text().count('"final_train_loss"') == 0       # process 1 prints no summary
    steps = sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    assert not [p for p in (two / "checkpoints").iterdir() if "tmp" in p.name]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_wandb_logs_the_metrics_once_offline(runs):
    from tests.wandb_offline import history

    folders = list((runs / "two" / "wandb").glob("offline-run-*"))
    assert len(folders) == 1, folders                                           # process 0 only
    files = list(folders[0].glob("run-*.wandb"))
    assert len(files) == 1 and files[0].stem == "run-" + (runs / "two" / "wandb_id").read_text()
    logged = {r["_step"]: r["train/loss"] for r in history(files[0]) if "train/loss" in r}
    assert logged == _losses(runs / "two")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_export_and_sample_on_two_processes_equal_one_process(runs):
    _assert_same_export(runs / "ref" / "export", runs / "two" / "export")
    sample = (runs / "two" / "sample.txt").read_text()
    assert len(sample) > len("def ") and sample == (runs / "ref" / "sample.txt").read_text()
    summary = json.loads((runs / "two" / "summary.json").read_text())
    assert summary["export"] == str(runs / "two" / "export") and summary["sample"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_kill_both_and_resume_continues_bit_exactly(runs, tmp_path):
    run_dir = tmp_path / "killed"
    procs = _start_pair(run_dir, tmp_path)
    ckpt = run_dir / "checkpoints" / "3"
    deadline = time.time() + 600
    while not ckpt.is_dir() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    assert ckpt.is_dir(), (tmp_path / "p0.log").read_text()[-2000:]
    for p in procs:
        p.send_signal(signal.SIGKILL)
    _wait(procs)
    assert _wait(_start_pair(run_dir, tmp_path, resume=True)) == [0, 0], \
        (tmp_path / "p0-resume.log").read_text()[-2000:]
    resumed, uninterrupted = _losses(run_dir), _losses(runs / "two")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert all(resumed[s] == uninterrupted[s] for s in range(1, 7)), (resumed, uninterrupted)
    assert "resumed from step 3" in (tmp_path / "p0-resume.log").read_text()


def _error_lines(log: str) -> list[str]:
    return [x for x in log.splitlines() if x.startswith("error:")]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_dead_peer_stops_the_other_process(tmp_path):
    """Process 1 is killed mid-training: process 0 stops at once (its liveness channel to process 1 closes, long
    before jax's heartbeat) with one line and exit status 1, even though its next collective fails first."""
    heartbeat = 30
    # the lr schedule of the 6-step runs: the same train step as theirs, loaded from the compilation cache
    procs = _start_pair(tmp_path / "run", tmp_path, extra={"train.steps": 100000, "checkpoint.every": 100000,
                                                           "optim.schedule_steps": 6}, heartbeat=heartbeat)
    deadline = time.time() + 600
    while time.time() < deadline and '"step": 2' not in (tmp_path / "p0.log").read_text():
        assert procs[0].poll() is None, (tmp_path / "p0.log").read_text()[-2000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    code = procs[0].wait(timeout=300)
    waited = time.time() - t0
    log = (tmp_path / "p0.log").read_text()
    assert code == 1, (code, log[-3000:])
    assert _error_lines(log) == ["error: process 1 of 2 stopped before finishing (its connection closed); "
                                 "process 0 stops too"], log[-3000:]
    assert "Traceback" not in log and "Check failure" not in log and "heartbeat timeout" not in log, log[-3000:]
    assert waited < heartbeat, waited          # README: stops within --heartbeat-timeout


STALL_PROBE = """
import sys, time
import numpy as np
from jax.experimental import multihost_utils
from mistral_jax.runtime import distributed
distributed.initialize(timeout_s=300, heartbeat_timeout_s=int(sys.argv[1]))
step = 0
while True:
    multihost_utils.process_allgather(np.array([step]))
    step += 1
    if step == 20:
        print("running", flush=True)
"""


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_stalled_peer_stops_the_other_process(tmp_path):
    """Process 1 is stopped (SIGSTOP: alive, connections open, silent): process 0 stops after
    --heartbeat-timeout with one line and exit status 1, before jax's own heartbeat (twice as long) aborts it."""
    heartbeat = 8
    port = _free_port()
    logs = [open(tmp_path / f"s{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", STALL_PROBE, str(heartbeat)], cwd=REPO, stdout=logs[i],
                              stderr=subprocess.STDOUT,
                              env={**_env(1), "MISTRAL_JAX_COORDINATOR": f"127.0.0.1:{port}",
                                   "MISTRAL_JAX_NUM_PROCESSES": "2", "MISTRAL_JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    try:
        deadline = time.time() + 300
        while time.time() < deadline and "running" not in (tmp_path / "s0.log").read_text():
            assert procs[0].poll() is None, (tmp_path / "s0.log").read_text()[-2000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGSTOP)
        code = procs[0].wait(timeout=300)
        log = (tmp_path / "s0.log").read_text()
        assert code == 1, (code, log[-3000:])
        assert _error_lines(log) == [f"error: process 1 of 2 sent nothing for {heartbeat} s (--heartbeat-timeout); "
                                     "process 0 stops too"], log[-3000:]
        assert "Traceback" not in log and "Check failure" not in log, log[-3000:]
    finally:
        procs[1].kill()
        procs[1].wait()


def test_each_process_reads_its_own_shards():
    rc = rc_lib.load(TINY_TOML, [f"{k}={v}" for k, v in {**SETS, "data.pattern": "json/**/*.py",
                                                          "data.shards": 4}.items()])
    tok = Tokenizer.for_vocab(32000)
    shares = []
    states = []
    for p in range(2):
        train, _, corpus = data_lib.make_streams(rc.data, tok, process_index=p, process_count=2)
        assert train.shards == [2 * p, 2 * p + 1]
        shares.append(set(train.files))
        next(train)
        states.append(train.state())
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(corpus.files)
    one, _, _ = data_lib.make_streams(rc.data, tok)          # one process runs all four shards ...
    assert set(one.files) == set(corpus.files) and one.shards == [0, 1, 2, 3]
    one.restore(merge_states(states))                        # ... and resumes from the two processes' state
    with pytest.raises(data_lib.DataError, match="data.shards=4 must be a multiple of the number of processes"):
        data_lib.make_streams(rc.data, tok, process_index=0, process_count=3)


FT_TOML = REPO / "configs" / "finetune-tiny.toml"
FT_SETS = {"data.shards": 2, "train.steps": 4, "checkpoint.every": 4, "eval.answers": 4, "eval.before": "false",
           "data.examples": 120}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_finetune_on_two_processes_equals_one_process(tmp_path):
    """Chat data read by line share, held-out answers decoded by both processes, merged export."""
    base = _ref_and_pair(tmp_path, program="train.finetune", config=FT_TOML, sets=FT_SETS)
    ref, two = _losses(base / "ref"), _losses(base / "two")
    assert sorted(two) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:
        assert abs(two[step] - ref[step]) <= 1e-5, (step, two[step], ref[step])
    # the data report merged from both processes' shares equals the one process's report (the example
    # files are written into each run's own folder)
    reports = [json.loads((base / d / "data_report.json").read_text()) for d in ("ref", "two")]
    assert [[Path(f).name for f in r.pop("files")] for r in reports] == [["train.jsonl", "val.jsonl"]] * 2
    assert reports[0] == reports[1] and reports[0]["conversations"] > 100
    a, b = (json.loads((base / d / "summary.json").read_text()) for d in ("ref", "two"))
    assert a["heldout_answers"] == b["heldout_answers"] == 4
    assert a["heldout_loss"] == pytest.approx(b["heldout_loss"], rel=1e-6)
    assert (base / "two" / "answers.jsonl").read_text() == (base / "ref" / "answers.jsonl").read_text()
    _assert_same_export(base / "ref" / "export", base / "two" / "export")


def test_each_process_reads_its_own_chat_lines(tmp_path):
    from mistral_jax.data.chat_files import ChatReport
    from mistral_jax.data.chat_template import as_chat_tokenizer
    from mistral_jax.data.chat_examples import write_examples
    from mistral_jax.training.chat_source import read_share

    write_examples(tmp_path, 60, 6, seed=0)
    rc = rc_lib.load(FT_TOML, [f"{k}={v}" for k, v in {**FT_SETS, "data.shards": 4}.items()])
    tok = as_chat_tokenizer(Tokenizer.for_vocab(32000))
    files = [tmp_path / "train.jsonl"], [tmp_path / "val.jsonl"]
    lines = lambda convs: {(c.file, c.line) for c in convs}  # noqa: E731
    one_train, one_val, one_report = read_share(rc, tok, *files, 0, 1)
    shares = [read_share(rc, tok, *files, p, 2) for p in range(2)]
    for train_c, val_c, _ in shares:
        assert {c.index % 4 for c in train_c + val_c} <= set(range(4))
    (t0, v0, r0), (t1, v1, r1) = shares
    assert {c.index % 4 for c in t0 + v0} == {0, 1} and {c.index % 4 for c in t1 + v1} == {2, 3}
    assert not lines(t0 + v0) & lines(t1 + v1)                     # disjoint shares ...
    assert lines(t0 + t1) == lines(one_train) and lines(v0 + v1) == lines(one_val)   # ... covering the data
    assert r0.lines + r1.lines == one_report.lines == 66             # each process parsed only its lines
    assert ChatReport.merged([r0.to_dict(), r1.to_dict()]).to_dict() == one_report.to_dict()


def _one_then_two(one_argv: list[str], two_argv: list[str]) -> list[str]:
    """Runs a program as 1 process x 4 devices (mesh 1,4,1) and as 2 processes x 2 devices, at the same time;
    returns the two processes' outputs (all must exit 0)."""
    one_err = tempfile.TemporaryFile("w+")       # (a pipe nobody reads until the end could fill and stall it)
    one = subprocess.Popen(one_argv + ["--mesh", "1,4,1"], cwd=REPO, env=_env(4), stdout=subprocess.DEVNULL,
                           stderr=one_err, text=True)
    port = _free_port()
    procs = [subprocess.Popen(two_argv + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                          "--process-id", str(i)],
                              cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    one.wait(timeout=600)
    one_err.seek(0)
    assert one.returncode == 0, one_err.read()[-2000:]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    return outs


@pytest.mark.multiprocess
@pytest.mark.slow
def test_generate_on_two_processes_equals_one(tmp_path):
    import jax

    from mistral_jax.model import transformer as model_lib
    from mistral_jax.checkpoint.native import save_params
    from mistral_jax.model.config import ModelConfig

    cfg = ModelConfig.preset("tiny")
    ckpt = save_params(tmp_path / "ckpt", cfg, model_lib.init_params(cfg, jax.random.key(0)))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in
                               ["def f(x):", "import os", "The answer is", "class A:", "x = [", "# comment"]))

    def argv(out):
        return [sys.executable, "-m", "infer.generate", "--checkpoint", str(ckpt), "--prompts", str(prompts),
                "--output", str(out), "--max-new-tokens", "6", "--batch-size", "4", "--temperature", "1",
                "--seed", "3"]

    outs = _one_then_two(argv(tmp_path / "one.jsonl"), argv(tmp_path / "two.jsonl"))
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert "generated" in outs[0] and "generated" not in outs[1]     # process 0 reports, process 1 is silent


@pytest.mark.multiprocess
@pytest.mark.slow
def test_evaluate_on_two_processes_equals_one(tmp_path):
    import jax

    from mistral_jax.model import transformer as model_lib
    from mistral_jax.checkpoint.native import save_params
    from mistral_jax.model.config import ModelConfig

    cfg = ModelConfig.preset("tiny")
    ckpt = save_params(tmp_path / "ckpt", cfg, model_lib.init_params(cfg, jax.random.key(1)))
    docs = tmp_path / "docs.jsonl"
    texts = [Path(json.__file__).read_text()[i * 300:(i + 1) * 300 + 37 * i] for i in range(7)]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    def argv(out):
        return [sys.executable, "-m", "infer.evaluate", "--checkpoint", str(ckpt), "--task", "perplexity",
                "--data", str(docs), "--output", str(out), "--batch-size", "4", "--max-length", "64"]

    outs = _one_then_two(argv(tmp_path / "one"), argv(tmp_path / "two"))
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    a.pop("this_run"), b.pop("this_run")
    assert a["scored"] == b["scored"] == 7 and sorted(a) == sorted(b)
    # identical: params are all-gathered over fsdp (no cross-process partial sums), rows stay on their devices
    for k in a:
        assert a[k] == b[k], (k, a[k], b[k])

    def rows(d):
        return {r["key"]: r for r in map(json.loads, (tmp_path / d / "examples.jsonl").read_text().splitlines())}
    ra, rb = rows("one"), rows("two")
    assert sorted(ra) == sorted(rb)
    for key in ra:
        assert ra[key] == rb[key], (ra[key], rb[key])
    assert "scored" in outs[0] and "scored" not in outs[1]


MESH_PROBE = """
import json
from mistral_jax.runtime import distributed; from mistral_jax.model import sharding
distributed.initialize()
for shape in ((2, 2, 1), (2, 1, 2)):
    mesh = sharding.make_mesh(*shape)
    # for each index along the data axis: the processes owning its devices
    print(json.dumps([sorted({d.process_index for d in mesh.devices[i].flat}) for i in range(shape[0])]))
"""


@pytest.mark.multiprocess
@pytest.mark.slow
def test_mesh_puts_the_data_axis_across_processes():
    """2 processes x 2 devices: each data slice (its fsdp or tensor devices) lies within one process."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", MESH_PROBE], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**_env(2), "MISTRAL_JAX_COORDINATOR": f"127.0.0.1:{port}",
                                   "MISTRAL_JAX_NUM_PROCESSES": "2", "MISTRAL_JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for out in outs:
        rows = [json.loads(x) for x in out.splitlines() if x.startswith("[")]
        assert rows == [[[0], [1]], [[0], [1]]], out


@pytest.mark.multiprocess
@pytest.mark.slow
def test_unreachable_coordinator_is_a_clear_error_not_a_hang(tmp_path):
    port = _free_port()     # nobody listens there
    t0 = time.time()
    r = subprocess.run(_cmd(tmp_path / "run") + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                                 "--process-id", "1", "--init-timeout", "3"],
                       cwd=REPO, env=_env(2), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and time.time() - t0 < 60
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: the coordinator 127.0.0.1:{port} was not reachable within 3 s (process 1 of 2; last error: "
        "Connection refused); start process 0 there, or check --coordinator")
    r = subprocess.run(_cmd(tmp_path / "run") + ["--num-processes", "2"], cwd=REPO, env=_env(2),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "missing --coordinator, --process-id" in r.stderr


def _listener(answer: bytes | None) -> tuple[int, "socket.socket"]:
    """A TCP listener on 127.0.0.1 that is not a mistral-jax process 0: it accepts connections in a thread and
    either says nothing (answer None) or sends `answer`. Returns (port, listening socket; close it when done)."""
    import threading

    srv = socket.create_server(("127.0.0.1", 0))
    held = []

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            held.append(conn)
            if answer is not None:
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1], srv


@pytest.mark.multiprocess
@pytest.mark.slow
def test_every_start_up_failure_is_one_line_with_status_2(tmp_path):
    """Process 0 alone, an unusable coordinator address, a process pointed at a listener that is not
    mistral-jax, and processes that disagree on --num-processes: each exits with status 2 and prints exactly one
    line naming the coordinator or the flag (no C++ stack, no traceback). All run at once (real programs)."""
    lone, mismatch = _free_port(), _free_port()
    silent_port, silent = _listener(None)
    http_port, http = _listener(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    def gen(coordinator: str, n: int, i: int, timeout: int = 5) -> list[str]:
        return [sys.executable, "-m", "infer.generate", "--checkpoint", str(tmp_path / "never-read"), "--prompt",
                "x", "--coordinator", coordinator, "--num-processes", str(n), "--process-id", str(i),
                "--init-timeout", str(timeout)]

    cases = {
        "lone process 0": (gen(f"127.0.0.1:{lone}", 2, 0),
                           f"error: process(es) 1 of 2 did not join the coordinator 127.0.0.1:{lone} within 5 s "
                           f"(--init-timeout); start them with --coordinator 127.0.0.1:{lone} --num-processes 2"),
        "port out of range": (gen("notahost:99999", 2, 0),
                              "error: --coordinator notahost:99999: port 99999 is not in 1..65535"),
        "unknown host": (gen("notahost.invalid:1234", 2, 0),
                         "error: --coordinator notahost.invalid:1234: cannot resolve host 'notahost.invalid' ("),
        "silent listener": (gen(f"127.0.0.1:{silent_port}", 2, 1),
                            f"error: the coordinator 127.0.0.1:{silent_port} is not a mistral-jax process 0 (process "
                            "1 of 2): it accepted the connection but did not answer within 5 s (--init-timeout); "
                            "check --coordinator"),
        "http listener": (gen(f"127.0.0.1:{http_port}", 2, 1),
                          f"error: the coordinator 127.0.0.1:{http_port} is not a mistral-jax process 0 (process 1 "
                          "of 2): it answered b'HTTP/1.0 400 Bad Request\\r'; check --coordinator"),
        # process 0 waits for 2 others; process 1 was told the group has 2 processes in all
        "mismatch 0": (gen(f"127.0.0.1:{mismatch}", 3, 0, timeout=120),
                       "error: process 1 was started with --num-processes 2, process 0 with 3"),
        "mismatch 1": (gen(f"127.0.0.1:{mismatch}", 2, 1, timeout=120),
                       f"error: process 0 at the coordinator 127.0.0.1:{mismatch} stopped the group: process 1 was "
                       "started with --num-processes 2, process 0 with 3"),
    }
    try:
        procs = {name: subprocess.Popen(argv, cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True) for name, (argv, _) in cases.items()}
        results = {name: (p.communicate(timeout=600), p.returncode) for name, p in procs.items()}
    finally:
        silent.close()
        http.close()
    for name, ((out, err), code) in results.items():
        expected = cases[name][1]
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(expected), (name, code, err[-3000:])
        assert not out.strip(), (name, out)
