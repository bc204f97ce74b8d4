"""Out of memory ends with one line and exit status 3 (mistral_jax.runtime.oom): recognition and parsing of real XLA and
numpy out-of-memory errors (also wrapped), and the programs end to end on requests that cannot fit.

Every allocation asked for here is refused without touching memory: the in-process ones (1 PiB and more) exceed
any address space, and the programs run in subprocesses under an address-space limit (RLIMIT_AS)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mistral_jax.runtime import oom  # noqa: E402
from tests.conftest import xla_flags  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PIB = 2**50
SIZE = re.compile(r"requested \d+\.\d\d [KMGTP]iB, \d+\.\d\d [KMGTP]iB available")
SUBPROCESS_AS_LIMIT = 16 * 2**30     # address space of the programs run here: larger requests fail at once


@pytest.fixture(scope="module")
def xla_oom() -> BaseException:
    """A real XLA out-of-memory error: a 1 PiB buffer, refused by the allocator (nothing is touched)."""
    with pytest.raises(Exception) as info:
        jax.block_until_ready(jax.jit(lambda: jnp.zeros((PIB // 4,), jnp.float32))())
    assert "RESOURCE_EXHAUSTED" in str(info.value), info.value
    return info.value


@pytest.fixture(scope="module")
def numpy_oom() -> MemoryError:
    """numpy's MemoryError for a 1 PiB array."""
    with pytest.raises(MemoryError) as info:
        np.empty(PIB, np.uint8)
    return info.value


def _wrapped(inner: BaseException, how: str) -> BaseException:
    """`inner` as the loaders wrap it: `raise X(...) from inner`, `from None` (only __context__ left), or only
    quoted in a message (no chain at all)."""
    try:
        try:
            raise inner
        except BaseException as e:
            if how == "cause":
                raise ValueError("cannot restore params") from e
            if how == "context":
                raise ValueError("cannot restore params") from None
            raise AssertionError
    except ValueError as e:
        return e


# ----- recognition and parsing -----

def test_real_xla_error_is_recognised_with_its_size(xla_oom):
    assert oom.is_oom(xla_oom)
    assert oom.requested_bytes(xla_oom) == PIB
    assert not oom.compiling(xla_oom)     # refused when the program ran, not while it compiled


def test_real_numpy_error_is_recognised_with_its_size(numpy_oom):
    assert oom.is_oom(numpy_oom)
    assert oom.requested_bytes(numpy_oom) == PIB
    free, where = oom.available(numpy_oom)
    assert where == "in host memory" and free > 0


@pytest.mark.parametrize("how", ["cause", "context"])
@pytest.mark.parametrize("kind", ["xla", "numpy"])
def test_wrapped_errors_are_recognised(xla_oom, numpy_oom, kind, how):
    inner = xla_oom if kind == "xla" else numpy_oom
    outer = _wrapped(inner, how)
    assert oom.is_oom(outer) and oom.find(outer) is inner
    assert oom.requested_bytes(outer) == PIB


def test_an_error_quoted_in_a_message_is_recognised(xla_oom):
    """The checkpoint readers and the training run quote orbax's errors:
    '... (JaxRuntimeError: RESOURCE_EXHAUSTED: ...)'."""
    e = ValueError(f"ckpt/params: cannot restore params ({type(xla_oom).__name__}: {xla_oom})")
    assert oom.is_oom(e) and oom.requested_bytes(e) == PIB


@pytest.mark.parametrize("e", [ValueError("bad shape"), OSError(28, "No space left on device"),
                               RuntimeError("INVALID_ARGUMENT: Executable expected parameter 0 of size 8"),
                               ValueError("data.jsonl:3: text 'out of memory' is not a conversation"),
                               KeyError("memory")])
def test_other_errors_are_not_out_of_memory(e):
    assert not oom.is_oom(e)


