"""Fake-quantization ops with custom gradients: STE, LSQ/LSQ+, PACT, FQ-ViT log2 and PTF.

Every op here is a :func:`jax.custom_vjp` whose forward pass is the quantize-dequantize
round trip ``x_hat = (clip(round(x / s) + z, qmin, qmax) - z) * s`` (or a variant of it)
and whose backward pass is a chosen gradient estimator:

* :func:`fake_quant` -- straight-through estimator (Bengio et al. 2013; Jacob et al. 2018):
  ``d x_hat / d x = 1`` where the rounded code lies in ``[qmin, qmax]``, else 0; no
  gradient to the scale or the zero point.
* :func:`lsq_fake_quant` -- learned step size (Esser et al. 2020, "Learned Step Size
  Quantization") and learned offset (Bhalgat et al. 2020, "LSQ+"): the derivative of the
  forward formula with ``round`` treated as the identity, scaled by ``grad_scale``.
* :func:`pact_fake_quant` -- learned clipping level (Choi et al. 2018, "PACT").
* :func:`log2_fake_quant`, :func:`log2_quantize`, :func:`log2_dequantize`,
  :func:`log2_matmul` -- FQ-ViT's log2 quantizer for attention probabilities (Lin et al.
  2022, "FQ-ViT: Post-Training Quantization for Fully Quantized Vision Transformer").
* :func:`ptf_fake_quant`, :func:`ptf_calibrate` -- FQ-ViT's power-of-two factors: one
  layer-wise scale times a per-channel power of two, for LayerNorm inputs.
* :func:`lsq_init_scale` -- the LSQ paper's step-size initialisation.

Conventions shared by all ops:

* The output has the shape and dtype of ``x`` (bfloat16, float16, float32 in, the same
  out); the arithmetic is done in float32 (float64 for float64 inputs).
* ``scale``, ``zero_point``, ``qmin`` and ``qmax`` broadcast against ``x``: scalars for
  per-tensor, e.g. ``(1, C)`` for per-channel or ``(G, 1)`` on a
  :func:`jaxq.numerics.to_groups` view for per-group quantization. They may not enlarge
  ``x``'s shape. Power-of-two scales (:func:`jaxq.numerics.pow2`) are ordinary scales.
* Values training can reach: a scale of magnitude below
  :data:`jaxq.numerics.SCALE_EPS` (0 included) is used as ``+-SCALE_EPS``
  (:func:`jaxq.numerics.floor_scale`); a negative scale, which LSQ can learn, is a
  mirrored grid, ``fq(x; -s) = -fq(-x; s)``. A PACT ``alpha`` below
  ``(2^b - 1) * SCALE_EPS`` (0, negative) is used as that floor. Gradients are passed
  to the raw parameter (so a learned step can recover); a NaN scale propagates.
  ``qmin > qmax`` anywhere raises ValueError when the ranges are concrete (ints or
  arrays), and gives NaN at those elements when they are traced.
* ``round`` is round-half-to-even; with a PRNG ``key`` it is unbiased stochastic rounding
  ``floor(v + u)``, ``u ~ U[0, 1)`` (:func:`jaxq.numerics.round_stochastic`).
* "Inside the range" is decided on the rounded code ``round(x / s) + z``, exactly as the
  forward pass clips it (so ``x / s = qmax + 0.5`` rounding up to ``qmax + 1`` is outside).
* ``qmin``, ``qmax``, ``key``, ``grad_scale``, ``bits`` and integer-valued arguments are
  not differentiated (zero cotangents).

Non-finite inputs (the policy of :mod:`jaxq.numerics`): NaN propagates to the output and
+-Inf saturates to the nearest end of the integer range. A NaN or +-Inf element gets
zero ``d/dx`` (it is not inside the range); +-Inf counts as below/above the range for the
LSQ/PACT parameter gradients; a NaN element contributes NaN to the LSQ scale gradient so
that the problem is visible rather than hidden.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import numerics

ArrayLike = jax.typing.ArrayLike

__all__ = [
    "fake_quant",
    "lsq_fake_quant",
    "pact_fake_quant",
    "lsq_init_scale",
    "log2_quantize",
    "log2_dequantize",
    "log2_fake_quant",
    "log2_matmul",
    "ptf_fake_quant",
    "ptf_calibrate",
]


# ----------------------------------------------------------------------------- helpers


def _check_float(x: jax.Array, name: str = "x") -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array (bfloat16, float16, float32); "
                    f"got dtype {x.dtype}")


def _as_float(a: ArrayLike) -> jax.Array:
  """A step size or clipping level as a float array (integers become float32)."""
  a = jnp.asarray(a)
  return a if jnp.issubdtype(a.dtype, jnp.floating) else a.astype(jnp.float32)


def _compute_dtype(dtype) -> jnp.dtype:
  """float32, or float64 for float64 inputs: never compute in bf16/f16."""
  return jnp.promote_types(dtype, jnp.float32)


def _check_broadcast(x: jax.Array, arg: ArrayLike, name: str) -> None:
  shape = jnp.shape(arg)
  try:
    out = jnp.broadcast_shapes(x.shape, shape)
  except ValueError:
    out = None
  if out != x.shape:
    raise ValueError(f"{name} of shape {shape} must broadcast against x of shape "
                     f"{x.shape} without enlarging it")


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


def _round(v: jax.Array, key: jax.Array | None) -> jax.Array:
  if key is None:
    return numerics.round_nearest(v)
  return numerics.round_stochastic(v, key)


def _affine(x, scale, zero_point, qmin, qmax, key):
  """Shared forward arithmetic of the affine ops, in the compute dtype.

  Returns ``(v, r, q, x_hat)``: ``v = x / s``, ``r = round(v)``, the unclipped code
  ``q = r + z``, and ``x_hat = (clip(q, qmin, qmax) - z) * s``. ``|s|`` is floored at
  :data:`jaxq.numerics.SCALE_EPS` (NaN stays NaN), and a grid point beyond the largest
  finite float (a range reaching ``+-3.4e38`` in float32) dequantizes to that float.
  """
  dt = _compute_dtype(x.dtype)
  s = numerics.floor_scale(scale.astype(dt))
  z = zero_point.astype(dt)
  v = x.astype(dt) / s
  r = _round(v, key)
  q = r + z
  big = jnp.finfo(dt).max
  x_hat = jnp.clip((jnp.clip(q, qmin, qmax) - z) * s, -big, big)
  return v, r, q, x_hat


def _prepare_affine(x, scale, zero_point, qmin, qmax):
  x = jnp.asarray(x)
  _check_float(x)
  scale = _as_float(scale)
  zero_point = jnp.asarray(zero_point)
  for name, arg in (("scale", scale), ("zero_point", zero_point), ("qmin", qmin),
                    ("qmax", qmax)):
    _check_broadcast(x, arg, name)
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
  dt = _compute_dtype(x.dtype)
  a = _pact_alpha(alpha, bits, dt)
  s = a / (2**bits - 1)
  y = jnp.clip(x.astype(dt), 0.0, a)
  return _round(y / s, key) * s


def _pact_fwd(x, alpha, bits, key):
  return _pact_forward(x, alpha, bits, key).astype(x.dtype), (x, alpha)


def _pact_bwd(bits, res, g):
  x, alpha = res
  dt = _compute_dtype(x.dtype)
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
  x = jnp.asarray(x)
  _check_float(x)
  alpha = _as_float(alpha)
  _check_broadcast(x, alpha, "alpha")
  return _pact_jit(x, alpha, bits, key)


# ------------------------------------------------------------- FQ-ViT log2 quantizer


def _log2_code(x: jax.Array) -> jax.Array:
  """Unclipped code ``round(-log2 x)`` in the compute dtype (``+inf`` for ``x = 0``)."""
  xf = x.astype(_compute_dtype(x.dtype))
  return jnp.round(-jnp.log2(xf))


def log2_quantize(x: ArrayLike, bits: int) -> jax.Array:
  """FQ-ViT log2 codes of values in ``[0, 1]``: ``q = clip(round(-log2 x), 0, 2^b - 1)``.

  ``x = 0`` (and anything below ``2^-(2^b - 1.5)``) maps to the largest code
  ``2^b - 1``; ``x > 1`` maps to code 0. Negative and NaN inputs, which have no log2
  code, also map to the largest code (the value closest to 0). Returns uint8 codes.
  """
  bits = numerics.check_bits(bits)
  x = jnp.asarray(x)
  _check_float(x)
  return _log2_quantize(x, bits)


@functools.partial(jax.jit, static_argnums=1)
def _log2_quantize(x, bits):
  qmax = 2**bits - 1
  c = _log2_code(x)
  c = jnp.where(jnp.isnan(c), qmax, c)
  return jnp.clip(c, 0, qmax).astype(jnp.uint8)


def log2_dequantize(q: ArrayLike, dtype=jnp.float32) -> jax.Array:
  """``2^-q`` (exact, :func:`jaxq.numerics.exp2_int`) for log2 codes ``q``."""
  q = jnp.asarray(q)
  if not jnp.issubdtype(q.dtype, jnp.integer):
    q = jnp.round(q)  # float codes (e.g. from a fake-quant path) are integer-valued
  return numerics.exp2_int(-q.astype(jnp.int32), dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _log2_fq(x, bits):
  return _log2_fq_fwd(x, bits)[0]


def _log2_fq_fwd(x, bits):
  c = _log2_code(x)
  inside = (c >= 0) & (c <= 2**bits - 1)
  x_hat = numerics.exp2_int(-jnp.clip(c, 0, 2**bits - 1), x.dtype)
  # NaN and negative x have no code: keep NaN (exp2_int would map NaN to some code).
  return jnp.where(jnp.isnan(c), jnp.nan, x_hat).astype(x.dtype), inside


def _log2_fq_bwd(bits, inside, g):
  del bits
  return (jnp.where(inside, g, jnp.zeros_like(g)),)


_log2_fq.defvjp(_log2_fq_fwd, _log2_fq_bwd)
_log2_fq_jit = jax.jit(_log2_fq, static_argnums=1)


def log2_fake_quant(x: ArrayLike, bits: int) -> jax.Array:
  """FQ-ViT log2 fake quantization: ``x_hat = 2^-clip(round(-log2 x), 0, 2^b - 1)``.

  For attention probabilities in ``(0, 1]`` (Lin et al. 2022, sec. 3.3). Gradient
  (straight-through): ``d/dx = 1`` where the code is not clipped, i.e.
  ``0 <= round(-log2 x) <= 2^b - 1`` (for ``x`` in ``(0, 1]`` the lower end always holds;
  ``x = 0`` and tiny ``x`` that hit the largest code get 0), else 0.
  Non-finite: NaN and negative ``x`` give NaN; ``x = +inf`` gives 1 (code 0).
  """
  bits = numerics.check_bits(bits)
  x = jnp.asarray(x)
  _check_float(x)
  return _log2_fq_jit(x, bits)


def log2_matmul(q_codes: ArrayLike, v: ArrayLike) -> jax.Array:
  """``sum_j 2^-q_ij v_jk``: attention (log2 codes) times values, as in FQ-ViT.

  FQ-ViT evaluates ``Attn @ V`` with log2-quantized attention by bit shifts,
  ``2^-q v = v >> q``. In floating point the same shift is exact: ``2^-q * v`` only
  changes the exponent of ``v`` (for ``q <= 126`` and normal results), so this computes
  exactly the float product ``log2_dequantize(q) @ v``, accumulated in float32
  (``HIGHEST`` precision). Batch dimensions broadcast as in :func:`jnp.matmul`; ``v``
  may be an integer array (e.g. int8 quantized values; apply its scale afterwards).
  Returns float32 (float64 for float64 ``v``).
  """
  q_codes = jnp.asarray(q_codes)
  v = jnp.asarray(v)
  dt = _compute_dtype(v.dtype) if jnp.issubdtype(v.dtype, jnp.floating) else jnp.float32
  w = log2_dequantize(q_codes, dt)
  return jnp.matmul(w, v.astype(dt), precision=jax.lax.Precision.HIGHEST)


# ------------------------------------------------------- FQ-ViT power-of-two factor


def ptf_fake_quant(
    x: ArrayLike,
    scale: ArrayLike,
    zero_point: ArrayLike,
    factor_exp: ArrayLike,
    qmin: int | ArrayLike,
    qmax: int | ArrayLike,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
  """Power-of-Two-Factor fake quantization (FQ-ViT, Lin et al. 2022, sec. 3.2).

  One layer-wise scale ``s`` and zero point ``z``; each channel ``c`` (the LAST axis of
  ``x``) uses the step ``2^alpha_c * s``:
  ``x_q = clip(round(x / (2^alpha_c s)) + z, qmin, qmax)``,
  ``x_hat = (x_q - z) * 2^alpha_c * s``. ``factor_exp`` holds the integer ``alpha_c``
  (shape ``(C,)`` or broadcastable). Gradient: STE as in :func:`fake_quant`.
  """
  x = jnp.asarray(x)
  _check_float(x)
  factor_exp = jnp.asarray(factor_exp)
  if factor_exp.ndim > 1 or factor_exp.size not in (1, x.shape[-1] if x.ndim else 1):
    raise ValueError(f"factor_exp must have shape () or (C,) with C = x.shape[-1] = "
                     f"{x.shape[-1] if x.ndim else None}; got {factor_exp.shape}")
  scale = jnp.asarray(scale, jnp.float32) * numerics.exp2_int(factor_exp)
  return fake_quant(x, scale, zero_point, qmin, qmax, key=key)


def ptf_calibrate(
    x: ArrayLike, bits: int, *, num_factors: int = 4, signed: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """FQ-ViT PTF calibration: ``(scale, zero_point, factor_exp)`` for :func:`ptf_fake_quant`.

  As in FQ-ViT's ``PtfObserver``: the layer-wise min-max range (NaN/Inf ignored) gives
  the largest step ``s_K`` and the zero point ``z`` (:func:`jaxq.numerics.scale_zero_point`,
  asymmetric); the base scale is ``s = s_K / 2^K`` with ``K = num_factors - 1``; then
  each channel (last axis) takes the ``alpha_c`` in ``{0, ..., K}`` minimising the L2
  error ``sum (x - x_hat)^2`` of that channel (ties go to the smaller ``alpha_c``).

  Returns float32 scalars ``scale`` and ``zero_point`` and int32 ``factor_exp`` of shape
  ``(C,)``.
  """
  bits = numerics.check_bits(bits)
  if isinstance(num_factors, bool) or not isinstance(num_factors, (int, np.integer)) \
      or num_factors < 1:
    raise ValueError(f"num_factors must be an int >= 1; got {num_factors!r}")
  x = jnp.asarray(x)
  _check_float(x)
  if x.ndim < 1:
    raise ValueError("ptf_calibrate needs x with a channel (last) axis; got a scalar")
  return _ptf_calibrate(x, bits, num_factors, signed)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _ptf_calibrate(x, bits, num_factors, signed):
  qmin, qmax = numerics.int_range(bits, signed)
  lo, hi = numerics.minmax(x, tuple(range(x.ndim)))
  top, zero_point = numerics.scale_zero_point(
      lo.reshape(()), hi.reshape(()), bits, signed=signed, symmetric=False)
  k = num_factors - 1
  scale = top / 2.0**k
  xf = x.astype(jnp.float32)
  finite = jnp.isfinite(xf)
  red = tuple(range(x.ndim - 1))
  errors = []
  for a in range(num_factors):
    x_hat = _affine(xf, scale * 2.0**a, zero_point, qmin, qmax, None)[3]
    err = jnp.where(finite, (xf - x_hat) ** 2, 0.0)
    errors.append(jnp.sum(err, axis=red))
  factor_exp = jnp.argmin(jnp.stack(errors), axis=0).astype(jnp.int32)
  return scale, zero_point, factor_exp
