"""Serving one quantized contraction from its stored QArray kernel and activation scales.

A Dense / DenseGeneral layer whose weight is a signed symmetric per-tensor / per-channel
QArray and whose activation spec is 8-bit signed per tensor (static, or ``dynamic=True``
per token) computes its matmul on integers (Contract 7, "Serving kernels"):

* 8-bit weights: :func:`jaxq.kernels.int8_matmul` (int8 x int8 -> int32, dequantizing
  epilogue), or :func:`jaxq.kernels.int8_matmul_dynamic` for symmetric per-token
  activations (their quantization fused into the kernel; Pallas backends);
* 4 bits or fewer: :func:`jaxq.kernels.int4_matmul` (int4 x int8, per-channel
  weights) or :func:`jaxq.kernels.int4_matmul_grouped` (per-group weights with int8
  activations, and every weight-only 4-bit layer: float input, dequantization in the
  kernel), the codes repacked from the QArray's layout (two per byte along the output
  features) to the kernels' (two per byte along K) in integers.

An activation zero point is corrected with the kernel's column sums. Every other
quantized layer (5..7-bit or asymmetric weights, Conv, Einsum, per-group activations)
dequantizes its weight and fake-quantizes its input with the stored scales: the same
values. A smoothed layer (:mod:`jaxq.layer.smooth`) divides its
input by ``s`` in the same elementwise pass that quantizes it. Used alike by the Linen
and NNX serving models and by the PTQ simulation of :mod:`jaxq.analysis`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import kernels
from jaxq import quantizer
from jaxq.layer.int8 import nan_scale
from jaxq.layer.operands import ACT_ALPHA, ACT_SCALE, ACT_ZERO_POINT, act_view_spec
from jaxq.layer.smooth import smoothed_input
from jaxq.layer.views import Contraction
from jaxq.qarray import QArray, dequantize
from jaxq.spec import QuantSpec

__all__ = ["quantized_contraction", "serving_act_spec", "static_act", "learned_act_qparams"]


def _matrix(x: jax.Array, contract: tuple[int, ...]) -> jax.Array:
  """``x`` as ``(K, N)``: contracted axes (in order) rows, the other axes columns."""
  free = [a for a in range(x.ndim) if a not in contract]
  perm = tuple(contract) + tuple(free)
  xt = x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)
  k = int(np.prod([x.shape[a] for a in contract], dtype=np.int64))
  return xt.reshape(k, -1)


def _integer_weight(q: QArray, op: Contraction):
  """``(b_q int8[K, N], b_scale f32[N])`` when ``q`` is a signed symmetric uniform
  QArray of at most 8 bits with one scale per output feature (or per tensor), else
  None (per-group scales, zero points: the dequantizing path)."""
  s = q.spec
  if not (s.bits <= 8 and s.signed and s.symmetric and s.scheme == "uniform"
          and s.granularity != "group" and q.shape == tuple(op.rhs.shape)):
    return None
  rc = tuple(a % q.ndim for a in op.rhs_contract)
  scale = jnp.asarray(q.scale)
  if scale.ndim != q.ndim or any(scale.shape[a] != 1 for a in rc):
    return None
  free_shape = [1 if a in rc else d for a, d in enumerate(q.shape)]
  b_scale = jnp.broadcast_to(scale, free_shape).reshape(-1)
  b_q = _matrix(q.int_values(), tuple(op.rhs_contract))
  return b_q, b_scale.astype(jnp.float32)


def _group_rows(k: int) -> int:
  """Rows per scale for a per-channel weight served by ``int4_matmul_grouped``: the
  kernel's K block, the largest even divisor of ``k`` up to 128 (``k`` even)."""
  return next(g for g in (128, 64, 32, 16, 8, 4, 2) if k % g == 0)


