"""Per-device memory of a training layout: exact state bytes from the shardings, and the compiled train
step's own memory analysis (on simulated devices when the mesh needs more than exist)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.model import sharding
from mistral_jax.model.config import ModelConfig
from mistral_jax.model.lora_config import LoraConfig
from mistral_jax.training import optim
from mistral_jax.training import train_step as ts
from mistral_jax.training.run_config import OptimSection

GiB = 2 ** 30
DEVICE_MEMORY = {"v5e": 16 * GiB, "v5p": 95 * GiB, "h100": 80 * GiB, "h200": 141 * GiB, "v4": 32 * GiB}
# The most devices a plan simulates on the CPU (XLA's host platform): each costs about 0.1 MB and start-up time
# (4096: ~0.6 GB, ~7 s); 100,000 took 18.8 GB before the kernel killed the process.
MAX_SIMULATED_DEVICES = 4096


def check_layout(mesh_shape: tuple[int, int, int], seq_len: int, batch: int, grad_accum: int = 1,
                 lora_rank: int = 0, max_devices: int | None = MAX_SIMULATED_DEVICES) -> None:
    """Raises ValueError (one line naming the flag) unless the layout can be planned: sizes >= 1, at most
    `max_devices` devices, and a batch that splits into grad_accum micro-batches whose rows split over the
    data x fsdp devices (what the train step requires). Pure arithmetic: safe before jax starts."""
    for name, v, lo in (("--seq-len", seq_len, 1), ("--batch", batch, 1), ("--grad-accum", grad_accum, 1),
                        ("--lora-rank", lora_rank, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if len(mesh_shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in mesh_shape):
        raise ValueError(f"--mesh: expected three axis sizes >= 1 (data, fsdp, tensor), got {mesh_shape!r}")
    n = math.prod(mesh_shape)
    if max_devices is not None and n > max_devices:
        raise ValueError(f"--mesh data={mesh_shape[0]},fsdp={mesh_shape[1]},tensor={mesh_shape[2]} needs {n} "
                         f"devices; a plan simulates at most {max_devices} on the CPU")
    if batch % grad_accum:
        raise ValueError(f"--batch {batch} is not divisible by --grad-accum {grad_accum}")
    rows, shards = batch // grad_accum, mesh_shape[0] * mesh_shape[1]
    if rows % shards:
        raise ValueError(f"--batch {batch} / --grad-accum {grad_accum} = {rows} rows per micro-batch cannot be "
                         f"split over data*fsdp = {shards} devices; use a multiple of {shards * grad_accum}")


@dataclasses.dataclass
class Plan:
    """Bytes on the most loaded device (state parts exact; compiled parts from XLA's memory analysis)."""
    params: int
    opt_state: int
    grads: int                       # one gradient per trained param, in the param dtype
    batch: int
    compiled: dict[str, int] | None  # argument / output / temp / generated code bytes of the step program
    n_params: int                    # global parameter count
    n_trained: int

    def total(self) -> int:
        """Peak estimate: the compiled program's arguments (state + batch) plus its temporaries when compiled
        (gradients and activations live there), else state + gradients."""
        if self.compiled is not None:
            return self.compiled["argument"] + self.compiled["temp"] + self.compiled["code"]
        return self.params + self.opt_state + self.grads + self.batch


def per_device_bytes(tree: Any) -> int:
    """Bytes of the largest per-device share of a tree of ShapeDtypeStructs with NamedShardings (leaves are
    summed per device, so a device holding more shards of uneven leaves is counted as it is)."""
    per_device: dict[int, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        sh = leaf.sharding
        nbytes = math.prod(sh.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for d in sh.mesh.devices.flat:
            per_device[d.id] = per_device.get(d.id, 0) + nbytes
    return max(per_device.values(), default=0)


def plan(cfg: ModelConfig, mesh_shape: tuple[int, int, int], seq_len: int, batch: int, *, remat: str = "full",
         dtype: Any = jnp.bfloat16, param_dtype: Any = jnp.float32, grad_accum: int = 1, lora_rank: int = 0,
         compile: bool = True) -> Plan:
    """The memory plan of one train step of `batch` rows x `seq_len` tokens on a (data, fsdp, tensor) mesh."""
    check_layout(mesh_shape, seq_len, batch, grad_accum, lora_rank, max_devices=None)
    n_dev = math.prod(mesh_shape)
    if len(jax.devices()) < n_dev:
        raise ValueError(f"mesh {mesh_shape} needs {n_dev} devices, {len(jax.devices())} exist (set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n_dev} before jax starts)")
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:n_dev])
    lora = LoraConfig(rank=lora_rank) if lora_rank else None
    o = OptimSection(grad_accum=grad_accum)
    opt = optim.make_optimizer(o, 1000)
    state = ts.abstract_state(cfg, opt, mesh, param_dtype, lora=lora)
    trained = ts.trainable(state["params"], lora)
    bsh = ts.batch_shardings(mesh)
    abatch = {k: jax.ShapeDtypeStruct((grad_accum, batch // grad_accum, seq_len), jnp.int32, sharding=bsh[k])
              for k in ts.BATCH_KEYS}
    # LoRA's frozen base is a separate argument of the step (not in the state): counted with the params
    base = None if lora is None else ts.abstract_base(cfg, mesh, lora, param_dtype)
    compiled = None
    if compile:
        step = ts.make_train_step(cfg, opt, optim.learning_rate_schedule(o, 1000), mesh, dtype=dtype,
                                  param_dtype=param_dtype, remat=remat, lora=lora)
        lowered = step.lower(state, abatch) if base is None else step.lower(state, base, abatch)
        m = lowered.compile().memory_analysis()
        compiled = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
                    "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes),
                    "code": int(m.generated_code_size_in_bytes)}
    size = lambda t: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(t))  # noqa: E731
    params = state["params"] if base is None else (state["params"], base)
    return Plan(params=per_device_bytes(params), opt_state=per_device_bytes(state["opt_state"]),
                grads=per_device_bytes(trained), batch=per_device_bytes(abatch), compiled=compiled,
                n_params=size(params), n_trained=size(trained))


def parse_memory(text: str) -> int:
    """Bytes (> 0) from a device name (v5e, v5p, h100, h200, v4) or a finite size such as '16GiB', '80GB',
    '1.5e10'; ValueError naming --device-memory otherwise."""
    t = text.strip().lower()
    if t in DEVICE_MEMORY:
        return DEVICE_MEMORY[t]
    for suffix, mult in (("gib", GiB), ("gb", 10 ** 9), ("mib", 2 ** 20), ("mb", 10 ** 6), ("", 1)):
        if t.endswith(suffix):
            try:
                value = float(t[:len(t) - len(suffix)] if suffix else t) * mult
            except ValueError:
                break
            if math.isfinite(value) and value >= 1:
                return int(value)
            break
    raise ValueError(f"--device-memory: expected one of {sorted(DEVICE_MEMORY)} or a positive size like 16GiB, "
                     f"got {text!r}")
