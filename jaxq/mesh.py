"""Device meshes and the layouts of plain parameter trees on them.

Generic ``jax.sharding`` helpers, nothing quantization-specific (that is
:mod:`jaxq.sharding`):

* meshes: :func:`make_mesh`, :func:`parse_mesh` (``"data=4,model=2"``);
* layouts: :func:`param_shardings` (a simple tensor-parallel rule for a params tree),
  :func:`opt_state_shardings` (optax state following the params), :func:`batch_sharding`;
* per-shard randomness inside ``jax.shard_map``: :func:`shard_key` / :func:`shard_seed`
  fold the shard's linear index into a key (or seed), so that per-shard stochastic
  rounding is independent across shards and reproducible;
* PartitionSpec plumbing shared with :mod:`jaxq.sharding`: :func:`present_axes`,
  :func:`axis_size`, :func:`spec_entries`, :func:`trimmed_spec`.

See ``docs/scaling.md`` for the recipe (data x model meshes, multi-host).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxq import numerics
from jaxq.param_tree import key_name

PyTree = Any
AxisNames = str | Sequence[str] | None

DATA, MODEL = "data", "model"

__all__ = [
    "DATA", "MODEL", "AxisNames", "make_mesh", "parse_mesh", "batch_sharding", "param_spec",
    "param_shardings", "opt_state_shardings", "shard_key", "shard_seed", "present_axes",
    "axis_size", "spec_entries", "trimmed_spec",
]


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=4,model=2"`` -> ``{"data": 4, "model": 2}`` (order kept; sizes >= 1)."""
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"mesh must be a string like 'data=4,model=2'; got {text!r}")
  out: dict[str, int] = {}
  for part in text.split(","):
    name, sep, size = part.partition("=")
    name = name.strip()
    if not sep or not name or not size.strip().isdigit() or int(size) < 1:
      raise ValueError(f"mesh entry {part!r} of {text!r} must be NAME=SIZE with SIZE >= 1")
    if name in out:
      raise ValueError(f"mesh axis {name!r} given twice in {text!r}")
    out[name] = int(size)
  return out


def make_mesh(axes: Mapping[str, int] | str | None = None, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A device mesh with named axes, by default ``{"data": all devices}``.

  ``axes``: ``{"data": 4, "model": 2}`` or ``"data=4,model=2"``; the product must equal the
  number of ``devices`` (default ``jax.devices()``: every device of every process, so the
  same call works on a multi-host run after ``jax.distributed.initialize()``).
  """
  devices = list(jax.devices() if devices is None else devices)
  if axes is None:
    axes = {DATA: len(devices)}
  elif isinstance(axes, str):
    axes = parse_mesh(axes)
  sizes = tuple(int(v) for v in axes.values())
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(axes)} needs {math.prod(sizes)} devices; "
                     f"{len(devices)} given")
  # Auto axes: jit partitions by GSPMD propagation (jax.make_mesh defaults to Explicit
  # sharding-in-types on new JAX, which would require jax.set_mesh around every jit).
  types = (AxisType.Auto,) * len(sizes)
  return jax.make_mesh(sizes, tuple(axes), axis_types=types, devices=devices)


def batch_sharding(mesh: Mesh, ndim: int = 1, axis: AxisNames = DATA) -> NamedSharding:
  """Leading (batch) axis split over ``axis``, the rest replicated."""
  return NamedSharding(mesh, P(present_axes(mesh, axis), *([None] * (ndim - 1))))


def present_axes(mesh: Mesh, axis: AxisNames):
  """``axis`` restricted to the mesh's axis names (None if none is present)."""
  if axis is None:
    return None
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  names = tuple(n for n in names if n in mesh.axis_names)
  if not names:
    return None
  return names[0] if len(names) == 1 else names


def axis_size(mesh: Mesh, axis) -> int:
  if axis is None:
    return 1
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  return math.prod(mesh.shape[n] for n in names)


def param_spec(shape: Sequence[int], mesh: Mesh, axis: AxisNames = MODEL) -> P:
  """A simple tensor-parallel rule: the last axis of a leaf of rank >= 2 is split over
  ``axis`` when it divides evenly (output features of Dense/Conv kernels, the feature axis
  of embeddings); everything else is replicated."""
  ax = present_axes(mesh, axis)
  shape = tuple(shape)
  if ax is None or len(shape) < 2 or shape[-1] % axis_size(mesh, ax):
    return P()
  return P(*([None] * (len(shape) - 1)), ax)


def param_shardings(params: PyTree, mesh: Mesh, axis: AxisNames = MODEL,
                    spec_fn: Callable[[tuple[str, ...], Any], P] | None = None) -> PyTree:
  """``NamedSharding`` for every leaf of ``params``.

  ``spec_fn(path_keys, leaf) -> PartitionSpec`` overrides :func:`param_spec` (e.g. a
  Megatron layout alternating column- and row-parallel layers).
  """
  def one(path, leaf):
    keys = tuple(key_name(k) for k in path)
    spec = spec_fn(keys, leaf) if spec_fn is not None else param_spec(np.shape(leaf), mesh,
                                                                      axis)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, params)


