"""FQ-ViT's quantizers (Lin et al. 2022, "FQ-ViT: Post-Training Quantization for Fully
Quantized Vision Transformer"): log2 codes for attention probabilities and power-of-two
factors (PTF) for LayerNorm inputs.

* :func:`log2_fake_quant`, :func:`log2_quantize`, :func:`log2_dequantize`,
  :func:`log2_matmul` -- ``q = clip(round(-log2 x), 0, 2^b - 1)``, ``x_hat = 2^-q``;
* :func:`ptf_fake_quant`, :func:`ptf_calibrate` -- one layer-wise scale times a
  per-channel power of two.

Conventions (dtypes, non-finite inputs) as in :mod:`jaxq.estimators`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import numerics
from jaxq.estimators.affine import fake_quant

ArrayLike = jax.typing.ArrayLike


# ------------------------------------------------------------- FQ-ViT log2 quantizer


def _log2_code(x: jax.Array) -> jax.Array:
  """Unclipped code ``round(-log2 x)`` in the compute dtype (``+inf`` for ``x = 0``)."""
  xf = x.astype(numerics.compute_dtype(x.dtype))
  return jnp.round(-jnp.log2(xf))


def log2_quantize(x: ArrayLike, bits: int) -> jax.Array:
  """FQ-ViT log2 codes of values in ``[0, 1]``: ``q = clip(round(-log2 x), 0, 2^b - 1)``.

  ``x = 0`` (and anything below ``2^-(2^b - 1.5)``) maps to the largest code
  ``2^b - 1``; ``x > 1`` maps to code 0. Negative and NaN inputs, which have no log2
  code, also map to the largest code (the value closest to 0). Returns uint8 codes.
  """
  bits = numerics.check_bits(bits)
  x = numerics.check_float(x)
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
  x = numerics.check_float(x)
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
  dt = numerics.compute_dtype(v.dtype) if jnp.issubdtype(v.dtype, jnp.floating) else jnp.float32
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
  x = numerics.check_float(x)
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
  x = numerics.check_float(x)
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
    x_hat = fake_quant(xf, scale * 2.0**a, zero_point, qmin, qmax)
    err = jnp.where(finite, (xf - x_hat) ** 2, 0.0)
    errors.append(jnp.sum(err, axis=red))
  factor_exp = jnp.argmin(jnp.stack(errors), axis=0).astype(jnp.int32)
  return scale, zero_point, factor_exp
