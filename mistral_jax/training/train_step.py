"""Train state, masked next-token loss, and one sharded jit step (with optional gradient accumulation).

Axis letters: A micro-batches, B rows per micro-batch, T sequence, V vocab.
A batch is a dict of int32 arrays of shape (A, B, T): 'tokens', 'positions', 'segment_ids'
(segment 0 is padding; each packed document has its own id and positions from 0) and 'target_mask'
(1 where tokens[t] is a trained target: every real token in pretraining, assistant answers and their
closing EOS in instruction fine-tuning).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mistral_jax.model import lora as lora_lib
from mistral_jax.model import packing
from mistral_jax.model import sharding
from mistral_jax.data.rows import BATCH_KEYS
from mistral_jax.model import transformer as model_lib
from mistral_jax.model.config import ModelConfig
from mistral_jax.training.loss import chunked_nll

# {'step': int32 scalar, 'params': the trained params (with LoRA: the adapters only), 'opt_state': optax state}
TrainState = dict[str, Any]
Batch = dict[str, jax.Array]
LOSS_CHUNK = 512  # sequence positions per output-head/loss chunk
# (params, tokens_BT, positions_BT, segment_ids_BT, *, target_mask_BT, cfg, dtype, remat, lora)
#   -> (summed NLL, token count)
LossFn = Callable[..., tuple[jax.Array, jax.Array]]


def loss_mask(segment_ids_BT: jax.Array, target_mask_BT: jax.Array | None = None) -> jax.Array:
    """True where the prediction made at t counts: token t+1 is in the same (non-padding) document and,
    with a target mask, is a target (target_mask_BT[:, t+1] != 0)."""
    same_BT = (segment_ids_BT[:, :-1] == segment_ids_BT[:, 1:]) & (segment_ids_BT[:, :-1] > 0)
    if target_mask_BT is not None:
        same_BT &= target_mask_BT[:, 1:] != 0
    return jnp.pad(same_BT, ((0, 0), (0, 1)))


def token_nll(logits_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
    """Float32 negative log-likelihood of the next token at each position (the last position is junk).

    The unchunked form, from full logits; the training and evaluation losses use `loss.chunked_nll`.
    """
    targets_BT = jnp.roll(tokens_BT, -1, axis=1)
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    # a one-hot contraction, not a gather: its gradient is elementwise (a gather's is a slow scatter on CPU)
    # and it partitions cleanly when the vocab axis is sharded.
    onehot_BTV = targets_BT[..., None] == jnp.arange(logits_BTV.shape[-1], dtype=targets_BT.dtype)
    target_logit_BT = jnp.sum(jnp.where(onehot_BTV, logits_BTV, 0.0), axis=-1)
    return lse_BT - target_logit_BT


def summed_loss(params: Any, tokens_BT: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
                cfg: ModelConfig, dtype: Any = jnp.float32, remat: str = "none",
                loss_chunk: int = LOSS_CHUNK, scan_layers: bool = True, target_mask_BT: jax.Array | None = None,
                lora: Any = None) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token NLLs, number of predicted tokens) for one micro-batch.

    A prediction counts when its target is in the same document and, given target_mask_BT, marked as a
    target (see `loss_mask`). The output head and the loss run `loss_chunk` positions at a time
    (`loss.chunked_nll`), so float32 (B, T, V) logits are never held at once. remat: "none" | "full" |
    "dots" (see model.Transformer); scan_layers=False runs the per-layer (unscanned) model on a per-layer
    params tree; lora (a lora.LoraConfig) adds the low-rank adapters held in params. Under a mesh, call it
    inside `sharding.with_rules(mesh)` so the model's activation constraints apply.
    """
    extra = {} if lora is None else {"lora": lora}
    model = model_lib.Transformer(cfg, dtype=dtype, remat=remat, scan_layers=scan_layers, **extra)
    with sharding.with_rules():
        h_BTD, _ = model.apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT, return_hidden=True)
    nll_BT = chunked_nll(h_BTD, params["output"], jnp.roll(tokens_BT, -1, axis=1), loss_chunk)
    mask_BT = loss_mask(segment_ids_BT, target_mask_BT)
    return jnp.sum(jnp.where(mask_BT, nll_BT, 0.0)), jnp.sum(mask_BT).astype(jnp.float32)