def opt_state_shardings(tx, params: PyTree, params_shardings: PyTree) -> PyTree:
  """Shardings of ``tx.init(params)`` (any optax transformation, masked and
  multi-transform ones included): a state leaf whose key path ends with a parameter's
  path and has that parameter's shape (Adam's ``mu`` / ``nu``, momentum, ...) follows the
  parameter, and so does one of the same rank whose sharded axes divide evenly (the
  packed codes and block scales of :func:`jaxq.optim.adamw`); everything else (step
  counts) is replicated. (``jit(tx.init)`` on sharded params does NOT give this:
  ``zeros_like`` has no sharded operand to propagate from, so its output is replicated.)
  """
  meshes = {s.mesh for s in jax.tree_util.tree_leaves(params_shardings)}
  if len(meshes) != 1:
    raise ValueError(f"params_shardings must use one mesh; found {len(meshes)}")
  rep = NamedSharding(meshes.pop(), P())
  by_path = {
      tuple(key_name(k) for k in path): (np.shape(leaf), sh)
      for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(params),
                                  jax.tree_util.tree_leaves(params_shardings))}

  def one(path, leaf):
    keys = tuple(key_name(k) for k in path)
    for start in range(len(keys)):  # the longest matching suffix first
      hit = by_path.get(keys[start:])
      if hit is not None and _follows(hit[1], hit[0], tuple(leaf.shape)):
        return hit[1]
    return rep

  return jax.tree_util.tree_map_with_path(one, jax.eval_shape(tx.init, params))


def _follows(sharding: NamedSharding, param_shape: tuple, shape: tuple) -> bool:
  """Whether a state leaf of ``shape`` can take its parameter's ``sharding``."""
  if shape == param_shape:
    return True
  return len(shape) == len(param_shape) and all(
      d % axis_size(sharding.mesh, a) == 0
      for d, a in zip(shape, spec_entries(sharding.spec, len(shape))))


def spec_entries(spec: P, ndim: int) -> list:
  entries = list(spec)
  if len(entries) > ndim:
    raise ValueError(f"PartitionSpec {spec} has more entries than the rank {ndim}")
  return entries + [None] * (ndim - len(entries))


def trimmed_spec(entries) -> P:
  """A PartitionSpec without trailing Nones (``P(None, None) == P()`` is False)."""
  entries = list(entries)
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def _names(axes: AxisNames) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _linear_index(axes: AxisNames) -> jax.Array:
  """This shard's linear index over mesh ``axes`` (row-major); call inside shard_map."""
  idx = jnp.int32(0)
  for name in _names(axes):
    idx = idx * jax.lax.axis_size(name) + jax.lax.axis_index(name)
  return idx


def shard_key(key: jax.Array, axes: AxisNames) -> jax.Array:
  """Inside ``shard_map``: ``fold_in(key, linear shard index over axes)``.

  Each shard gets its own key (independent streams), all derived from one ``key`` (the
  run is reproducible for a given mesh shape). Shards that agree on ``axes`` (replicas
  along the other mesh axes) get the same key, as they must when they hold the same data.
  """
  return jax.random.fold_in(key, _linear_index(axes))


def shard_seed(seed: jax.Array, axes: AxisNames) -> jax.Array:
  """:func:`shard_key` for the uint32 seeds of :func:`jaxq.numerics.hash_uniform`."""
  return numerics.derive_seed(seed, 0) ^ numerics.mix32(
      _linear_index(axes).astype(jnp.uint32) + np.uint32(0x9E3779B9))
