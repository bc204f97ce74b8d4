"""train.plan: per-device state bytes equal those of the arrays actually created on the mesh; 7B counts."""

import jax
import pytest

from mistral_jax import memory_plan as mp
from mistral_jax import optim, sharding
from mistral_jax import train_step as ts
from mistral_jax.config import ModelConfig
from mistral_jax.run_config import OptimSection
from train import plan as plan_cli


def _measured(tree) -> int:
    per_device: dict[int, int] = {}
    for x in jax.tree_util.tree_leaves(tree):
        for s in x.addressable_shards:
            per_device[s.device.id] = per_device.get(s.device.id, 0) + s.data.nbytes
    return max(per_device.values())


def test_state_bytes_equal_the_created_arrays():
    cfg = ModelConfig.preset("tiny")
    p = mp.plan(cfg, (2, 2, 2), 32, 8, compile=True)
    mesh = sharding.make_mesh(2, 2, 2, devices=jax.devices()[:8])
    state = ts.init_state(cfg, optim.make_optimizer(OptimSection(), 1000), jax.random.key(0), mesh)
    assert p.params == _measured(state["params"]) > 0
    assert p.opt_state == _measured(state["opt_state"])
    assert p.grads == p.params and p.n_params == p.n_trained
    assert p.compiled["argument"] >= p.params + p.opt_state and p.compiled["temp"] > 0


def test_7b_counts_and_cli(capsys):
    cfg = ModelConfig.preset("mistral-7b-v0.1")
    p = mp.plan(cfg, (1, 8, 1), 4096, 8, compile=False)
    assert p.n_params == 7_241_732_096
    # every 7B weight splits evenly 8 ways over fsdp except the norms (replicated): 65 x 4096 floats
    norms = (2 * 32 + 1) * 4096
    assert p.params == ((7_241_732_096 - norms) // 8 + norms) * 4
    assert 2 * p.params <= p.opt_state <= 2 * p.params + 64   # Adam mu and nu, plus int32 step counts
    lora = mp.plan(cfg, (1, 8, 1), 4096, 8, lora_rank=16, compile=False)
    assert lora.n_trained == 41_943_040 and lora.opt_state < p.opt_state / 20   # B factors: not split by fsdp
    assert plan_cli.main(["--mesh", "data=1,fsdp=8,tensor=1", "--seq-len", "4096", "--batch", "8", "--no-compile",
                          "--device-memory", "12GiB"]) == 0
    out = capsys.readouterr().out
    assert "7,241,732,096 params" in out and "does NOT fit" in out     # 3.4 + 6.7 + 3.4 GiB > 12 GiB
    assert plan_cli.main(["--mesh", "data=1,fsdp=8,tensor=1", "--seq-len", "64", "--batch", "8",
                          "--device-memory", "lots"]) == 2
    assert "--device-memory: expected one of" in capsys.readouterr().err


def test_fsdp_keeps_activations_split_over_the_batch():
    """With params sharded over fsdp and one row per device, the step's temporaries must not exceed those of
    pure data parallelism (same per-device rows): the model's activation constraints keep the batch split.
    When they were silently dropped (no mesh while tracing), the partitioner replicated the batch and split
    the embedding dim instead, and temp memory grew with the fsdp size (3x at fsdp=8)."""
    cfg = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=768, vocab_size=32000,
                      sliding_window=4096, max_seq_len=512)
    temp = {m: mp.plan(cfg, m, 512, 8, remat="none").compiled["temp"] for m in ((8, 1, 1), (1, 8, 1))}
    assert temp[(1, 8, 1)] <= 1.05 * temp[(8, 1, 1)], temp