def _grouped_weight(q: QArray, op: Contraction):
  """``(b_q int8[K, N], b_scale f32[K/g, N], g)`` for ``int4_matmul_grouped``: a signed
  symmetric uniform QArray of at most 4 bits, per group of K rows (the kernel's
  contracted axes leading, groups along the innermost one) or per channel / tensor
  (its scale repeated over groups of rows); else None."""
  s = q.spec
  if not (s.bits <= 4 and s.signed and s.symmetric and s.scheme == "uniform"
          and q.shape == tuple(op.rhs.shape)):
    return None
  if s.granularity != "group":
    w = _integer_weight(q, op)
    if w is None:
      return None
    b_q, b_scale = w
    k = b_q.shape[0] + b_q.shape[0] % 2
    g = _group_rows(k)
    return b_q, jnp.broadcast_to(b_scale[None, :], (k // g, b_q.shape[1])), g
  nc = len(op.rhs_contract)
  if (q.ndim == 2 and tuple(a % 2 for a in op.rhs_contract) == (1,)
      and q.group_axis % 2 == 1 and not s.group_size % 2):
    # A kernel stored (N, K) with groups along K (an embedding table in Embed.attend).
    b_scale = jnp.asarray(q.scale, jnp.float32).reshape(q.shape[0], -1).T
    return q.int_values().T, b_scale, s.group_size
  if (tuple(a % q.ndim for a in op.rhs_contract) != tuple(range(nc))
      or q.group_axis % q.ndim != nc - 1 or s.group_size % 2):
    return None
  b_q = _matrix(q.int_values(), tuple(op.rhs_contract))
  b_scale = jnp.asarray(q.scale, jnp.float32).reshape(b_q.shape[0] // s.group_size, -1)
  return b_q, b_scale, s.group_size


def _int4_operands(xq: jax.Array, b_q: jax.Array):
  """``(a_q, b_packed)`` for :func:`jaxq.kernels.int4_matmul`: the codes packed two per
  byte along K (``pack_int4``; QArray packs along its last axis, the output features, so
  the integer codes are repacked here: integer ops only, no float kernel), K padded to
  even with a zero input channel."""
  if b_q.shape[0] % 2:
    b_q = jnp.pad(b_q, ((0, 1), (0, 0)))
    xq = jnp.pad(xq, ((0, 0), (0, 1)))
  return xq, kernels.pack_int4(b_q)


def _dynamic_int8(x2: jax.Array, b_q: jax.Array, b_scale: jax.Array) -> jax.Array:
  """Symmetric per-token W8A8 through ``int8_matmul_dynamic``, with fake quantization's
  numerics on non-finite inputs: NaN gives a NaN row (the kernel's NaN row scale); +-Inf
  saturate, so they are clipped to the row's largest finite magnitude (the kernel then
  codes them +-127) and, only when a -Inf is present (``lax.cond``), the code -128 that
  fake quantization gives it is restored with one more integer product."""
  finite = jnp.isfinite(x2)
  amax = jnp.max(jnp.where(finite, jnp.abs(x2), 0.0), axis=1, keepdims=True)
  y = kernels.int8_matmul_dynamic(jnp.clip(x2, -amax, amax), b_q, b_scale,
                                  out_dtype=jnp.float32)
  neg_inf = x2 == -jnp.inf

  def restore_qmin(y):
    a_scale = jnp.maximum(amax.astype(jnp.float32), kernels.TINY) / 127.0
    extra = jax.lax.dot_general(neg_inf.astype(jnp.int8), b_q, (((1,), (0,)), ((), ())),
                                preferred_element_type=jnp.int32)
    return y - a_scale * extra.astype(jnp.float32) * b_scale[None, :]

  return jax.lax.cond(jnp.any(neg_inf), restore_qmin, lambda y: y, y)


def serving_act_spec(spec: QuantSpec) -> QuantSpec:
  """Learned steps are plain scales once trained: serve them as "ste"."""
  return spec if spec.estimator == "ste" else spec.replace(estimator="ste")


def _int8_act_ok(spec: QuantSpec) -> bool:
  return (spec.bits == 8 and spec.signed and spec.scheme == "uniform"
          and spec.granularity == "tensor")


def _static_act_codes(x2, aspec: QuantSpec, aview: QuantSpec, act_qparams):
  """``(xq int8[M, K], sx f32[M, 1], zx f32[M, 1])``: the activation's integer codes."""
  if aspec.dynamic:
    sx, zx = quantizer.compute_qparams(jax.lax.stop_gradient(x2), aview, group_axis=1)
  else:
    sx, zx = act_qparams["scale"], act_qparams["zero_point"]
  m = x2.shape[0]
  sx = jnp.broadcast_to(jnp.asarray(sx, jnp.float32).reshape(-1, 1), (m, 1))
  zx = jnp.broadcast_to(jnp.asarray(zx, jnp.float32).reshape(-1, 1), (m, 1))
  xq = jnp.clip(jnp.round(x2.astype(jnp.float32) / sx) + zx, aspec.qmin, aspec.qmax)
  return jnp.where(jnp.isnan(x2), zx, xq).astype(jnp.int8), sx, zx


def _integer_contraction(x2, aspec: QuantSpec, aview: QuantSpec, act_qparams, b_q,
                         b_scale, bits: int) -> jax.Array:
  """``x2 @ W`` with integer operands: W8 (per-token symmetric dynamic activations:
  ``int8_matmul_dynamic``, quantization fused in the kernel, when the kernels run as
  Pallas; on the XLA backend the same codes computed here feed ``int8_matmul``, which
  measured faster on the CPU, benchmarks/bench_serve_int4.py; else ``int8_matmul``) or
  W4 and narrower (``int4_matmul``, int4 x int8)."""
  if (bits == 8 and aspec.dynamic and aspec.symmetric
      and kernels.resolve_backend() != "xla"):
    return _dynamic_int8(x2, b_q, b_scale)
  xq, sx, zx = _static_act_codes(x2, aspec, aview, act_qparams)
  # A NaN input gives a NaN row, as in fake quantization (int8 cannot hold it).
  a_scale = nan_scale(sx[:, 0], x2, 1)
  if bits == 8:
    y = kernels.int8_matmul(xq, b_q, a_scale, b_scale, out_dtype=jnp.float32)
  else:
    a_q, b_packed = _int4_operands(xq, b_q)
    y = kernels.int4_matmul(a_q, b_packed, a_scale, b_scale, out_dtype=jnp.float32)
  if not aspec.symmetric:  # (xq - zx) @ b_q = xq @ b_q - zx * colsum(b_q)
    colsum = jnp.sum(b_q.astype(jnp.int32), axis=0).astype(jnp.float32)
    y = y - (zx * sx) * (colsum * b_scale)[None, :]
  return y


def _grouped_contraction(x2, aspec: QuantSpec | None, aview, act_qparams, b_q, b_scale,
                         g: int) -> jax.Array:
  """``x2 @ W`` for int4 weights with group scales (``int4_matmul_grouped``): int8
  activation codes (W4A8), or the float input itself (weight-only: dequantization in
  the kernel)."""
  if aspec is None:
    a, b_packed = _int4_operands(x2, b_q)
    return kernels.int4_matmul_grouped(a, b_packed, b_scale, None, out_dtype=jnp.float32,
                                       group_size=g)
  xq, sx, zx = _static_act_codes(x2, aspec, aview, act_qparams)
  a_q, b_packed = _int4_operands(xq, b_q)
  y = kernels.int4_matmul_grouped(a_q, b_packed, b_scale, nan_scale(sx[:, 0], x2, 1),
                                  out_dtype=jnp.float32, group_size=g)
  if not aspec.symmetric:  # zx * sx * column sums of the dequantized kernel
    k = b_q.shape[0]
    cols = jnp.sum(b_q.astype(jnp.float32).reshape(k // g, g, -1), axis=1) * b_scale
    y = y - (zx * sx) * jnp.sum(cols, axis=0)[None, :]
  return y


def quantized_contraction(op: Contraction, path: str, aspec: QuantSpec | None,
                          qw: QArray | None, act_qparams: dict | None,
                          smooth: jax.Array | None = None) -> jax.Array:
  """The contraction of the quantized layer at ``path`` with weight ``qw`` (None:
  ``op.rhs`` in float), activation spec ``aspec`` (the rule's), static activation
  ``act_qparams`` ({"scale", "zero_point"} of the smoothed input; None when ``aspec`` is
  dynamic, non-uniform or absent) and smoothing ``smooth`` (``f32[K]``, the input is
  divided by it before its quantization; None: no smoothing; :mod:`jaxq.layer.smooth`).

  Integer kernels (module docstring): signed symmetric QArray weights of 8 bits (per
  channel / tensor) or of 4 bits or fewer (per channel / tensor / group) with an 8-bit
  per-tensor (static) or per-token (dynamic) activation, or with none (<= 4 bits).
  Everything else dequantizes the weight and fake-quantizes the input (the same
  values).
  """
  if op.lhs.size == 0:  # an empty batch: an empty result of the right shape
    return op.compute(op.lhs, jnp.zeros(op.rhs.shape, op.rhs.dtype))
  x2, x_unview = op.lhs_matrix()
  if smooth is not None:
    if jnp.shape(smooth) != (x2.shape[1],):
      raise ValueError(f"layer '{path}': stored smoothing scale has shape "
                       f"{jnp.shape(smooth)}, the layer has {x2.shape[1]} input features")
    x2 = smoothed_input(x2, smooth)
  aview = None
  if aspec is not None:
    aspec = serving_act_spec(aspec)
    aview = act_view_spec(aspec, path, x2.shape[1])
  out_dtype = jnp.result_type(op.lhs.dtype, op.rhs.dtype)

  wi = None
  if (qw is not None and aspec is not None and op.matmul_ok and _int8_act_ok(aspec)
      and jnp.issubdtype(x2.dtype, jnp.floating) and (qw.spec.bits <= 4 or qw.spec.bits == 8)):
    wi = _integer_weight(qw, op)
  if wi is not None:
    y = _integer_contraction(x2, aspec, aview, act_qparams, *wi, qw.spec.bits)
    return op.out_from_matrix(y.astype(out_dtype))
  wg = None
  if (qw is not None and op.matmul_ok and jnp.issubdtype(x2.dtype, jnp.floating)
      and (aspec is None or _int8_act_ok(aspec))):
    wg = _grouped_weight(qw, op)
  if wg is not None:
    y = _grouped_contraction(x2, aspec, aview, act_qparams, *wg)
    return op.out_from_matrix(y.astype(out_dtype))

  rhs = op.rhs
  if qw is not None:
    if qw.shape != tuple(op.rhs.shape):
      raise ValueError(f"layer '{path}': stored quantized kernel has shape {qw.shape}, "
                       f"the layer expects {tuple(op.rhs.shape)}")
    rhs = dequantize(qw).astype(op.rhs.dtype)
  lhs = op.lhs if smooth is None else x_unview(x2)
  if aview is not None:
    kw = {}
    if act_qparams is not None:
      kw = {"scale": act_qparams["scale"], "zero_point": act_qparams["zero_point"]}
    lhs = x_unview(quantizer.fake_quantize(x2, aview, group_axis=1, require_key=False, **kw))
  return op.compute(lhs, rhs)


def static_act(aspec: QuantSpec | None) -> bool:
  return aspec is not None and not aspec.dynamic and aspec.scheme == "uniform"


def learned_act_qparams(aspec: QuantSpec, get: Callable[[str], jax.Array | None],
                        path: str) -> dict:
  """Static activation ``{"scale", "zero_point"}`` of a step learned in QAT: LSQ's
  ``jaxq_act_scale`` (+ ``jaxq_act_zero_point`` for LSQ+), PACT's ``alpha / qmax``.
  ``get(name)`` reads the layer's variable (None when it has none)."""
  if aspec.estimator == "pact":
    alpha = get(ACT_ALPHA)
    scale = None if alpha is None else alpha / aspec.qmax
  else:
    scale = get(ACT_SCALE)
  if scale is None:
    raise ValueError(f"layer '{path}': the learned activation step of estimator="
                     f"{aspec.estimator!r} is missing (train the model, or for Linen run "
                     "jaxq.flax.init_quant_params first)")
  zp = get(ACT_ZERO_POINT) if aspec.estimator != "pact" and not aspec.symmetric else None
  return {"scale": scale, "zero_point": jnp.zeros_like(scale) if zp is None else zp}
