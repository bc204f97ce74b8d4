"""Train state, masked next-token loss, and one sharded jit step (with optional gradient accumulation).

Axis letters: A micro-batches, B rows per micro-batch, T sequence, V vocab.
A batch is a dict of int32 arrays of shape (A, B, T): 'tokens', 'positions', 'segment_ids'
(segment 0 is padding; each packed document has its own id and positions from 0).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mistral_jax import model as model_lib
from mistral_jax import sharding
from mistral_jax.config import ModelConfig
from mistral_jax.loss import chunked_nll

TrainState = dict[str, Any]  # {'step': int32 scalar, 'params': tree, 'opt_state': optax state}
Batch = dict[str, jax.Array]
BATCH_KEYS = ("tokens", "positions", "segment_ids")
LOSS_CHUNK = 512  # sequence positions per output-head/loss chunk
# (params, tokens_BT, positions_BT, segment_ids_BT, *, cfg, dtype, remat) -> (summed NLL, token count)
LossFn = Callable[..., tuple[jax.Array, jax.Array]]


def loss_mask(segment_ids_BT: jax.Array) -> jax.Array:
    """True where token t predicts token t+1 of the same (non-padding) document."""
    same_BT = (segment_ids_BT[:, :-1] == segment_ids_BT[:, 1:]) & (segment_ids_BT[:, :-1] > 0)
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
                loss_chunk: int = LOSS_CHUNK, scan_layers: bool = True) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token NLLs, number of predicted tokens) for one micro-batch.

    The output head and the loss run `loss_chunk` positions at a time (`loss.chunked_nll`), so float32
    (B, T, V) logits are never held at once. remat: "none" | "full" | "dots" (see model.Transformer);
    scan_layers=False runs the per-layer (unscanned) model on a per-layer params tree.
    """
    model = model_lib.Transformer(cfg, dtype=dtype, remat=remat, scan_layers=scan_layers)
    with sharding.with_rules():
        h_BTD, _ = model.apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT, return_hidden=True)
    out_DV = params["output"].astype(h_BTD.dtype)
    nll_BT = chunked_nll(h_BTD, out_DV, jnp.roll(tokens_BT, -1, axis=1), loss_chunk)
    mask_BT = loss_mask(segment_ids_BT)
    return jnp.sum(jnp.where(mask_BT, nll_BT, 0.0)), jnp.sum(mask_BT).astype(jnp.float32)


# ----- state and shardings -----

def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    param_dtype: Any = jnp.float32, scan_layers: bool = True) -> TrainState:
    """NamedShardings of the train state: params by the logical rules; optimizer moments follow their params."""
    param_sh = model_lib.param_shardings(cfg, mesh, param_dtype, scan_layers)
    abstract_opt = jax.eval_shape(optimizer.init, _unboxed_abstract(cfg, param_dtype, scan_layers))
    rep = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract_opt, param_sh,
                                   transform_non_params=lambda _: rep)
    return {"step": rep, "params": param_sh, "opt_state": opt_sh}


def _unboxed_abstract(cfg: ModelConfig, param_dtype: Any, scan_layers: bool = True) -> Any:
    return nn.unbox(model_lib.abstract_params(cfg, param_dtype, scan_layers))


def abstract_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                   param_dtype: Any = jnp.float32, scan_layers: bool = True) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the train state, e.g. as an orbax restore target."""
    shardings = state_shardings(cfg, optimizer, mesh, param_dtype, scan_layers)
    params = _unboxed_abstract(cfg, param_dtype, scan_layers)
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
              "opt_state": jax.eval_shape(optimizer.init, params)}
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  shapes, shardings)


def init_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, rng: jax.Array, mesh: Mesh,
               param_dtype: Any = jnp.float32, params: Any | None = None) -> TrainState:
    """A fresh train state created in its shardings (random params unless `params` is given)."""
    shardings = state_shardings(cfg, optimizer, mesh, param_dtype)
    if params is None:
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

def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    remat: str = "none", loss_fn: LossFn | None = None, scan_layers: bool = True
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns jit(step)(state, batch) -> (state, metrics), state donated, explicit in/out shardings.

    Gradients of the summed token loss are accumulated over the A micro-batches and divided by the
    total token count, so A micro-batches equal one step on the A-times batch. A non-finite loss or
    gradient norm leaves the state unchanged and reports finite=False. `loss_fn` (default
    `summed_loss`) has summed_loss's signature and returns (summed NLL, token count). scan_layers=False
    steps the per-layer (unscanned) model and params tree (kept for comparisons such as compile time).
    """
    if loss_fn is None:
        loss_fn = functools.partial(summed_loss, scan_layers=scan_layers)
    loss_grad = jax.value_and_grad(functools.partial(loss_fn, cfg=cfg, dtype=dtype, remat=remat), has_aux=True)

    def micro(params, mb: Batch):
        (loss_sum, count), grads = loss_grad(params, mb["tokens"], mb["positions"], mb["segment_ids"])
        return loss_sum, count, grads

    def step(state: TrainState, batch: Batch):
        params = state["params"]
        A = batch["tokens"].shape[0]
        if A == 1:
            loss_sum, count, grads = micro(params, {k: v[0] for k, v in batch.items()})
        else:
            def body(carry, mb):
                l_acc, n_acc, g_acc = carry
                l, n, g = micro(params, mb)
                return (l_acc + l, n_acc + n, jax.tree_util.tree_map(jnp.add, g_acc, g)), None
            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            (loss_sum, count, grads), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0), zeros), batch)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": new_opt}
        new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "tokens": count, "finite": finite}
        return new_state, metrics

    state_sh = state_shardings(cfg, optimizer, mesh, param_dtype, scan_layers)
    rep = sharding.replicated(mesh)
    metric_sh = {k: rep for k in ("loss", "grad_norm", "lr", "tokens", "finite")}
    return jax.jit(step, in_shardings=(state_sh, batch_shardings(mesh)), out_shardings=(state_sh, metric_sh),
                   donate_argnums=(0,))


def put_batch(batch: dict[str, Any], mesh: Mesh, grad_accum: int) -> Batch:
    """Host arrays of shape (A*B, T) -> device arrays (A, B, T) in the batch sharding."""
    out = {}
    sh = batch_shardings(mesh)
    for k in BATCH_KEYS:
        x = batch[k]
        n, T = x.shape
        out[k] = jax.device_put(x.reshape(grad_accum, n // grad_accum, T), sh[k])
    return out


def make_eval_step(cfg: ModelConfig, mesh: Mesh, *, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
    """jit(params, batch (1, B, T)) -> (summed NLL, token count), for held-out perplexity."""
    def ev(params, batch):
        return summed_loss(params, batch["tokens"][0], batch["positions"][0], batch["segment_ids"][0],
                           cfg=cfg, dtype=dtype)
    return jax.jit(ev, in_shardings=(model_lib.param_shardings(cfg, mesh, param_dtype), batch_shardings(mesh)))