@pytest.mark.parametrize("text, requested, available", [
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 58329360744 bytes.", 58329360744, None),
    ("RESOURCE_EXHAUSTED: Failed to allocate request for 4.00GiB (4294967296B) on device ordinal 0", 2**32, None),
    ("RESOURCE_EXHAUSTED: Error allocating device buffer: Attempting to allocate 8.00G. That was not possible. "
     "There are 5.50G free.", 8 * 2**30, int(5.5 * 2**30)),
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 20.50G of "
     "15.50G hbm. Exceeded hbm capacity by 5.0G.", int(20.5 * 2**30), int(15.5 * 2**30)),
    ("INTERNAL: Error dispatching computation: Out of memory allocating 4503599627370496 bytes.", 2**52, None),
])
def test_accelerator_messages(monkeypatch, text, requested, available):
    """The GPU/TPU message forms (not producible on CPU): sizes parsed; with devices that keep no memory
    statistics, the message's own free figure."""
    e = jax.errors.JaxRuntimeError(text)
    assert oom.is_oom(e) and oom.requested_bytes(e) == requested

    class Device:
        platform, id = "tpu", 0

        def memory_stats(self):
            return None
    monkeypatch.setattr(jax, "local_devices", lambda: [Device()])
    assert oom.available(e) == (available, "on tpu")
    assert oom.compiling(e) == ("compile" in text)


def test_device_memory_stats_give_the_least_free_device(monkeypatch):
    class Device:
        platform = "gpu"

        def __init__(self, i, in_use):
            self.id, self.in_use = i, in_use

        def memory_stats(self):
            return {"bytes_limit": 80 * 2**30, "bytes_in_use": self.in_use}
    monkeypatch.setattr(jax, "local_devices", lambda: [Device(0, 10 * 2**30), Device(1, 70 * 2**30)])
    e = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.")
    assert oom.available(e) == (10 * 2**30, "on gpu:1")
    line = oom.message("python -m infer.generate", "generating", e, ["--dtype bfloat16"])
    assert line == ("python -m infer.generate: out of memory while generating: requested 16.00 GiB, 10.00 GiB "
                    "available on gpu:1; try --dtype bfloat16")


def test_host_available_counts_the_address_space_limit():
    free = oom.host_available()
    assert free is not None and 0 < free
    code = ("import resource; from mistral_jax.runtime import oom; "
            "resource.setrlimit(resource.RLIMIT_AS, (2**33, resource.RLIM_INFINITY)); print(oom.host_available())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert 0 < int(out.stdout) < 2**33, out


def test_frame_stage_names_the_innermost_known_function():
    def train(steps):
        for step in range(steps):
            if step == 2:
                np.empty(PIB, np.uint8)

    stages = {f"{__name__}:train": lambda f: f"training step {f['step'] + 1} of {f['steps']}",
              f"{__name__}:outer": "never: not the innermost"}

    def outer():
        train(5)
    with pytest.raises(MemoryError) as info:
        outer()
    assert oom.frame_stage(info.value, stages, "preparing") == "training step 3 of 5"
    assert oom.frame_stage(ValueError(), stages, "preparing") == "preparing"


# ----- the reporter -----

def test_reporter_prints_one_line_and_exits_3(xla_oom, capsys):
    guard = oom.Reporter("python -m prog", lambda stage: [f"a smaller --batch-size ({stage})", "--dtype bfloat16"])
    with pytest.raises(SystemExit) as info:
        with guard.stage("generating"):
            raise _wrapped(xla_oom, "context")
    assert info.value.code == oom.EXIT_CODE == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert re.fullmatch(r"python -m prog: out of memory while generating: requested 1\.00 PiB, \d+\.\d\d [KMGT]iB "
                        r"available in host memory; try a smaller --batch-size \(generating\) or --dtype bfloat16\n",
                        err), err


def test_reporter_lets_other_errors_through_and_debug_reraises(xla_oom, monkeypatch, capsys):
    guard = oom.Reporter("p", ["x"])
    with pytest.raises(ValueError, match="bad"):
        with guard.stage("s"):
            raise ValueError("bad")
    monkeypatch.setenv("MISTRAL_JAX_DEBUG", "1")
    with pytest.raises(type(xla_oom)):
        with guard.stage("s"):
            raise xla_oom
    assert capsys.readouterr().err == ""


# ----- the programs, in process (the stage and advice each names) -----

def _one_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if "out of memory" in x]
    assert len(lines) == 1 and err.rstrip("\n").splitlines()[-1] == lines[0], err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _raiser(e):
    def f(*a, **k):
        raise e
    return f


