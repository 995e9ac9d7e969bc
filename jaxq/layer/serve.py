"""Serving one quantized contraction from its stored QArray kernel and activation scales.

A layer whose weight is an 8-bit per-tensor / per-channel QArray and whose activation
spec is 8-bit signed per tensor (static, or ``dynamic=True`` per token) computes its
matmul with :func:`jaxq.kernels.int8_matmul` (int8 x int8 -> int32, dequantizing
epilogue; an activation zero point is corrected with the kernel's column sums). Every
other quantized layer (weight-only W8/W4, Conv, Einsum, per-group activations)
dequantizes its weight and fake-quantizes its input with the stored scales. Used alike by
the Linen and NNX serving models and by the PTQ simulation of :mod:`jaxq.analysis`.
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


def _int8_weight(q: QArray, op: Contraction):
  """``(b_q int8[K, N], b_scale f32[N])`` when ``q`` can feed ``int8_matmul``, else None."""
  s = q.spec
  if not (s.bits == 8 and s.signed and s.symmetric and s.scheme == "uniform"
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


def serving_act_spec(spec: QuantSpec) -> QuantSpec:
  """Learned steps are plain scales once trained: serve them as "ste"."""
  return spec if spec.estimator == "ste" else spec.replace(estimator="ste")


def _int8_act_ok(spec: QuantSpec) -> bool:
  return (spec.bits == 8 and spec.signed and spec.scheme == "uniform"
          and spec.granularity == "tensor")


def quantized_contraction(op: Contraction, path: str, aspec: QuantSpec | None,
                          qw: QArray | None, act_qparams: dict | None) -> jax.Array:
  """The contraction of the quantized layer at ``path`` with weight ``qw`` (None:
  ``op.rhs`` in float), activation spec ``aspec`` (the rule's) and static activation
  ``act_qparams`` ({"scale", "zero_point"}; None when ``aspec`` is dynamic, non-uniform
  or absent)."""
  if op.lhs.size == 0:  # an empty batch: an empty result of the right shape
    return op.compute(op.lhs, jnp.zeros(op.rhs.shape, op.rhs.dtype))
  x2, x_unview = op.lhs_matrix()
  aview = None
  if aspec is not None:
    aspec = serving_act_spec(aspec)
    aview = act_view_spec(aspec, path, x2.shape[1])
  out_dtype = jnp.result_type(op.lhs.dtype, op.rhs.dtype)

  w8 = None
  if (qw is not None and aspec is not None and op.matmul_ok and _int8_act_ok(aspec)
      and jnp.issubdtype(x2.dtype, jnp.floating)):
    w8 = _int8_weight(qw, op)
  if w8 is not None:
    b_q, b_scale = w8
    if aspec.dynamic:
      sx, zx = quantizer.compute_qparams(jax.lax.stop_gradient(x2), aview, group_axis=1)
    else:
      sx, zx = act_qparams["scale"], act_qparams["zero_point"]
    m = x2.shape[0]
    sx = jnp.broadcast_to(jnp.asarray(sx, jnp.float32).reshape(-1, 1), (m, 1))
    zx = jnp.broadcast_to(jnp.asarray(zx, jnp.float32).reshape(-1, 1), (m, 1))
    xq = jnp.clip(jnp.round(x2.astype(jnp.float32) / sx) + zx, aspec.qmin, aspec.qmax)
    xq = jnp.where(jnp.isnan(x2), zx, xq).astype(jnp.int8)
    # A NaN input gives a NaN row, as in fake quantization (int8 cannot hold it).
    a_scale = nan_scale(sx[:, 0], x2, 1)
    y = kernels.int8_matmul(xq, b_q, a_scale, b_scale, out_dtype=jnp.float32)
    if not aspec.symmetric:  # (xq - zx) @ b_q = xq @ b_q - zx * colsum(b_q)
      colsum = jnp.sum(b_q.astype(jnp.int32), axis=0).astype(jnp.float32)
      y = y - (zx * sx) * (colsum * b_scale)[None, :]
    return op.out_from_matrix(y.astype(out_dtype))

  rhs = op.rhs
  if qw is not None:
    if qw.shape != tuple(op.rhs.shape):
      raise ValueError(f"layer '{path}': stored quantized kernel has shape {qw.shape}, "
                       f"the layer expects {tuple(op.rhs.shape)}")
    rhs = dequantize(qw).astype(op.rhs.dtype)
  lhs = op.lhs
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
