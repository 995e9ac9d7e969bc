"""STE, LSQ/LSQ+ and PACT: affine fake quantization with custom gradients.

The forward pass of every op is ``x_hat = (clip(round(x / s) + z, qmin, qmax) - z) * s``
(PACT: unsigned, ``s = alpha / (2^b - 1)`` after ``clip(x, 0, alpha)``); the backward pass
is the estimator. The conventions every op follows (dtypes, broadcasting, degenerate
scales, rounding, non-finite inputs) are in :mod:`jaxq.estimators`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import numerics

ArrayLike = jax.typing.ArrayLike


def _as_float(a: ArrayLike) -> jax.Array:
  """A step size or clipping level as a float array (integers become float32)."""
  a = jnp.asarray(a)
  return a if jnp.issubdtype(a.dtype, jnp.floating) else a.astype(jnp.float32)


def _sum_to_shape(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums a broadcast gradient back to the shape of the parameter it came from."""
  extra = g.ndim - len(shape)
  axes = tuple(range(extra)) + tuple(
      extra + i for i, d in enumerate(shape) if d == 1 and g.shape[extra + i] != 1)
  if axes:
    g = jnp.sum(g, axis=axes, keepdims=True)
  return g.reshape(shape)


def _param_cotangent(g: jax.Array, param: jax.Array) -> jax.Array | None:
  """``g`` summed to ``param``'s shape in its dtype; None (zero) for integer params."""
  if not jnp.issubdtype(param.dtype, jnp.inexact):
    return None
  return _sum_to_shape(g, param.shape).astype(param.dtype)


def _affine(x, scale, zero_point, qmin, qmax, key):
  """Shared forward arithmetic of the affine ops, in the compute dtype.

  Returns ``(v, r, q, x_hat)``: ``v = x / s``, ``r = round(v)``, the unclipped code
  ``q = r + z``, and ``x_hat = (clip(q, qmin, qmax) - z) * s``. ``|s|`` is floored at
  :data:`jaxq.numerics.SCALE_EPS` (NaN stays NaN), and a grid point beyond the largest
  finite float (a range reaching ``+-3.4e38`` in float32) dequantizes to that float.
  """
  dt = numerics.compute_dtype(x.dtype)
  s = numerics.floor_scale(scale.astype(dt))
  z = zero_point.astype(dt)
  v = x.astype(dt) / s
  r = numerics.round_with(v, key)
  q = r + z
  big = jnp.finfo(dt).max
  x_hat = jnp.clip((jnp.clip(q, qmin, qmax) - z) * s, -big, big)
  return v, r, q, x_hat


def _prepare_affine(x, scale, zero_point, qmin, qmax):
  x = numerics.check_float(x)
  scale = _as_float(scale)
  zero_point = jnp.asarray(zero_point)
  for name, arg in (("scale", scale), ("zero_point", zero_point), ("qmin", qmin),
                    ("qmax", qmax)):
    numerics.check_broadcast(name, arg, x.shape)
  lo, hi = _concrete(qmin), _concrete(qmax)
  if lo is not None and hi is not None and np.any(lo > hi):
    raise ValueError(f"qmin={lo.tolist()} must be <= qmax={hi.tolist()} (elementwise)")
  return x, scale, zero_point


def _concrete(a) -> np.ndarray | None:
  """``a`` as a NumPy array, or None when it is traced (its value unknown here)."""
  if isinstance(a, jax.core.Tracer):
    return None
  return np.asarray(a)


def _nan_where_empty_range(out: jax.Array, qmin, qmax) -> jax.Array:
  """NaN where a traced ``qmin > qmax`` (concrete ranges are checked up front)."""
  if _concrete(qmin) is not None and _concrete(qmax) is not None:
    return out
  return jnp.where(jnp.asarray(qmin) > jnp.asarray(qmax), jnp.asarray(jnp.nan, out.dtype), out)


# ------------------------------------------------------------------ STE fake quant


@jax.custom_vjp
def _ste(x, scale, zero_point, qmin, qmax, key):
  return _affine(x, scale, zero_point, qmin, qmax, key)[3].astype(x.dtype)


def _ste_fwd(x, scale, zero_point, qmin, qmax, key):
  _, _, q, x_hat = _affine(x, scale, zero_point, qmin, qmax, key)
  inside = (q >= qmin) & (q <= qmax)
  return x_hat.astype(x.dtype), inside


def _ste_bwd(inside, g):
  return jnp.where(inside, g, jnp.zeros_like(g)), None, None, None, None, None


_ste.defvjp(_ste_fwd, _ste_bwd)
# Jitted so that eager calls run as one program (inlined under an outer jit).
_ste_jit = jax.jit(_ste)


