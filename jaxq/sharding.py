"""Scale-out helpers: jaxq on a ``jax.sharding`` device mesh.

Most of jaxq needs nothing special on a mesh. Under ``jax.jit`` with ``NamedSharding``
inputs, XLA's SPMD partitioner (GSPMD) partitions every jaxq computation written in
``jnp``/``lax`` (fake quantization, LSQ/PACT, observers, ``compressed_vjp`` with the XLA
kernels, the int8 ``dot_general`` of W8A8) with the semantics of the single-device
program: a min/max observer over a batch sharded on ``"data"`` is the global min/max (XLA
inserts the all-reduce), and the counter-based noise of stochastic rounding
(:func:`jaxq.numerics.hash_uniform`, the threefry of ``jax.random`` with
``jax_threefry_partitionable``, the default) is a function of the *global* element index,
so every shard draws different noise and the whole run is reproducible from one key,
bitwise equal in its random bits to the one-device run. ``tests/test_sharding.py`` checks
this on a simulated 4x2 mesh.

What this module adds:

* meshes: :func:`make_mesh`, :func:`parse_mesh` (``"data=4,model=2"``);
* layouts: :func:`param_shardings` (a simple tensor-parallel rule for a params tree),
  :func:`opt_state_shardings` (optax state following the params), :func:`batch_sharding`, and sharding rules for quantizer state that follow their
  weights: :func:`scale_spec` (per-channel / per-group scales), :func:`qstate_shardings`
  (the LSQ/PACT state of :func:`jaxq.init_qstate`), :func:`qarray_shardings` /
  :func:`shard_qarray` (int8 / packed serving weights: values like the float weight,
  scales along);
* explicit per-shard execution with ``jax.shard_map`` for code that must see local
  blocks -- Pallas kernels, whose custom calls the SPMD partitioner cannot split:
  :func:`int8_matmul_sharded` (int32 partial sums ``psum``-ed over a sharded contraction,
  so the result is exact), :func:`quantize_pack_sharded` /
  :func:`unpack_dequantize_sharded` (row groups split over the mesh), and
  :func:`shard_key` / :func:`shard_seed`, which fold the shard's linear index into a key
  so that per-shard stochastic rounding is independent across shards and reproducible.

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

from jaxq import kernels
from jaxq import numerics
from pallas_kernels._common import epilogue
from jaxq import params as qparams
from jaxq.spec import match_rule
from jaxq.qarray import QArray

PyTree = Any
AxisNames = str | Sequence[str] | None

DATA, MODEL = "data", "model"

__all__ = [
    "DATA", "MODEL", "make_mesh", "parse_mesh", "batch_sharding", "param_spec",
    "param_shardings", "opt_state_shardings", "scale_spec", "qstate_shardings", "qarray_shardings", "shard_qarray",
    "shard_key", "shard_seed", "int8_matmul_sharded", "quantize_pack_sharded",
    "unpack_dequantize_sharded",
]


# --------------------------------------------------------------------------------------
# Meshes
# --------------------------------------------------------------------------------------


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
  return NamedSharding(mesh, P(_present(mesh, axis), *([None] * (ndim - 1))))


def _present(mesh: Mesh, axis: AxisNames):
  """``axis`` restricted to the mesh's axis names (None if none is present)."""
  if axis is None:
    return None
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  names = tuple(n for n in names if n in mesh.axis_names)
  if not names:
    return None
  return names[0] if len(names) == 1 else names


def _axis_size(mesh: Mesh, axis) -> int:
  if axis is None:
    return 1
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  return math.prod(mesh.shape[n] for n in names)


# --------------------------------------------------------------------------------------
# Parameter layouts
# --------------------------------------------------------------------------------------