def test_generate_loading(xla_oom, monkeypatch, tmp_path, capsys):
    from mistral_jax.cli import generate
    from mistral_jax.checkpoint import native as checkpoint
    monkeypatch.setattr(checkpoint, "load_params", _raiser(_wrapped(xla_oom, "context")))
    with pytest.raises(SystemExit) as info:
        generate.main(["--checkpoint", str(tmp_path), "--prompt", "hi", "--batch-size", "4"])
    assert info.value.code == 3
    line = _one_line(capsys, "python -m infer.generate: out of memory while loading the checkpoint: requested 1.00 PiB",
                     "--dtype bfloat16", "larger mesh")
    assert "--batch-size" not in line    # loading does not depend on it


def test_evaluate_loading(numpy_oom, monkeypatch, tmp_path, capsys):
    from mistral_jax.cli import evaluate
    from mistral_jax.checkpoint import native as checkpoint
    data = tmp_path / "doc.txt"
    data.write_text("some text\n")
    (tmp_path / "ckpt").mkdir()          # a folder (not a Hub id): the load itself runs out of memory
    monkeypatch.setattr(checkpoint, "load_params", _raiser(numpy_oom))
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--checkpoint", str(tmp_path / "ckpt"), "--task", "perplexity", "--data", str(data),
                       "--output", str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert info.value.code == 3
    line = _one_line(capsys, "python -m infer.evaluate: out of memory while loading the checkpoint: requested 1.00 "
                     "PiB", "available in host memory", "larger mesh")
    assert "--dtype" not in line         # already bfloat16


def test_lm_eval_loading(xla_oom, monkeypatch, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    import lm_eval.tasks
    from mistral_jax.cli import lm_eval as cli
    from mistral_jax.evaluation import lm_eval_backend

    class Tasks:
        all_tasks = ["t"]

        def __init__(self, **kw):
            pass
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Tasks)
    monkeypatch.setattr(lm_eval_backend, "MistralJaxLM", _raiser(xla_oom))
    with pytest.raises(SystemExit) as info:
        cli.main(["--checkpoint", str(tmp_path), "--tasks", "t", "--output", str(tmp_path / "out")])
    assert info.value.code == 3
    _one_line(capsys, "python -m infer.lm_eval: out of memory while loading the checkpoint: requested 1.00 PiB")


def test_convert_reading(numpy_oom, monkeypatch, tmp_path, capsys):
    from mistral_jax.cli.convert import main
    from mistral_jax.checkpoint import native as checkpoint
    monkeypatch.setattr(checkpoint, "load_params_with_notes", _raiser(_wrapped(numpy_oom, "cause")))
    (tmp_path / "src").mkdir()
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "src"), str(tmp_path / "out"), "--format", "hf", "--quiet"])
    assert info.value.code == 3
    _one_line(capsys, f"python -m infer.convert: out of memory while reading {tmp_path / 'src'}: requested 1.00 PiB",
              "--dtype bfloat16")


def test_plan_compiling(numpy_oom, monkeypatch, capsys):
    from mistral_jax.training import memory_plan
    from mistral_jax.cli import plan
    monkeypatch.setattr(memory_plan, "plan", _raiser(numpy_oom))
    with pytest.raises(SystemExit) as info:
        plan.main(["--preset", "tiny", "--mesh", "1,1,1", "--seq-len", "64", "--batch", "1"])
    assert info.value.code == 3
    _one_line(capsys, "python -m train.plan: out of memory while compiling the train step for its memory analysis",
              "--no-compile")


# ----- the programs end to end, in subprocesses -----

