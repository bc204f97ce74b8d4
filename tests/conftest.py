"""Shared test setup: 8 simulated CPU devices, a per-session compilation cache and session-scoped reference
models.

The compilation cache: many tests run the same programs through fresh `jax.jit` objects (every run of
`train.finetune` / `train.pretrain` builds its own train, eval and decode steps), which the in-memory jit
caches cannot share. JAX's persistent cache, keyed on the compiled program itself, lets the second identical
program load the first one's executable. It lives in a fresh folder per session (removed at the end), so a
run never reads executables of another code version; set JAX_COMPILATION_CACHE_DIR to keep one across runs.
It is on in this process only: subprocesses get it where a test passes `compile_cache_env()` on, so a
program whose compile-time output a test reads (XLA warnings on stderr) always really compiles.
"""

import os
import shutil
import tempfile

# LLVM at -O0 for the programs the tests compile: the suite is mostly compilation of tiny programs, and this
# roughly halves compile-heavy files (LoRA-memory + cost-analysis: 77 -> 43 s in one pair of runs on a shared
# 2-core AMD host), while in-process training loops run slower (test_evaluate_trained's fixture: 31-42 ->
# 51-55 s). XLA's own (HLO) passes, which decide
# fusion, layouts, buffers and so what memory_analysis, cost_analysis and the HLO checks see, are not affected;
# the matmuls are library calls either way. Benchmarks do not set it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = 8) -> str:
    """XLA_FLAGS for a test's program: `devices` simulated CPU devices (None: the default one) and TEST_XLA_FLAGS."""
    return " ".join(([f"--xla_force_host_platform_device_count={devices}"] if devices else []) + [TEST_XLA_FLAGS])


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


def pytest_configure(config):
    import jax

    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
