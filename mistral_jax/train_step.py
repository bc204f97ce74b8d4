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

from mistral_jax import model as model_lib
from mistral_jax import sharding
from mistral_jax.config import ModelConfig
from mistral_jax.loss import chunked_nll

TrainState = dict[str, Any]  # {'step': int32 scalar, 'params': tree, 'opt_state': optax state}
Batch = dict[str, jax.Array]
BATCH_KEYS = ("tokens", "positions", "segment_ids", "target_mask")
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
    out_DV = params["output"].astype(h_BTD.dtype)
    nll_BT = chunked_nll(h_BTD, out_DV, jnp.roll(tokens_BT, -1, axis=1), loss_chunk)
    mask_BT = loss_mask(segment_ids_BT, target_mask_BT)
    return jnp.sum(jnp.where(mask_BT, nll_BT, 0.0)), jnp.sum(mask_BT).astype(jnp.float32)


# ----- state and shardings -----
# With LoRA (`lora` a lora.LoraConfig) the params tree holds the frozen base weights and the adapters; only
# the adapters are differentiated and only they have optimizer state. Without it, every param trains.

def trainable(tree: Any, lora: Any = None) -> Any:
    """The trained part of a params-shaped tree: all of it, or with LoRA the adapter leaves only."""
    if lora is None:
        return tree
    from mistral_jax import lora as lora_lib
    return lora_lib.split(tree)[0]


def _with_trainable(params: Any, new_trainable: Any, lora: Any = None) -> Any:
    if lora is None:
        return new_trainable
    from mistral_jax import lora as lora_lib
    return lora_lib.join(new_trainable, lora_lib.split(params)[1])


def _lora_kw(lora: Any) -> dict[str, Any]:
    return {} if lora is None else {"lora": lora}


def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    param_dtype: Any = jnp.float32, scan_layers: bool = True, lora: Any = None) -> TrainState:
    """NamedShardings of the train state: params by the logical rules; optimizer moments follow their params."""
    param_sh = model_lib.param_shardings(cfg, mesh, param_dtype, scan_layers, **_lora_kw(lora))
    abstract_opt = jax.eval_shape(optimizer.init, trainable(_unboxed_abstract(cfg, param_dtype, scan_layers, lora),
                                                            lora))
    rep = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract_opt, trainable(param_sh, lora),
                                   transform_non_params=lambda _: rep)
    return {"step": rep, "params": param_sh, "opt_state": opt_sh}


def _unboxed_abstract(cfg: ModelConfig, param_dtype: Any, scan_layers: bool = True, lora: Any = None) -> Any:
    return nn.unbox(model_lib.abstract_params(cfg, param_dtype, scan_layers, **_lora_kw(lora)))


def abstract_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                   param_dtype: Any = jnp.float32, scan_layers: bool = True, lora: Any = None) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the train state, e.g. as an orbax restore target."""
    shardings = state_shardings(cfg, optimizer, mesh, param_dtype, scan_layers, lora)
    params = _unboxed_abstract(cfg, param_dtype, scan_layers, lora)
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
              "opt_state": jax.eval_shape(optimizer.init, trainable(params, lora))}
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  shapes, shardings)


def init_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, rng: jax.Array, mesh: Mesh,
               param_dtype: Any = jnp.float32, params: Any | None = None, lora: Any = None) -> TrainState:
    """A fresh train state created in its shardings (random params unless `params` is given).

    With LoRA, `params` are the base weights and fresh adapters (B = 0) are added from `rng`.
    """
    shardings = state_shardings(cfg, optimizer, mesh, param_dtype, lora=lora)
    if params is None:
        params = model_lib.init_params(cfg, rng, mesh, param_dtype, **_lora_kw(lora))
    else:
        if lora is not None:
            from mistral_jax import lora as lora_lib
            params = lora_lib.add_adapters(params, cfg, lora, rng)
        params = jax.device_put(jax.tree_util.tree_map(lambda x: jnp.asarray(x, param_dtype), params),
                                shardings["params"])
    opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(trainable(params, lora))
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
                    lora: Any = None) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns jit(step)(state, batch) -> (state, metrics), state donated, explicit in/out shardings.

    Gradients of the summed token loss are accumulated over the A micro-batches and divided by the
    total token count, so A micro-batches equal one step on the A-times batch. A non-finite loss,
    gradient norm or updated trained param leaves the state unchanged and reports finite=False (with
    loss and grad_norm finite, it was the update). `loss_fn` (default
    `summed_loss`) has summed_loss's signature and returns (summed NLL, token count). scan_layers=False
    steps the per-layer (unscanned) model and params tree (kept for comparisons such as compile time).
    With `lora` only the adapters are differentiated and updated; the base weights pass through unchanged.
    """
    if loss_fn is None:
        loss_fn = functools.partial(summed_loss, scan_layers=scan_layers)
    loss = functools.partial(loss_fn, cfg=cfg, dtype=dtype, remat=remat, **_lora_kw(lora))

    def micro(params, mb: Batch):
        def of_trained(t):
            return loss(_with_trainable(params, t, lora), mb["tokens"], mb["positions"], mb["segment_ids"],
                        target_mask_BT=mb["target_mask"])
        (loss_sum, count), grads = jax.value_and_grad(of_trained, has_aux=True)(trainable(params, lora))
        return loss_sum, count, grads

    def step(state: TrainState, batch: Batch):
        with sharding.with_rules(mesh):     # the model's activation constraints need the mesh while tracing
            return _step(state, batch)

    def _step(state: TrainState, batch: Batch):
        params = state["params"]
        A = batch["tokens"].shape[0]
        if A == 1:
            loss_sum, count, grads = micro(params, {k: v[0] for k, v in batch.items()})
        else:
            def body(carry, mb):
                l_acc, n_acc, g_acc = carry
                l, n, g = micro(params, mb)
                return (l_acc + l, n_acc + n, jax.tree_util.tree_map(jnp.add, g_acc, g)), None
            zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable(params, lora))
            (loss_sum, count, grads), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0), zeros), batch)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.global_norm(grads)
        trained = trainable(params, lora)
        updates, new_opt = optimizer.update(grads, state["opt_state"], trained)
        new_trained = optax.apply_updates(trained, updates)
        # finite loss and gradients do not make finite params (an lr or weight decay past float32's range,
        # an overflowing update): check what the step would keep, in the same program (frozen LoRA base
        # weights do not change, so only the trained leaves are checked)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_trained)
        new_params = _with_trainable(params, new_trained, lora)
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": new_opt}
        new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "tokens": count, "finite": finite}
        return new_state, metrics

    state_sh = state_shardings(cfg, optimizer, mesh, param_dtype, scan_layers, lora)
    rep = sharding.replicated(mesh)
    metric_sh = {k: rep for k in ("loss", "grad_norm", "lr", "tokens", "finite")}
    return jax.jit(step, in_shardings=(state_sh, batch_shardings(mesh)), out_shardings=(state_sh, metric_sh),
                   donate_argnums=(0,))


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
                   ) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
    """jit(params, batch (1, B, T)) -> (summed NLL over targets, target count), for held-out loss."""
    def ev(params, batch):
        with sharding.with_rules(mesh):     # the model's activation constraints need the mesh while tracing
            return summed_loss(params, batch["tokens"][0], batch["positions"][0], batch["segment_ids"][0],
                               cfg=cfg, dtype=dtype, target_mask_BT=batch["target_mask"][0], **_lora_kw(lora))
    return jax.jit(ev, in_shardings=(model_lib.param_shardings(cfg, mesh, param_dtype, **_lora_kw(lora)),
                                     batch_shardings(mesh)))