# ----- state and shardings -----
# With LoRA (`lora` a lora.LoraConfig) the frozen base weights live outside the train state: the state holds
# the adapters (its 'params'), their optimizer state and the step, and the base is a separate, non-donated
# argument of the jitted programs (packed: see `mistral_jax.model.packing`), so no step copies or checkpoints it.
# Without LoRA the state's 'params' are the whole model and every param trains.

def trainable(tree: Any, lora: Any = None) -> Any:
    """The trained part of a params-shaped tree: all of it, or with LoRA the adapter leaves only."""
    if lora is None:
        return tree
    return lora_lib.split(tree)[0]


def frozen(tree: Any, lora: Any = None) -> Any:
    """The frozen part of a params-shaped tree: nothing (None) without LoRA, with it the base leaves."""
    if lora is None:
        return None
    return lora_lib.split(tree)[1]


def with_base(trained: Any, base: Any, lora: Any = None) -> Any:
    """The model's whole params tree from the trained params and the frozen base (None without LoRA); the
    leaves are not copied (the inverse of `trainable` / `frozen`)."""
    if lora is None:
        return trained
    return lora_lib.join(trained, base)


def _lora_kw(lora: Any) -> dict[str, Any]:
    return {} if lora is None else {"lora": lora}


def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    param_dtype: Any = jnp.float32, scan_layers: bool = True, lora: Any = None) -> TrainState:
    """NamedShardings of the train state: the trained params by the logical rules; optimizer moments follow
    their params. With LoRA the state's params are the adapters only (see `base_shardings`)."""
    param_sh = trainable(model_lib.param_shardings(cfg, mesh, param_dtype, scan_layers, **_lora_kw(lora)), lora)
    abstract_opt = jax.eval_shape(optimizer.init, trainable(_unboxed_abstract(cfg, param_dtype, scan_layers, lora),
                                                            lora))
    rep = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract_opt, param_sh,
                                   transform_non_params=lambda _: rep)
    return {"step": rep, "params": param_sh, "opt_state": opt_sh}


def base_shardings(cfg: ModelConfig, mesh: Mesh, lora: Any, param_dtype: Any = jnp.float32,
                   scan_layers: bool = True) -> Any:
    """NamedShardings of LoRA's frozen base weights (packed or not: a packed weight has the same shape)."""
    return frozen(model_lib.param_shardings(cfg, mesh, param_dtype, scan_layers, lora=lora), lora)


def _unboxed_abstract(cfg: ModelConfig, param_dtype: Any, scan_layers: bool = True, lora: Any = None) -> Any:
    return nn.unbox(model_lib.abstract_params(cfg, param_dtype, scan_layers, **_lora_kw(lora)))


def _placed(shapes: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  shapes, shardings)


def abstract_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                   param_dtype: Any = jnp.float32, scan_layers: bool = True, lora: Any = None) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the train state, e.g. as an orbax restore target."""
    shardings = state_shardings(cfg, optimizer, mesh, param_dtype, scan_layers, lora)
    params = trainable(_unboxed_abstract(cfg, param_dtype, scan_layers, lora), lora)
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
              "opt_state": jax.eval_shape(optimizer.init, params)}
    return _placed(shapes, shardings)


def abstract_base(cfg: ModelConfig, mesh: Mesh, lora: Any, param_dtype: Any = jnp.float32,
                  scan_layers: bool = True, packed: bool = True) -> Any:
    """ShapeDtypeStructs (with shardings) of LoRA's frozen base as the train and eval steps receive it:
    `packing.pack`ed (bfloat16 on the CPU backend as uint16) unless packed=False."""
    shardings = base_shardings(cfg, mesh, lora, param_dtype, scan_layers)
    base = _placed(frozen(_unboxed_abstract(cfg, param_dtype, scan_layers, lora), lora), shardings)
    if not (packed and packing.on_cpu(mesh.devices.flat)):
        return base
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, packing.PACKED, sharding=s.sharding) if s.dtype == jnp.bfloat16
        else s, base)


def init_base(cfg: ModelConfig, rng: jax.Array, mesh: Mesh, param_dtype: Any = jnp.float32) -> Any:
    """Random base weights for a LoRA run without --init-from: the params `model.init_params` draws from
    `rng` (the same as a full-training run's from the same seed), in their shardings."""
    return model_lib.init_params(cfg, rng, mesh, param_dtype)


def init_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, rng: jax.Array, mesh: Mesh,
               param_dtype: Any = jnp.float32, params: Any | None = None, lora: Any = None,
               adapters: Any = None) -> TrainState:
    """A fresh train state created in its shardings (random params unless `params` is given).

    With LoRA, `params` are the frozen base weights (required; e.g. `init_base`): the state holds the adapters
    only (the base is not copied): `adapters` when given (e.g. `peft.load_peft_adapter`'s), else fresh ones
    (B = 0) drawn from `rng`.
    """
    shardings = state_shardings(cfg, optimizer, mesh, param_dtype, lora=lora)
    if lora is not None:
        if params is None:
            raise ValueError("init_state: a LoRA state needs the base weights (params=...), e.g. from init_base")
        if adapters is None:
            adapters = trainable(lora_lib.add_adapters(params, cfg, lora, rng), lora)
        params = jax.device_put(jax.tree_util.tree_map(lambda x: jnp.asarray(x, param_dtype), adapters),
                                shardings["params"])
    elif params is None:
        params = model_lib.init_params(cfg, rng, mesh, param_dtype)
    else:
        params = jax.device_put(jax.tree_util.tree_map(lambda x: jnp.asarray(x, param_dtype), params),
                                shardings["params"])
    opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    return {"step": step, "params": params, "opt_state": opt_state}


