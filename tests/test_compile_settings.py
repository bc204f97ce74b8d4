"""The suite's two compile settings (tests/conftest.py): its own XLA:CPU flags everywhere, and XLA:CPU's default
fusion for `.lower(...).compile()` in tests marked `as_shipped`. A scatter shows which one compiled a program:
the fusion emitters keep it a scatter, the older emitter expands it into a loop."""

import os

import jax
import jax.numpy as jnp
import pytest

from tests.conftest import TEST_XLA_FLAGS


def _compiled_text() -> str:
    def f(t_N, i_K, v_K):
        return (2 * t_N).at[i_K].add(jnp.exp(v_K)) + 1

    return jax.jit(f).lower(jnp.zeros(64), jnp.arange(8), jnp.ones(8)).compile().as_text()


def test_the_suite_compiles_with_its_own_flags():
    if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
        pytest.skip(f"XLA_FLAGS was set outside the suite: {os.environ.get('XLA_FLAGS')!r}")
    assert " scatter(" not in _compiled_text()


@pytest.mark.as_shipped
def test_as_shipped_compiles_with_the_default_fusion():
    assert " scatter(" in _compiled_text()