def fake_quant(
    x: ArrayLike,
    scale: ArrayLike,
    zero_point: ArrayLike,
    qmin: int | ArrayLike,
    qmax: int | ArrayLike,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
  """Uniform fake quantization with the straight-through estimator.

  Forward: ``x_hat = (clip(round(x / s) + z, qmin, qmax) - z) * s`` (round half to even;
  stochastic with ``key``). Backward (STE, Bengio et al. 2013):
  ``d x_hat / d x = 1`` where ``qmin <= round(x / s) + z <= qmax`` else 0; the scale and
  zero point get zero gradients.

  Args:
    x: floating-point input; the output has its shape and dtype.
    scale: positive step size, broadcastable against ``x``.
    zero_point: (integer-valued) zero point, broadcastable against ``x``.
    qmin, qmax: integer range ends (Python ints or broadcastable arrays).
    key: optional PRNG key for stochastic rounding.
  """
  x, scale, zero_point = _prepare_affine(x, scale, zero_point, qmin, qmax)
  return _nan_where_empty_range(_ste_jit(x, scale, zero_point, qmin, qmax, key), qmin, qmax)


# ------------------------------------------------------------------- LSQ / LSQ+


@jax.custom_vjp
def _lsq(x, scale, zero_point, qmin, qmax, grad_scale, key):
  return _affine(x, scale, zero_point, qmin, qmax, key)[3].astype(x.dtype)


def _lsq_fwd(x, scale, zero_point, qmin, qmax, grad_scale, key):
  x_hat = _affine(x, scale, zero_point, qmin, qmax, key)[3].astype(x.dtype)
  return x_hat, (x, scale, zero_point, qmin, qmax, grad_scale, key)


def _lsq_bwd(res, g):
  x, scale, zero_point, qmin, qmax, grad_scale, key = res
  v, r, q, _ = _affine(x, scale, zero_point, qmin, qmax, key)
  dt = v.dtype
  z = zero_point.astype(dt)
  below, above = q < qmin, q > qmax
  inside = (q >= qmin) & (q <= qmax)
  gf = g.astype(dt)
  gs = jnp.asarray(grad_scale, dt)
  # d x_hat / d s with round as identity: round(v) - v inside, qmin - z / qmax - z outside.
  ds_elem = jnp.where(below, qmin - z, jnp.where(above, qmax - z, r - v))
  # d x_hat / d z: 0 inside, -s outside.
  dz_elem = jnp.where(below | above, -scale.astype(dt), jnp.zeros((), dt))
  dx = jnp.where(inside, g, jnp.zeros_like(g))
  dscale = _param_cotangent(gf * ds_elem * gs, scale)
  dzero = _param_cotangent(gf * dz_elem * gs, zero_point)
  return dx, dscale, dzero, None, None, None, None


_lsq.defvjp(_lsq_fwd, _lsq_bwd)
_lsq_jit = jax.jit(_lsq)


def lsq_fake_quant(
    x: ArrayLike,
    scale: ArrayLike,
    zero_point: ArrayLike,
    qmin: int | ArrayLike,
    qmax: int | ArrayLike,
    grad_scale: float | ArrayLike | None = None,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
  """Fake quantization with a learnable step size (LSQ) and zero point (LSQ+).

  Forward as :func:`fake_quant`. Backward: the derivative of the forward formula with
  ``round`` treated as the identity (Esser et al. 2020, eq. 3; Bhalgat et al. 2020).
  With ``v = x / s`` and the code ``q = round(v) + z``:

  * ``d/dx = 1`` if ``qmin <= q <= qmax`` else 0;
  * ``d/ds = round(v) - v`` inside, ``qmin - z`` if ``q < qmin``, ``qmax - z`` if
    ``q > qmax``;
  * ``d/dz = 0`` inside, ``-s`` outside.

  The scale and zero-point gradients are summed to the parameters' shapes and multiplied
  by ``grad_scale``; ``None`` means LSQ's ``1 / sqrt(n * qmax)`` with ``n = x.size /
  scale.size``, the number of elements sharing one scale. ``zero_point`` may be a float
  (LSQ+ learns it); it is used as given, not rounded. An integer-dtype zero point gets no
  gradient.
  """
  x, scale, zero_point = _prepare_affine(x, scale, zero_point, qmin, qmax)
  if grad_scale is None:
    hi = _concrete(qmax)
    if hi is not None and np.any(hi <= 0):
      raise ValueError(f"grad_scale=None needs qmax > 0 for 1/sqrt(n * qmax); got "
                       f"qmax={hi.tolist()}. Pass grad_scale explicitly.")
    n = x.size / max(scale.size, 1)
    grad_scale = 1.0 / jnp.sqrt(n * jnp.asarray(qmax, jnp.float32))
  grad_scale = jnp.asarray(grad_scale, jnp.float32)
  return _nan_where_empty_range(_lsq_jit(x, scale, zero_point, qmin, qmax, grad_scale, key),
                                qmin, qmax)


def lsq_init_scale(
    x: ArrayLike, qmax: int | ArrayLike, axes: int | Sequence[int] | None = None
) -> jax.Array:
  """LSQ's step-size initialisation ``2 * mean(|x|) / sqrt(qmax)`` (Esser et al. 2020).

  The mean is over ``axes`` (all axes for None), kept as size-1 dims, and over finite
  elements only (NaN/Inf ignored, as in all range estimation); the result is float32 and
  floored at :data:`jaxq.numerics.SCALE_EPS`.
  """
  if isinstance(qmax, (int, np.integer)) and qmax <= 0:
    raise ValueError(f"qmax must be positive; got {qmax}")
  x = jnp.asarray(x, jnp.float32)
  if axes is None:
    axes = tuple(range(x.ndim))
  elif isinstance(axes, (int, np.integer)):
    axes = (int(axes),)
  axes = tuple(numerics.normalize_axis(a, x.ndim, "axes") for a in axes)
  finite = jnp.isfinite(x)
  total = jnp.sum(jnp.where(finite, jnp.abs(x), 0.0), axis=axes, keepdims=True)
  count = jnp.sum(finite, axis=axes, keepdims=True, dtype=jnp.float32)
  mean = total / jnp.maximum(count, 1.0)
  scale = 2.0 * mean / jnp.sqrt(jnp.asarray(qmax, jnp.float32))
  return jnp.maximum(scale, numerics.SCALE_EPS)


# ------------------------------------------------------------------------ PACT


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pact(x, alpha, bits, key):
  return _pact_forward(x, alpha, bits, key).astype(x.dtype)


def _pact_alpha(alpha, bits, dt):
  """``alpha`` floored so that its step ``alpha / (2^bits - 1)`` is at least SCALE_EPS."""
  a = alpha.astype(dt)
  floor = numerics.SCALE_EPS * (2**bits - 1)
  return jnp.where(a < floor, jnp.asarray(floor, dt), a)


def _pact_forward(x, alpha, bits, key):
  dt = numerics.compute_dtype(x.dtype)
  a = _pact_alpha(alpha, bits, dt)
  s = a / (2**bits - 1)
  y = jnp.clip(x.astype(dt), 0.0, a)
  return numerics.round_with(y / s, key) * s


def _pact_fwd(x, alpha, bits, key):
  return _pact_forward(x, alpha, bits, key).astype(x.dtype), (x, alpha)


def _pact_bwd(bits, res, g):
  x, alpha = res
  dt = numerics.compute_dtype(x.dtype)
  xf, a = x.astype(dt), _pact_alpha(alpha, bits, dt)
  dx = jnp.where((xf >= 0) & (xf < a), g, jnp.zeros_like(g))
  dalpha = jnp.where(xf >= a, g.astype(dt), jnp.zeros((), dt))
  return dx, _param_cotangent(dalpha, alpha), None


_pact.defvjp(_pact_fwd, _pact_bwd)
_pact_jit = jax.jit(_pact, static_argnums=2)


def pact_fake_quant(
    x: ArrayLike, alpha: ArrayLike, bits: int, *, key: jax.Array | None = None
) -> jax.Array:
  """PACT: parameterized clipping activation (Choi et al. 2018).

  Forward: ``y = clip(x, 0, alpha)``, then unsigned uniform quantization with
  ``s = alpha / (2^bits - 1)``: ``x_hat = round(y / s) * s``.
  Backward (PACT's straight-through derivative, paper eq. 3):
  ``d/dx = 1`` for ``0 <= x < alpha`` else 0; ``d/dalpha = 1`` where ``x >= alpha`` else
  0 (the rounding error inside the range is not propagated to alpha), summed to
  ``alpha``'s shape. ``alpha`` (positive) broadcasts against ``x``.

  An ``alpha`` that training drove to 0 or below is used as ``(2^bits - 1) *
  SCALE_EPS`` (the smallest step), and its gradient is passed to the raw ``alpha``
  unchanged, so that it can grow back; NaN propagates.
  """
  bits = numerics.check_bits(bits)
  x = numerics.check_float(x)
  alpha = _as_float(alpha)
  numerics.check_broadcast("alpha", alpha, x.shape)
  return _pact_jit(x, alpha, bits, key)