def _run(module: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m module argv...` under SUBPROCESS_AS_LIMIT of address space (set in the child itself: no
    preexec_fn in this multithreaded process)."""
    code = ("import resource, runpy, sys; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({SUBPROCESS_AS_LIMIT}, resource.RLIM_INFINITY)); "
            f"sys.argv = [{module!r}] + sys.argv[1:]; "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MALLOC_ARENA_MAX": "2", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "XLA_FLAGS": xla_flags(1)}
    env.pop("MISTRAL_JAX_DEBUG", None)
    try:
        return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        pytest.fail(f"{module} hung instead of reporting out of memory (stderr: {err!r}); on XLA:CPU np.asarray of "
                    "a result whose allocation failed waits forever: block_until_ready first")


def _check(proc: subprocess.CompletedProcess, program: str, stage: str, *advice: str) -> str:
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if "out of memory" in x]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert proc.stderr.rstrip("\n").splitlines()[-1] == line, proc.stderr
    assert re.match(rf"{re.escape(program)}: out of memory while {stage}: ", line), line
    assert SIZE.search(line), line
    for a in advice:
        assert a in line, (a, line)
    return line


@pytest.fixture(scope="module")
def long_context_ckpt(tmp_path_factory):
    """A tiny model (random weights) whose max_seq_len (2^30) and missing window let --max-new-tokens ask for a
    KV cache far beyond the subprocess's address space."""
    import flax.linen as nn

    from mistral_jax.model import transformer as model
    from mistral_jax.checkpoint.native import save_params
    from mistral_jax.model.config import ModelConfig
    cfg = ModelConfig.preset("tiny").replace(max_seq_len=2**30, sliding_window=None)
    rs = np.random.RandomState(0)
    params = jax.tree_util.tree_map(lambda x: (rs.randn(*x.shape) * 0.05).astype(np.float32),
                                    nn.unbox(model.abstract_params(cfg)))
    path = tmp_path_factory.mktemp("long") / "ckpt"
    save_params(path, cfg, params)
    return path


@pytest.mark.slow
def test_generate_cli_cache_that_cannot_fit(long_context_ckpt):
    """2^27 new tokens: a 32 GiB float32 key cache (and as much for values), beyond the 16 GiB address space."""
    proc = _run("infer.generate", "--checkpoint", str(long_context_ckpt), "--prompt", "Hello",
                "--max-new-tokens", str(2**27))
    line = _check(proc, "python -m infer.generate", r"generating \(batch 1 of 1, 134217728 new tokens\)",
                  "--dtype bfloat16", "fewer --max-new-tokens (now 134217728", "a larger mesh")
    assert "requested 32.00 GiB" in line, line
    assert "--batch-size" not in line    # one prompt: a smaller batch would not help


@pytest.mark.slow
def test_pretrain_cli_model_that_cannot_fit(tmp_path):
    """An MLP 2^46 wide: 16 PiB of w1 alone, refused when the train state is created."""
    proc = _run("train.pretrain", "--config", "configs/pretrain-tiny.toml", "--run-dir", str(tmp_path / "run"),
                "--set", "mesh.devices=1", "--set", "train.steps=1", "--set", "eval.batches=0",
                "--set", "model.overrides.n_layers=1", "--set", f"model.overrides.hidden_dim={2**46}")
    line = _check(proc, "python -m train.pretrain",
                  r"(creating the params and optimizer state|training step 1 of 1 \(or a computation before it\))",
                  "--set model.param_dtype=bfloat16", "a larger mesh")
    assert "requested 16.00 PiB" in line, line


def test_train_stage_table_names_existing_functions():
    """Each "module:function" of train.cli.OOM_STAGES exists (a module function or a method), so a rename
    cannot silently turn a stage into "preparing the run"."""
    import importlib
    import inspect

    from mistral_jax.cli.train_cli import OOM_STAGES
    for key in OOM_STAGES:
        module, name = key.split(":")
        mod = importlib.import_module(module)
        owners = [mod] + [c for _, c in inspect.getmembers(mod, inspect.isclass) if c.__module__ == module]
        assert any(inspect.isfunction(getattr(o, name, None)) for o in owners), key