def batch_shardings(mesh: Mesh) -> Batch:
    """(A, B, T) batch arrays: micro-batch axis replicated, rows over (data, fsdp)."""
    sh = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None))
    return {k: sh for k in BATCH_KEYS}


def check_batch_shape(mesh: Mesh, grad_accum: int, batch_size: int) -> None:
    """Raises a ValueError when the per-micro-batch rows do not split over the (data, fsdp) axes."""
    if batch_size % grad_accum:
        raise ValueError(f"batch_size={batch_size} is not divisible by grad_accum={grad_accum}")
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if (batch_size // grad_accum) % n:
        raise ValueError(f"micro-batch of {batch_size // grad_accum} rows (batch_size={batch_size} / "
                         f"grad_accum={grad_accum}) cannot be split over data*fsdp={n} devices")


# ----- the step -----

def all_finite(tree: Any) -> jax.Array:
    """A bool scalar: every element of every leaf of `tree` is finite (True for an empty tree)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return functools.reduce(jnp.logical_and, (jnp.all(jnp.isfinite(x)) for x in leaves), jnp.bool_(True))


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    remat: str = "none", loss_fn: LossFn | None = None, scan_layers: bool = True,
                    lora: Any = None) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Returns jit(step)(state, batch) -> (state, metrics), or with LoRA jit(step)(state, base, batch);
    state donated, explicit in/out shardings.

    Gradients of the summed token loss are accumulated over the A micro-batches and divided by the
    total token count, so A micro-batches equal one step on the A-times batch. A non-finite loss,
    gradient norm or updated trained param leaves the state unchanged and reports finite=False (with
    loss and grad_norm finite, it was the update). `loss_fn` (default
    `summed_loss`) has summed_loss's signature and returns (summed NLL, token count). scan_layers=False
    steps the per-layer (unscanned) model and params tree (kept for comparisons such as compile time).
    With `lora` the state holds the adapters, the only params differentiated and updated; `base` (the
    frozen weights, best `packing.pack`ed: see `abstract_base`) is read, never donated, copied or returned.
    """
    if loss_fn is None:
        loss_fn = functools.partial(summed_loss, scan_layers=scan_layers)
    loss = functools.partial(loss_fn, cfg=cfg, dtype=dtype, remat=remat, **_lora_kw(lora))

    def micro(trained: Any, base: Any, mb: Batch) -> tuple[jax.Array, jax.Array, Any]:
        def of_trained(t):
            return loss(with_base(t, base, lora), mb["tokens"], mb["positions"], mb["segment_ids"],
                        target_mask_BT=mb["target_mask"])
        (loss_sum, count), grads = jax.value_and_grad(of_trained, has_aux=True)(trained)
        return loss_sum, count, grads

    def step(state: TrainState, *base_and_batch: Any):
        base, batch = base_and_batch if lora is not None else (None, *base_and_batch)
        with sharding.with_rules(mesh):     # the model's activation constraints need the mesh while tracing
            return _step(state, base, batch)

    def _step(state: TrainState, base: Any, batch: Batch):
        trained = state["params"]
        A = batch["tokens"].shape[0]
        if A == 1:
            loss_sum, count, grads = micro(trained, base, {k: v[0] for k, v in batch.items()})
        else:
            def body(carry, mb):
                l_acc, n_acc, g_acc = carry
                l, n, g = micro(trained, base, mb)
                return (l_acc + l, n_acc + n, jax.tree_util.tree_map(jnp.add, g_acc, g)), None
            zeros = jax.tree_util.tree_map(jnp.zeros_like, trained)
            (loss_sum, count, grads), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0), zeros), batch)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.global_norm(grads)
        updates, new_opt = optimizer.update(grads, state["opt_state"], trained)
        new_trained = optax.apply_updates(trained, updates)
        # finite loss and gradients do not make finite params (an lr or weight decay past float32's range,
        # an overflowing update): check what the step would keep, in the same program
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_trained)
        new_state = {"step": state["step"] + 1, "params": new_trained, "opt_state": new_opt}
        new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "tokens": count, "finite": finite}
        return new_state, metrics

    state_sh = state_shardings(cfg, optimizer, mesh, param_dtype, scan_layers, lora)
    base_sh = () if lora is None else (base_shardings(cfg, mesh, lora, param_dtype, scan_layers),)
    rep = sharding.replicated(mesh)
    metric_sh = {k: rep for k in ("loss", "grad_norm", "lr", "tokens", "finite")}
    return jax.jit(step, in_shardings=(state_sh, *base_sh, batch_shardings(mesh)),
                   out_shardings=(state_sh, metric_sh), donate_argnums=(0,))