def param_spec(shape: Sequence[int], mesh: Mesh, axis: AxisNames = MODEL) -> P:
  """A simple tensor-parallel rule: the last axis of a leaf of rank >= 2 is split over
  ``axis`` when it divides evenly (output features of Dense/Conv kernels, the feature axis
  of embeddings); everything else is replicated."""
  ax = _present(mesh, axis)
  shape = tuple(shape)
  if ax is None or len(shape) < 2 or shape[-1] % _axis_size(mesh, ax):
    return P()
  return P(*([None] * (len(shape) - 1)), ax)


def param_shardings(params: PyTree, mesh: Mesh, axis: AxisNames = MODEL,
                    spec_fn: Callable[[tuple[str, ...], Any], P] | None = None) -> PyTree:
  """``NamedSharding`` for every leaf of ``params``.

  ``spec_fn(path_keys, leaf) -> PartitionSpec`` overrides :func:`param_spec` (e.g. a
  Megatron layout alternating column- and row-parallel layers).
  """
  def one(path, leaf):
    keys = tuple(qparams.key_name(k) for k in path)
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
      tuple(qparams.key_name(k) for k in path): (np.shape(leaf), sh)
      for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(params),
                                  jax.tree_util.tree_leaves(params_shardings))}

  def one(path, leaf):
    keys = tuple(qparams.key_name(k) for k in path)
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
      d % _axis_size(sharding.mesh, a) == 0
      for d, a in zip(shape, _spec_entries(sharding.spec, len(shape))))


def _spec_entries(spec: P, ndim: int) -> list:
  entries = list(spec)
  if len(entries) > ndim:
    raise ValueError(f"PartitionSpec {spec} has more entries than the rank {ndim}")
  return entries + [None] * (ndim - len(entries))


def scale_spec(spec: P, shape: Sequence[int], stat_shape: Sequence[int], *,
               group_axis: int | None = None, mesh: Mesh | None = None) -> P:
  """The ``PartitionSpec`` of a scale (or zero point) that follows its weight's ``spec``.

  Scales use the keepdims layout of :mod:`jaxq.quantizer`: same rank as the weight (size 1
  on the reduced axes), or, for ``granularity="group"``, the rank of the grouped view
  ``to_groups(w, g, group_axis)`` (``(..., n // g, 1, ...)``). A kept axis keeps the
  weight's partition of that axis (so per-channel and per-group scales live on the
  devices of their channels); a reduced (size-1) axis is replicated, and so is a scalar
  (or one-element) scale. In the grouped view
  the number-of-groups axis keeps the weight's partition of ``group_axis`` when ``mesh``
  says the split falls on group boundaries (each shard then holds whole groups), and is
  replicated otherwise.
  """
  shape, stat_shape = tuple(shape), tuple(stat_shape)
  if not stat_shape or math.prod(stat_shape) == 1:
    return P()  # one scale for the whole tensor
  w = _spec_entries(spec, len(shape))
  if len(stat_shape) == len(shape):
    return _trimmed(e if s == d and s > 1 else None for e, s, d in zip(w, stat_shape, shape))
  if len(stat_shape) == len(shape) + 1 and group_axis is not None:
    ga = group_axis % len(shape)
    view = list(shape[:ga]) + [stat_shape[ga], shape[ga] // max(stat_shape[ga], 1)] + list(
        shape[ga + 1:])
    wv = w[:ga] + [w[ga], None] + w[ga + 1:]
    if w[ga] is not None and (mesh is None or stat_shape[ga] % _axis_size(mesh, w[ga])):
      wv[ga] = None
    return _trimmed(e if s == d and s > 1 else None for e, s, d in zip(wv, stat_shape, view))
  raise ValueError(f"scale shape {stat_shape} does not follow the keepdims layout of a "
                   f"weight of shape {shape}")


def _trimmed(entries) -> P:
  """A PartitionSpec without trailing Nones (``P(None, None) == P()`` is False)."""
  entries = list(entries)
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def _spec_of(sharding) -> P:
  if not isinstance(sharding, NamedSharding):
    raise TypeError(f"expected a jax.sharding.NamedSharding; got {type(sharding).__name__}")
  return sharding.spec


