"""The W8A8 training matmul: int8 operands forward, the fake-quant (STE) backward.

When both operands of a layer's contraction are quantized to 8 bits (symmetric, signed,
straight-through), the forward matmul of their 2-D views runs on int8 operands through
:func:`jaxq.kernels.int8_matmul` (int32 accumulation, dequantizing epilogue), equal to
the fake-quant result up to float rounding, inside a ``custom_vjp`` whose backward is the
fake-quant straight-through backward (as AQT and Qwix do). With ``backward_int8`` the two
backward matmuls run in int8 too: the gradient quantized per row / per column, with
stochastic rounding when a seed is given (AQT's dlhs / drhs).

Used alike by the Linen and NNX adapters (``int8="forward" | "all"``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxq import kernels
from jaxq import numerics
from jaxq import quantizer
from jaxq.layer.views import Contraction
from jaxq.spec import QuantSpec

__all__ = ["INT8_MODES", "int8_spec_ok", "int8_applies", "int8_contraction", "nan_scale"]

#: ``int8=`` modes: fake quantization only, int8 forward matmuls, forward and backward.
INT8_MODES = ("off", "forward", "all")


def int8_spec_ok(spec: QuantSpec | None, *, act: bool) -> bool:
  if spec is None:
    return False
  ok = (spec.bits == 8 and spec.signed and spec.symmetric and spec.scheme == "uniform"
        and spec.estimator == "ste" and spec.rounding in ("nearest", "gptq"))
  if act:
    return ok and (spec.granularity == "tensor" or (spec.dynamic and spec.granularity ==
                                                      "tensor"))
  return ok and spec.granularity in ("tensor", "channel")


def _to_int8(v: jax.Array, scale: jax.Array, noise: jax.Array | None = None) -> jax.Array:
  r = v.astype(jnp.float32) / scale
  r = jnp.round(r) if noise is None else jnp.floor(r + noise)
  return jnp.clip(r, -128, 127).astype(jnp.int8)


def _in_range(v, scale):
  r = jnp.round(v.astype(jnp.float32) / scale)
  return (r >= -128) & (r <= 127)


def nan_scale(scale: jax.Array, v: jax.Array, axis: int) -> jax.Array:
  """``scale`` (one per row of ``v`` for ``axis=1``, per column for ``axis=0``) made NaN
  where that row / column of ``v`` holds a NaN.

  The integer operands cannot carry a NaN; fake quantization propagates it to every
  output that uses the element (its row of ``x @ w`` for an activation, its column for
  a weight), which is what a NaN in the dequantizing epilogue's scale gives: one
  reduction per operand, fused with its quantization.
  """
  return jnp.where(jnp.any(jnp.isnan(v), axis=axis), jnp.nan, scale)


def _grad_noise(seed, index, shape):
  if seed is None:
    return None
  return numerics.hash_uniform(numerics.derive_seed(seed, index), shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _w8a8(x2, w2, sx, sw, seed, cfg):
  return _w8a8_fwd(x2, w2, sx, sw, seed, cfg)[0]


def _w8a8_fwd(x2, w2, sx, sw, seed, cfg):
  mask_x, mask_w, _ = cfg
  m, n = x2.shape[0], w2.shape[1]
  xq, wq = _to_int8(x2, sx), _to_int8(w2, sw)
  a_scale = nan_scale(jnp.broadcast_to(sx, (m, 1)).reshape(m), x2, 1)
  b_scale = nan_scale(jnp.broadcast_to(sw, (1, n)).reshape(n), w2, 0)
  y = kernels.int8_matmul(xq, wq, a_scale, b_scale, out_dtype=jnp.float32).astype(x2.dtype)
  mx = _in_range(x2, sx) if mask_x else None
  mw = _in_range(w2, sw) if mask_w else None
  # The backward uses the NaN-carrying scales too: NaN gradients where fake quant has them.
  scales = (a_scale[:, None], b_scale[None, :], jnp.zeros_like(sx), jnp.zeros_like(sw))
  return y, (xq, wq, scales, mx, mw, seed, jnp.zeros((0,), w2.dtype))


def _w8a8_bwd(cfg, res, g):
  _, _, bwd_int8 = cfg
  xq, wq, (sx, sw, dsx, dsw), mx, mw, seed, w_dtype = res
  k = xq.shape[1]
  g2 = g.astype(jnp.float32)
  if bwd_int8:
    # dx = g @ (wq * sw)^T = (g * sw) @ wq^T: fold the weight scale into g (N is the
    # contraction axis here), quantize per row; dw = (xq * sx)^T @ g = xq^T @ (sx * g):
    # fold the activation scale, quantize per column.
    gs = g2 * sw
    sg = jnp.maximum(jnp.max(jnp.abs(gs), axis=1, keepdims=True) / 127.0, numerics.SCALE_EPS)
    gq = _to_int8(gs, sg, _grad_noise(seed, 0, gs.shape))
    dx = kernels.int8_matmul(gq, wq.T, sg[:, 0], jnp.ones((k,), jnp.float32))
    gt = g2 * sx
    st = jnp.maximum(jnp.max(jnp.abs(gt), axis=0, keepdims=True) / 127.0, numerics.SCALE_EPS)
    gq2 = _to_int8(gt, st, _grad_noise(seed, 1, gt.shape))
    dw = kernels.int8_matmul(xq.T, gq2, jnp.ones((k,), jnp.float32), st[0])
  else:
    w_hat = wq.astype(jnp.float32) * sw
    x_hat = xq.astype(jnp.float32) * sx
    dx = lax.dot_general(g2, w_hat, (((1,), (1,)), ((), ())))
    dw = lax.dot_general(x_hat, g2, (((0,), (0,)), ((), ())))
  if mx is not None:
    dx = jnp.where(mx, dx, 0.0)
  if mw is not None:
    dw = jnp.where(mw, dw, 0.0)
  seed_ct = None if seed is None else np.zeros(seed.shape, jax.dtypes.float0)
  return dx.astype(g.dtype), dw.astype(w_dtype.dtype), dsx, dsw, seed_ct


_w8a8.defvjp(_w8a8_fwd, _w8a8_bwd)


def int8_contraction(op: Contraction, wspec: QuantSpec, aspec: QuantSpec, w2: jax.Array,
                     x2: jax.Array, wkw: dict, akw: dict, *, backward_int8: bool,
                     key: jax.Array | None) -> jax.Array:
  """``op``'s result from the int8 matmul of its 2-D views (:func:`int8_applies` holds).

  ``wkw`` / ``akw`` are the operands' fake-quant kwargs (a learned or observed
  ``scale``; ``{}``: the current tensor's range). ``backward_int8`` runs the two
  backward matmuls in int8 too, with stochastic rounding of the gradient when ``key``
  is given. A gradient is masked outside the representable range exactly where the
  fake-quant STE masks it (learned or power-of-two scales).
  """
  w = lax.stop_gradient(w2)
  x = lax.stop_gradient(x2)
  sw = wkw["scale"] if wkw else quantizer.compute_qparams(w, wspec, group_axis=0)[0]
  sx = akw["scale"] if akw else quantizer.compute_qparams(x, aspec, group_axis=1)[0]
  sw, sx = lax.stop_gradient(sw), lax.stop_gradient(sx)
  mask_w = bool(wkw) or wspec.pow2_scale
  mask_x = bool(akw) or aspec.pow2_scale
  seed = None
  if backward_int8 and key is not None:
    seed = numerics.seed_from_key(key)
  y2 = _w8a8(x2, w2, sx, sw, seed, (mask_x, mask_w, backward_int8))
  return op.out_from_matrix(y2)


def int8_applies(op: Contraction, wspec: QuantSpec | None, aspec: QuantSpec | None) -> bool:
  """Whether the int8 matmul computes ``op`` exactly as fake quantization would: a plain
  matmul of float operands, both specs 8-bit signed symmetric round-to-nearest STE
  (weight per tensor or channel; activation per tensor, static or dynamic per row)."""
  return (op.matmul_ok and int8_spec_ok(wspec, act=False) and int8_spec_ok(aspec, act=True)
          and jnp.issubdtype(op.lhs.dtype, jnp.floating)
          and jnp.issubdtype(op.rhs.dtype, jnp.floating))
