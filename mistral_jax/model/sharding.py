"""Device mesh over (data, fsdp, tensor) and the logical-axis rules that place params and activations."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or axes). Params use embed/vocab/mlp/*_heads; activations use act_*.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),          # the stacked (scanned) layer axis: every device holds all layers' slices
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("length", None),
    ("cache_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


MESH_SYNTAX = "data,fsdp,tensor as D,F,T (e.g. 1,8,1) or data=D,fsdp=F,tensor=T (omitted axes are 1)"


def parse_mesh(text: str, allow_rest: bool = True) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) shape written as `D,F,T` (e.g. `1,8,1`) or `data=D,fsdp=F,tensor=T` (any
    order; an omitted axis is 1), the one mesh syntax of every program (train.plan, infer.*).

    Sizes are integers >= 1; with allow_rest, one axis may be -1 (make_mesh gives it the remaining devices).
    Raises ValueError (one line, starting "expected data,fsdp,tensor") for anything else: empty text,
    unknown or repeated axis names, a mix of the two forms, a wrong count, non-integers, 0 or -2.
    """
    def fail(why: str) -> ValueError:
        rest = " (one may be -1: the remaining devices)" if allow_rest else ""
        return ValueError(f"expected {MESH_SYNTAX}, sizes >= 1{rest}; {why}, got {text!r}")

    if not isinstance(text, str) or not text.strip():
        raise fail("it is empty")
    parts = [p.strip() for p in text.split(",")]
    named = ["=" in p for p in parts]
    if any(named) and not all(named):
        raise fail("mixes D,F,T and name=size")
    if all(named):
        sizes: dict[str, str] = {}
        for p in parts:
            key, _, value = (s.strip() for s in p.partition("="))
            if key not in MESH_AXES:
                raise fail(f"unknown axis {key!r}")
            if key in sizes:
                raise fail(f"axis {key!r} given twice")
            sizes[key] = value
        raw = [sizes.get(k, "1") for k in MESH_AXES]
    else:
        if len(parts) != len(MESH_AXES):
            raise fail(f"{len(parts)} size(s) instead of 3")
        raw = parts
    shape = []
    for name, value in zip(MESH_AXES, raw):
        try:
            v = int(value)
        except ValueError:
            raise fail(f"{name} size {value!r} is not an integer") from None
        if v < 1 and not (allow_rest and v == -1):
            raise fail(f"{name} size {v} is not >= 1" + (" or -1" if allow_rest else ""))
        shape.append(v)
    if shape.count(-1) > 1:
        raise fail("more than one axis is -1")
    return shape[0], shape[1], shape[2]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one axis may be -1 to take the rest.

    Device order comes from `jax.make_mesh` (topology-aware on TPU); axes are Auto, so placement follows
    NamedShardings and the logical rules.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if known < 1 or len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices not divisible by data*fsdp*tensor={known}")
        shape[shape.index(-1)] = len(devices) // known
    if any(s < 1 for s in shape) or math.prod(shape) != len(devices):
        raise ValueError(f"make_mesh: mesh shape data={shape[0]} fsdp={shape[1]} tensor={shape[2]} "
                         f"needs {math.prod(shape)} devices, have {len(devices)}")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_shardings(logical_specs: Any, mesh: Mesh, shapes: Any | None = None) -> Any:
    """Maps a tree of logical PartitionSpecs to NamedShardings; checks divisibility when shapes are given."""
    shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)
    if shapes is not None:
        flat_sh, _ = jax.tree_util.tree_flatten_with_path(shardings)
        flat_shapes = jax.tree_util.tree_leaves(shapes)
        for (path, sh), leaf in zip(flat_sh, flat_shapes):
            check_divisible(jax.tree_util.keystr(path), leaf.shape, sh)
    return shardings


def check_divisible(name: str, shape: Sequence[int], sharding: NamedSharding) -> None:
    """Raises a ValueError naming the tensor when a dimension does not split evenly over its mesh axes."""
    for dim, axes in zip(shape, sharding.spec):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else axes
        n = math.prod(sharding.mesh.shape[a] for a in axes)
        if dim % n:
            raise ValueError(f"{name}: dimension {dim} of shape {tuple(shape)} cannot be split over mesh "
                             f"axes {axes} of total size {n}; choose a mesh that divides it")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding for a (batch, ...) array: batch over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


@contextlib.contextmanager
def with_rules(mesh: Mesh | None = None) -> Iterator[None]:
    """Context manager installing LOGICAL_RULES for activation constraints inside jit, and `mesh` as the
    abstract mesh while tracing. Without a mesh, flax's logical constraints are silently dropped and the
    partitioner chooses activation shardings itself: with params sharded over fsdp it replicated the
    batch and split the embedding dim instead (every device computing the whole global batch)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
        if mesh is not None:
            stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
        yield