def qstate_shardings(qstate: PyTree, params: PyTree, params_shardings: PyTree,
                     rules=None) -> PyTree:
  """Shardings of :func:`jaxq.init_qstate`'s state that follow the weights'.

  ``qstate[...]["kernel"] == {"scale": f32[1, out], ...}`` gets the partition of
  ``params[...]["kernel"]`` on its kept axes (:func:`scale_spec`); ``rules`` (those given
  to ``init_qstate``) locate the grouped axis of "group" specs.
  """
  rules = qparams._check_rules(rules)  # pylint: disable=protected-access

  def walk(qs, p, ps, keys):
    if not isinstance(qs, Mapping):
      raise TypeError(f"qstate at {'/'.join(keys)} is not a dict")
    out = {}
    for k, v in qs.items():
      if k not in p:
        raise ValueError(f"qstate entry {'/'.join(keys + (k,))} has no parameter")
      if isinstance(p[k], Mapping):
        out[k] = walk(v, p[k], ps[k], keys + (k,))
        continue
      w, ws = p[k], ps[k]
      rule = match_rule(rules, "/".join(keys))
      ga = qparams.leaf_group_axis(k, np.ndim(w))
      if rule is None or rule.weight is None or rule.weight.granularity != "group":
        ga = None
      mesh = ws.mesh
      out[k] = {name: NamedSharding(mesh, scale_spec(_spec_of(ws), np.shape(w), np.shape(s),
                                                     group_axis=ga, mesh=mesh))
                for name, s in v.items()}
    return out

  return walk(qstate, params, params_shardings, ())


def qarray_shardings(q: QArray, sharding: NamedSharding) -> QArray:
  """A QArray of shardings (for ``jax.device_put`` / ``jit(out_shardings=)``) laying out
  ``q`` like a float weight with ``sharding``: the integer ``values`` take the weight's
  partition (bit-packed values are packed along the last axis, whose split must then
  fall on whole bytes), ``scale`` / ``zero_point`` follow by :func:`scale_spec`."""
  mesh, spec = sharding.mesh, _spec_of(sharding)
  entries = _spec_entries(spec, len(q.shape))
  vshape = tuple(np.shape(q.values))
  if vshape != q.shape:  # bit-packed along the last axis
    if len(vshape) != len(q.shape) or vshape[:-1] != q.shape[:-1]:
      raise ValueError(f"cannot lay out packed values of shape {vshape} (logical "
                       f"{q.shape})")
    last, per_byte = entries[-1], 8 // q.spec.bits
    if last is not None and q.shape[-1] % (_axis_size(mesh, last) * per_byte):
      raise ValueError(
          f"QArray of shape {q.shape} packs {per_byte} values a byte along its last axis: "
          f"splitting that axis over mesh axis {last!r} needs its length to be a multiple "
          f"of {_axis_size(mesh, last) * per_byte}")
  ga = q.group_axis if q.spec.granularity == "group" else None

  def follow(stat):
    return NamedSharding(mesh, scale_spec(spec, q.shape, np.shape(stat), group_axis=ga,
                                          mesh=mesh))
  return QArray(NamedSharding(mesh, _trimmed(entries)), follow(q.scale),
                follow(q.zero_point), spec=q.spec, shape=q.shape, dtype=q.dtype,
                group_axis=q.group_axis)


def shard_qarray(q: QArray, sharding: NamedSharding) -> QArray:
  """``jax.device_put(q, qarray_shardings(q, sharding))``."""
  return jax.device_put(q, qarray_shardings(q, sharding))


# --------------------------------------------------------------------------------------
# Per-shard execution (shard_map)
# --------------------------------------------------------------------------------------


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


