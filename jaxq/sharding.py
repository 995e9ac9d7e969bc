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

* meshes and plain parameter layouts, from :mod:`jaxq.mesh` (re-exported here):
  :func:`make_mesh`, :func:`parse_mesh`, :func:`param_shardings`,
  :func:`opt_state_shardings`, :func:`batch_sharding`, :func:`shard_key`,
  :func:`shard_seed`;
* sharding rules for quantizer state that follow their
  weights: :func:`scale_spec` (per-channel / per-group scales), :func:`qstate_shardings`
  (the LSQ/PACT state of :func:`jaxq.init_qstate`), :func:`qarray_shardings` /
  :func:`shard_qarray` (int8 / packed serving weights: values like the float weight,
  scales along);
* explicit per-shard execution with ``jax.shard_map`` for code that must see local
  blocks -- Pallas kernels, whose custom calls the SPMD partitioner cannot split:
  :func:`int8_matmul_sharded` (int32 partial sums ``psum``-ed over a sharded contraction,
  so the result is exact), :func:`quantize_pack_sharded` /
  :func:`unpack_dequantize_sharded` (row groups split over the mesh).

See ``docs/scaling.md`` for the recipe (data x model meshes, multi-host).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxq import kernels
from jaxq import numerics
from jaxq import params as qparams
from jaxq.mesh import (DATA, MODEL, AxisNames, axis_size, batch_sharding, make_mesh,
                       opt_state_shardings, param_shardings, param_spec, parse_mesh,
                       present_axes, shard_key, shard_seed, spec_entries, trimmed_spec)
from jaxq.qarray import QArray
from jaxq.spec import match_rule

PyTree = Any

__all__ = [
    "DATA", "MODEL", "make_mesh", "parse_mesh", "batch_sharding", "param_spec",
    "param_shardings", "opt_state_shardings", "scale_spec", "qstate_shardings",
    "qarray_shardings", "shard_qarray",
    "shard_key", "shard_seed", "int8_matmul_sharded", "quantize_pack_sharded",
    "unpack_dequantize_sharded",
]


# --------------------------------------------------------------------------------------
# Quantizer-state layouts
# --------------------------------------------------------------------------------------


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
  w = spec_entries(spec, len(shape))
  if len(stat_shape) == len(shape):
    return trimmed_spec(e if s == d and s > 1 else None for e, s, d in zip(w, stat_shape, shape))
  if len(stat_shape) == len(shape) + 1 and group_axis is not None:
    ga = group_axis % len(shape)
    view = list(shape[:ga]) + [stat_shape[ga], shape[ga] // max(stat_shape[ga], 1)] + list(
        shape[ga + 1:])
    wv = w[:ga] + [w[ga], None] + w[ga + 1:]
    if w[ga] is not None and (mesh is None or stat_shape[ga] % axis_size(mesh, w[ga])):
      wv[ga] = None
    return trimmed_spec(e if s == d and s > 1 else None for e, s, d in zip(wv, stat_shape, view))
  raise ValueError(f"scale shape {stat_shape} does not follow the keepdims layout of a "
                   f"weight of shape {shape}")


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
  rules = qparams.params_rules(rules)

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
  entries = spec_entries(spec, len(q.shape))
  vshape = tuple(np.shape(q.values))
  if vshape != q.shape:  # bit-packed along the last axis
    if len(vshape) != len(q.shape) or vshape[:-1] != q.shape[:-1]:
      raise ValueError(f"cannot lay out packed values of shape {vshape} (logical "
                       f"{q.shape})")
    last, per_byte = entries[-1], 8 // q.spec.bits
    if last is not None and q.shape[-1] % (axis_size(mesh, last) * per_byte):
      raise ValueError(
          f"QArray of shape {q.shape} packs {per_byte} values a byte along its last axis: "
          f"splitting that axis over mesh axis {last!r} needs its length to be a multiple "
          f"of {axis_size(mesh, last) * per_byte}")
  ga = q.group_axis if q.spec.granularity == "group" else None

  def follow(stat):
    return NamedSharding(mesh, scale_spec(spec, q.shape, np.shape(stat), group_axis=ga,
                                          mesh=mesh))
  return QArray(NamedSharding(mesh, trimmed_spec(entries)), follow(q.scale),
                follow(q.zero_point), spec=q.spec, shape=q.shape, dtype=q.dtype,
                group_axis=q.group_axis)


def shard_qarray(q: QArray, sharding: NamedSharding) -> QArray:
  """``jax.device_put(q, qarray_shardings(q, sharding))``."""
  return jax.device_put(q, qarray_shardings(q, sharding))


# --------------------------------------------------------------------------------------
# Per-shard execution (shard_map)
# --------------------------------------------------------------------------------------


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
  rows, cols, contract = (present_axes(mesh, a) for a in (rows, cols, contract))
  has_bias = bias is not None

  def local(a, b, sa, sb, *rest):
    bb = rest[0] if has_bias else None
    if contract is None:
      return kernels.int8_matmul(a, b, sa, sb, bb, out_dtype, activation=activation,
                                 backend=backend)
    acc = kernels.int8_matmul(a, b, None, None, None, jnp.int32, backend=backend)
    acc = jax.lax.psum(acc, contract)
    return kernels.epilogue(acc, sa.astype(jnp.float32), sb.astype(jnp.float32),
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
  ax = present_axes(mesh, axes)
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
  ax = present_axes(mesh, axes)
  fn = jax.shard_map(
      lambda p, l, s: kernels.unpack_dequantize(p, l, s, bits, backend=backend), mesh=mesh,
      in_specs=(P(ax, None), P(ax), P(ax)), out_specs=P(ax, None), check_vma=False)
  return fn(packed, lo, scale)
