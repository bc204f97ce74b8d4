"""The bf16 LoRA train step's memory does not grow with depth beyond the per-layer activations (issue 18,
point 3): the frozen base reaches the program packed (`packing.pack`, bfloat16 bits as uint16), so XLA:CPU
never widens the stacked weights to float32 nor copies them; passed unpacked, it does, and the bound fails.

Model: dim 256, 4 heads, 2 kv heads, head_dim 64, hidden 1024, vocab 512; LoRA rank 8 on all seven
projections; bf16 compute and params, remat full; one micro-batch of 2 x 256 tokens; one device.
"""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from mistral_jax.model import transformer as model_lib
from mistral_jax.training import optim
from mistral_jax.model import packing
from mistral_jax.model import sharding
from mistral_jax.training import train_step as ts
from mistral_jax.model.config import ModelConfig
from mistral_jax.model.lora import LoraConfig
from mistral_jax.training.run_config import OptimSection

# four compiles of a dim-256 LoRA train step, ~30 s; it reads their memory and text (tests/conftest.py)
pytestmark = [pytest.mark.slow, pytest.mark.as_shipped]

B, T = 2, 256
LCFG = LoraConfig(rank=8)
SHALLOW, DEEP = 2, 8


def _cfg(n_layers: int) -> ModelConfig:
    return ModelConfig(dim=256, n_layers=n_layers, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=1024,
                       vocab_size=512)


def _compiled(n_layers: int, packed: bool):
    """The compiled LoRA train step for `n_layers`, the base given packed or as bfloat16."""
    cfg = _cfg(n_layers)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    o = OptimSection()
    opt = optim.make_optimizer(o, 100)
    step = ts.make_train_step(cfg, opt, optim.learning_rate_schedule(o, 100), mesh, dtype=jnp.bfloat16,
                              param_dtype=jnp.bfloat16, remat="full", lora=LCFG)
    state = ts.abstract_state(cfg, opt, mesh, jnp.bfloat16, lora=LCFG)
    base = ts.abstract_base(cfg, mesh, LCFG, jnp.bfloat16, packed=packed)
    assert {x.dtype for x in jax.tree_util.tree_leaves(base)} == {jnp.dtype(packing.PACKED if packed else jnp.bfloat16)}
    bsh = ts.batch_shardings(mesh)
    batch = {k: jax.ShapeDtypeStruct((1, B, T), jnp.int32, sharding=bsh[k]) for k in ts.BATCH_KEYS}
    return step.lower(state, base, batch).compile()


def _per_layer_bytes(cfg: ModelConfig) -> tuple[int, int]:
    """(float32 bytes of one layer's base weights, float32 bytes of one layer's adapters)."""
    params = nn.unbox(model_lib.abstract_params(cfg, lora=LCFG))
    adapters, base = ts.trainable(params, LCFG), ts.frozen(params, LCFG)
    size = lambda t: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(t))  # noqa: E731
    return 4 * size(base["layers"]) // cfg.n_layers, 4 * size(adapters) // cfg.n_layers


@pytest.fixture(scope="module")
def temps() -> dict[tuple[int, bool], tuple[int, str]]:
    out = {}
    for packed in (True, False):
        for n in (SHALLOW, DEEP):
            c = _compiled(n, packed)
            out[n, packed] = (int(c.memory_analysis().temp_size_in_bytes), c.as_text())
    return out


def _growth_per_layer(temps, packed: bool) -> float:
    return (temps[DEEP, packed][0] - temps[SHALLOW, packed][0]) / (DEEP - SHALLOW)


def test_temp_memory_grows_only_by_the_per_layer_activations(temps):
    cfg = _cfg(DEEP)
    weights_f32, adapters_f32 = _per_layer_bytes(cfg)
    residual_f32 = B * T * cfg.dim * 4      # the layer input remat saves, counted at 4 bytes an element
    allowance = residual_f32 + 4 * adapters_f32   # + gradient, update and Adam temporaries of its adapters
    growth = _growth_per_layer(temps, packed=True)
    unpacked = _growth_per_layer(temps, packed=False)
    print(f"\ntemp: packed {temps[SHALLOW, True][0] / 2**20:.2f} MiB at {SHALLOW} layers, "
          f"{temps[DEEP, True][0] / 2**20:.2f} MiB at {DEEP} ({growth / 2**20:.3f} MiB/layer); unpacked "
          f"{temps[SHALLOW, False][0] / 2**20:.2f} -> {temps[DEEP, False][0] / 2**20:.2f} MiB "
          f"({unpacked / 2**20:.3f} MiB/layer); allowance {allowance / 2**20:.3f} MiB/layer, a float32 copy of "
          f"one layer's weights {weights_f32 / 2**20:.3f} MiB")
    assert growth <= allowance
    assert growth < weights_f32 / 3
    # the same bound catches a base that reaches the program unpacked: XLA:CPU widens every layer to float32
    assert unpacked > allowance and unpacked > weights_f32 / 2


def test_no_float32_or_bfloat16_copy_of_the_stacked_weights(temps):
    """The optimized packed program holds the stacked (layers, in, out) weights only as their uint16 bits;
    the unpacked one converts them to float32."""
    cfg = _cfg(DEEP)
    stacked = f"{DEEP},{cfg.dim},{cfg.hidden_dim}"      # w1 / w3 (w2 is its transpose)
    packed_text, unpacked_text = temps[DEEP, True][1], temps[DEEP, False][1]
    assert re.search(rf"u16\[{stacked}\]", packed_text)
    assert not re.search(rf"(f32|bf16)\[{stacked}\]", packed_text)
    assert re.search(rf"f32\[{stacked}\]", unpacked_text)