def int8_matmul_sharded(a_q, b_q, a_scale, b_scale, bias=None, out_dtype=jnp.float32, *,
                        mesh: Mesh, rows: AxisNames = DATA, cols: AxisNames = MODEL,
                        contract: AxisNames = None, activation: str | None = None,
                        backend: str | None = None):
  """:func:`jaxq.kernels.int8_matmul` run per shard with ``shard_map``.

  ``a_q: int8[M, K]`` split ``(rows, contract)``, ``b_q: int8[K, N]`` split
  ``(contract, cols)``, ``a_scale`` / ``b_scale`` / ``bias`` along M / N; the result
  ``[M, N]`` is split ``(rows, cols)``. Each shard runs the kernel (Pallas on GPU) on its
  blocks. With ``contract`` set, each shard computes the raw int32 accumulator of its K
  block, the partial sums are ``psum``-ed in int32 (exact) and the epilogue (scales, bias,
  activation) runs once after the reduction: equal to the unsharded kernel bit for bit.
  """
  rows, cols, contract = (_present(mesh, a) for a in (rows, cols, contract))
  has_bias = bias is not None

  def local(a, b, sa, sb, *rest):
    bb = rest[0] if has_bias else None
    if contract is None:
      return kernels.int8_matmul(a, b, sa, sb, bb, out_dtype, activation=activation,
                                 backend=backend)
    acc = kernels.int8_matmul(a, b, None, None, None, jnp.int32, backend=backend)
    acc = jax.lax.psum(acc, contract)
    return epilogue(acc, sa.astype(jnp.float32), sb.astype(jnp.float32),
                            None if bb is None else bb.astype(jnp.float32), activation,
                            jnp.dtype(out_dtype))

  in_specs = (P(rows, contract), P(contract, cols), P(rows), P(cols))
  args = (a_q, b_q, a_scale, b_scale)
  if has_bias:
    in_specs += (P(cols),)
    args += (bias,)
  fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P(rows, cols),
                     check_vma=False)
  return fn(*args)


def quantize_pack_sharded(x, bits: int, noise=None, *, mesh: Mesh, axes: AxisNames = DATA,
                          key: jax.Array | None = None, backend: str | None = None):
  """:func:`jaxq.kernels.quantize_pack` with the groups (rows of ``x: f32[G, S]``) split
  over mesh ``axes``, one kernel launch per shard.

  Stochastic rounding: pass ``noise`` (global ``f32[G, S]``, split like x), or a ``key``:
  each shard then draws its noise with :func:`jaxq.numerics.hash_uniform` from its own
  seed (:func:`shard_seed`), so shards round independently and the result is a
  deterministic function of ``key`` and the mesh. Returns ``(packed, lo, scale)`` split
  over ``axes`` like x.
  """
  if noise is not None and key is not None:
    raise ValueError("quantize_pack_sharded: pass noise or key, not both")
  ax = _present(mesh, axes)
  seed = None if key is None else numerics.seed_from_key(key)

  def local(xl, *rest):
    nl = None
    if noise is not None:
      nl = rest[0]
    elif seed is not None:
      nl = numerics.hash_uniform(shard_seed(rest[0], ax), xl.shape)
    return kernels.quantize_pack(xl, bits, nl, backend=backend)

  in_specs, args = (P(ax, None),), (x,)
  if noise is not None:
    in_specs, args = in_specs + (P(ax, None),), args + (noise,)
  elif seed is not None:
    in_specs, args = in_specs + (P(),), args + (seed,)
  fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                     out_specs=(P(ax, None), P(ax), P(ax)), check_vma=False)
  return fn(*args)


def unpack_dequantize_sharded(packed, lo, scale, bits: int, *, mesh: Mesh,
                              axes: AxisNames = DATA, backend: str | None = None):
  """:func:`jaxq.kernels.unpack_dequantize` with the groups split over mesh ``axes``."""
  ax = _present(mesh, axes)
  fn = jax.shard_map(
      lambda p, l, s: kernels.unpack_dequantize(p, l, s, bits, backend=backend), mesh=mesh,
      in_specs=(P(ax, None), P(ax), P(ax)), out_specs=P(ax, None), check_vma=False)
  return fn(packed, lo, scale)