def put_batch(batch: dict[str, Any], mesh: Mesh, grad_accum: int, shards: int = 1) -> Batch:
    """This process's host rows -> global device arrays (A, B, T) in the batch sharding.

    `batch` holds (n, T) arrays: the rows of `shards` consecutive data shards (n / shards rows each).
    Micro-batch a takes rows [a*r, (a+1)*r) of every shard (r = rows per shard / A), so the split does not
    depend on how shards are spread over processes. With several processes each passes its own rows and
    the global array is assembled from them (`jax.make_array_from_process_local_data`). A batch without
    'target_mask' (pretraining) trains on every real token: target_mask = segment_ids > 0.
    """
    out = {}
    sh = batch_shardings(mesh)
    if "target_mask" not in batch:
        batch = {**batch, "target_mask": (np.asarray(batch["segment_ids"]) > 0).astype(np.int32)}
    for k in BATCH_KEYS:
        x = np.asarray(batch[k])
        n, T = x.shape
        if n % (shards * grad_accum):
            raise ValueError(f"put_batch: {n} rows do not split into {shards} shard(s) x {grad_accum} micro-batches")
        local = x.reshape(shards, grad_accum, n // (shards * grad_accum), T).swapaxes(0, 1)
        local = local.reshape(grad_accum, n // grad_accum, T)
        if jax.process_count() == 1:
            out[k] = jax.device_put(local, sh[k])
        else:
            global_shape = (grad_accum, n * jax.process_count() // grad_accum, T)
            out[k] = jax.make_array_from_process_local_data(sh[k], local, global_shape)
    return out


def make_eval_step(cfg: ModelConfig, mesh: Mesh, *, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32, lora: Any = None
                   ) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """jit(params, batch (1, B, T)) -> (summed NLL over targets, target count), for held-out loss; with LoRA
    jit(adapters, base, batch), the frozen base as for the train step (best packed)."""
    def ev(params, *base_and_batch):
        base, batch = base_and_batch if lora is not None else (None, *base_and_batch)
        with sharding.with_rules(mesh):     # the model's activation constraints need the mesh while tracing
            return summed_loss(with_base(params, base, lora), batch["tokens"][0], batch["positions"][0],
                               batch["segment_ids"][0], cfg=cfg, dtype=dtype, target_mask_BT=batch["target_mask"][0],
                               **_lora_kw(lora))
    param_sh = model_lib.param_shardings(cfg, mesh, param_dtype, **_lora_kw(lora))
    in_sh = (param_sh,) if lora is None else (trainable(param_sh, lora), frozen(param_sh, lora))
    return jax.jit(ev, in_shardings=(*in_sh, batch_shardings(mesh)))
