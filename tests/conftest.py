"""Shared test setup: 8 simulated CPU devices, a per-session compilation cache and session-scoped reference
models.

The compilation cache: many tests run the same programs through fresh `jax.jit` objects (every run of
`train.finetune` / `train.pretrain` builds its own train, eval and decode steps), which the in-memory jit
caches cannot share. JAX's persistent cache, keyed on the compiled program itself, lets the second identical
program load the first one's executable. It lives in a fresh folder per session (removed at the end), so a
run never reads executables of another code version; set JAX_COMPILATION_CACHE_DIR to keep one across runs.
pytest-xdist's workers inherit the folder from the main process and share it. It is on in the test processes
only: subprocesses get it where a test passes `compile_cache_env()` on, so a program whose compile-time output
a test reads (XLA warnings on stderr) always really compiles.
"""

import os
import shutil
import tempfile

# Two XLA:CPU settings for the programs the tests compile, since the suite is mostly compilation of tiny
# programs (benchmarks set neither):
# - LLVM at -O0: roughly halves compile-heavy files (LoRA-memory + cost-analysis: 77 -> 43 s in one pair of runs on
#   a shared 2-core AMD host), while in-process training loops run slower (test_evaluate_trained's fixture:
#   31-42 -> 51-55 s). XLA's own (HLO) passes, which decide fusion, layouts and buffers, are not affected.
# - the fusion emitters off (XLA:CPU's older loop emitter): a LoRA train step compiles in 1.4 s instead of 4.8 s,
#   and the whole suite needs 1070 s of CPU instead of 1468 s (one run each, same 2-core AMD host). This one
#   does change XLA's fusion passes a little, so tests that read a compiled program's memory, work or text are
#   marked `as_shipped`: their `.lower(...).compile()` calls get AS_SHIPPED, XLA:CPU's default, back.
_LLVM_O0 = "--xla_backend_optimization_level=0"
TEST_XLA_FLAGS = f"{_LLVM_O0} --xla_cpu_use_fusion_emitters=false"
AS_SHIPPED = {"xla_cpu_use_fusion_emitters": True}
# for a test program that runs many steps (a model trained inside a test): XLA:CPU's defaults for both settings
# (test_evaluate_trained's 100 steps: 50.7 s -> 27.7 s)
FAST_RUN = {**AS_SHIPPED, "xla_backend_optimization_level": 3}


def xla_flags(devices: int | None = 8, as_shipped: bool = False) -> str:
    """XLA_FLAGS for a test's program: `devices` simulated CPU devices (None: the default one) and TEST_XLA_FLAGS
    (with as_shipped, only LLVM's -O0: the program's compiled form is what the test reads)."""
    flags = _LLVM_O0 if as_shipped else TEST_XLA_FLAGS
    return " ".join(([f"--xla_force_host_platform_device_count={devices}"] if devices else []) + [flags])


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests import hf_ref  # noqa: E402

_CACHE_VAR = "MISTRAL_JAX_TEST_JIT_CACHE"    # the session's folder, in the environment so that a second
_OWN_CACHE = not os.environ.get("JAX_COMPILATION_CACHE_DIR") and _CACHE_VAR not in os.environ  # import finds it
if _OWN_CACHE:
    os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="mistral-jax-test-jit-")
_CACHE_DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.environ[_CACHE_VAR]


def compile_cache_env() -> dict[str, str]:
    """Environment variables that give a subprocess this session's compilation cache."""
    return {"JAX_COMPILATION_CACHE_DIR": _CACHE_DIR, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """Workers for `-n auto` (pyproject's addopts): one per core, at most one per 6 GiB of memory (a worker's
    peak is ~3.6 GiB, plus the programs some tests start), at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(cores, memory // (6 * 2**30), 8))


def pytest_configure(config):
    import jax

    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """In a test marked `as_shipped` (module-scoped fixtures it sets up included), every `Lowered.compile`
    adds AS_SHIPPED to its compiler options."""
    if item.get_closest_marker("as_shipped") is None:
        return (yield)
    import jax.stages

    real = jax.stages.Lowered.compile

    def compile_as_shipped(self, compiler_options=None, **kw):
        return real(self, {**AS_SHIPPED, **(compiler_options or {})}, **kw)

    jax.stages.Lowered.compile = compile_as_shipped
    try:
        return (yield)
    finally:
        jax.stages.Lowered.compile = real


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)
        os.environ.pop(_CACHE_VAR, None)


@pytest.fixture(scope="session")
def hf_gqa(tmp_path_factory):
    """Random HF MistralForCausalLM, 8 query / 2 kv heads, window 16, saved with save_pretrained."""
    return hf_ref.make_hf_model(tmp_path_factory.mktemp("hf_gqa"), n_heads=8, n_kv_heads=2, window=16, seed=0)


@pytest.fixture(scope="session")
def hf_mha(tmp_path_factory):
    """Random HF MistralForCausalLM, 4 query / 4 kv heads, window 16."""
    return hf_ref.make_hf_model(tmp_path_factory.mktemp("hf_mha"), n_heads=4, n_kv_heads=4, window=16, seed=1)


@pytest.fixture(scope="session")
def hf_v02(tmp_path_factory):
    """Random HF MistralForCausalLM shaped like v0.2: no sliding window, rope theta 1e6 (vocab kept tiny)."""
    return hf_ref.make_hf_model(tmp_path_factory.mktemp("hf_v02"), n_heads=8, n_kv_heads=2, window=None,
                                theta=1e6, seed=2)


@pytest.fixture(scope="session")
def hf_v03(tmp_path_factory):
    """Random HF MistralForCausalLM shaped like v0.3: vocab 32768, no sliding window, rope theta 1e6."""
    return hf_ref.make_hf_model(tmp_path_factory.mktemp("hf_v03"), n_heads=8, n_kv_heads=2, window=None,
                                theta=1e6, vocab=32768, seed=3)


@pytest.fixture(scope="session")
def eval_tiny(tmp_path_factory):
    """(cfg, params, HF folder with tokenizer files, HF model) of tests/test_evaluate.py's tiny random model
    (vocab 32000), shared by the scoring and lm-eval tests (read only)."""
    from tests.evaluation.test_evaluate import make_tiny

    return make_tiny(tmp_path_factory.mktemp("eval_tiny") / "hf")
