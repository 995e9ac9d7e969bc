"""FQ-ViT's transformer quantizers, independent of Flax (Lin et al. 2022, "FQ-ViT:
Post-Training Quantization for Fully Quantized Vision Transformer").

* **PTF LayerNorm inputs** (sec. 3.2): one layer-wise scale ``s`` and zero point ``z``
  and a power-of-two factor ``2^alpha_c`` per channel (last axis),
  ``q = clip(round(x / (2^alpha_c s)) + z, qmin, qmax)``; in serving the LayerNorm
  statistics then need only integers and shifts, ``x_hat = ((q - z) << alpha_c) * s``
  (:func:`ptf_serve`). Calibration (FQ-ViT's ``PtfObserver``, :func:`ptf_observer_update`):
  per-channel running min / max give the layer range ``[lo, hi]``, ``s = s_K / 2^K``
  (``K = num_factors - 1``, ``s_K`` the asymmetric min-max scale), and each channel
  takes the ``alpha_c`` with the least squared error on the last calibration batch.
  In QAT the range and factors come from the current tensor
  (:func:`jaxq.quantizer.fake_quantize` with ``scheme="ptf"``).
* **log2 attention probabilities** (sec. 3.3): the softmax output ``P`` is quantized to
  ``P_hat = 2^-q``, ``q = clip(round(-log2 P), 0, 2^b - 1)`` (STE gradient); in serving
  ``P_hat @ V`` is computed from the integer codes as shifts
  (:func:`jaxq.estimators.log2_matmul`). :func:`log2_attention` is that product, given the
  probabilities; the Linen and NNX adapters (:mod:`jaxq.flax.fqvit`,
  :mod:`jaxq.flax.nnx_fqvit`) compute them with their Flax's attention-weights function.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxq import estimators
from jaxq import numerics
from jaxq.spec import QuantSpec

__all__ = ["ptf_observer_init", "ptf_observer_update", "ptf_observer_qparams", "ptf_serve",
           "log2_attention", "PTF_STATS", "PTF_SCALE", "PTF_ZERO_POINT", "PTF_FACTOR_EXP",
           "NUM_FACTORS"]

#: The PTF observer's state (Linen "quant_stats" variable, NNX attribute).
PTF_STATS = "jaxq_ptf"
#: Serving parameters of a PTF LayerNorm input: scale, zero point, per-channel exponents.
PTF_SCALE, PTF_ZERO_POINT, PTF_FACTOR_EXP = ("jaxq_ptf_scale", "jaxq_ptf_zero_point",
                                             "jaxq_ptf_factor_exp")
#: Power-of-two factors 1, 2, 4, 8 (FQ-ViT's K = 3).
NUM_FACTORS = 4

# --------------------------------------------------------------------------------------
# PTF observer (LayerNorm inputs)
# --------------------------------------------------------------------------------------


def ptf_observer_init(channels: int, num_factors: int = NUM_FACTORS) -> dict:
  """Empty PTF observer: per-channel ``lo``/``hi``, per-factor errors ``err[F, C]``, ``n``."""
  z = jnp.zeros((channels,), jnp.float32)
  return {"lo": z, "hi": z, "err": jnp.zeros((num_factors, channels), jnp.float32),
          "n": jnp.zeros((), jnp.float32)}


def _ptf_base(lo, hi, spec: QuantSpec, num_factors: int):
  top, zp = numerics.scale_zero_point(jnp.min(lo), jnp.max(hi), spec.bits,
                                      signed=spec.signed, symmetric=False)
  return top / 2.0 ** (num_factors - 1), zp


def ptf_observer_update(state: dict, x: jax.Array, spec: QuantSpec) -> dict:
  """Folds ``x`` (channels last) into the PTF observer (NaN/Inf ignored)."""
  x2 = jnp.asarray(x, jnp.float32).reshape(-1, jnp.shape(x)[-1])
  finite = jnp.isfinite(x2)
  lo_b = jnp.min(jnp.where(finite, x2, jnp.inf), axis=0)
  hi_b = jnp.max(jnp.where(finite, x2, -jnp.inf), axis=0)
  valid = jnp.any(finite, axis=0)
  lo_b, hi_b = jnp.where(valid, lo_b, 0.0), jnp.where(valid, hi_b, 0.0)
  first = state["n"] == 0
  lo = jnp.where(first, lo_b, jnp.where(valid, jnp.minimum(state["lo"], lo_b), state["lo"]))
  hi = jnp.where(first, hi_b, jnp.where(valid, jnp.maximum(state["hi"], hi_b), state["hi"]))
  f = state["err"].shape[0]
  base, zp = _ptf_base(lo, hi, spec, f)
  xf = jnp.where(finite, x2, 0.0)
  errs = []
  for a in range(f):
    s = base * 2.0**a
    x_hat = (jnp.clip(jnp.round(xf / s) + zp, spec.qmin, spec.qmax) - zp) * s
    errs.append(jnp.sum(jnp.where(finite, (xf - x_hat) ** 2, 0.0), axis=0))
  return {"lo": lo, "hi": hi, "err": jnp.stack(errs), "n": state["n"] + 1}


def ptf_observer_qparams(state: dict, spec: QuantSpec):
  """``(scale, zero_point, factor_exp)`` of the observed statistics (as
  :func:`jaxq.estimators.ptf_calibrate` on the last batch with the running range)."""
  base, zp = _ptf_base(state["lo"], state["hi"], spec, state["err"].shape[0])
  return base, zp, jnp.argmin(state["err"], axis=0).astype(jnp.int32)


def ptf_serve(x: jax.Array, scale, zero_point, factor_exp, spec: QuantSpec) -> jax.Array:
  """PTF quantize and reconstruct with integer shifts: ``((q - z) << alpha) * s``."""
  xf = x.astype(jnp.float32)
  factor_exp = jnp.asarray(factor_exp).astype(jnp.int32)
  step = scale * numerics.exp2_int(factor_exp)
  q = jnp.clip(jnp.round(xf / step) + zero_point, spec.qmin, spec.qmax)
  q = jnp.where(jnp.isnan(xf), zero_point, q).astype(jnp.int32)
  v = jnp.left_shift(q - jnp.asarray(zero_point).astype(jnp.int32), factor_exp)
  return (v.astype(jnp.float32) * scale).astype(x.dtype)


# --------------------------------------------------------------------------------------
# log2 attention
# --------------------------------------------------------------------------------------


def log2_attention(weights: jax.Array, value: jax.Array, bits: int, *, serving: bool,
                   dropout_rng: jax.Array | None = None, dropout_rate: float = 0.0,
                   broadcast_dropout: bool = True, deterministic: bool = True,
                   product: Callable[[jax.Array, jax.Array], jax.Array] | None = None
                   ) -> jax.Array:
  """``P_hat @ V`` of attention probabilities ``weights (..., h, q, k)`` and values
  ``value (..., k, h, d)`` -> ``(..., q, h, d)``, with ``P_hat = 2^-clip(round(-log2 P),
  0, 2^bits - 1)`` (STE gradient).

  With ``serving`` the product is computed from the integer codes by shifts
  (:func:`jaxq.estimators.log2_matmul`); otherwise by ``product(P_hat, value)``
  (default ``einsum("...hqk,...khd->...qhd")``). Dropout (training: ``deterministic``
  False and ``dropout_rate > 0``) applies after quantization, as Flax's attention
  applies it to the probabilities.
  """
  bits = numerics.check_bits(bits)
  wdt = weights.dtype
  use_codes = serving
  if use_codes:
    codes = estimators.log2_quantize(weights, bits)
  else:
    weights = estimators.log2_fake_quant(weights, bits)
  if not deterministic and dropout_rate > 0.0:
    keep_prob = 1.0 - dropout_rate
    shape = ((1,) * (weights.ndim - 2) + weights.shape[-2:] if broadcast_dropout
             else weights.shape)
    keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    mult = keep.astype(wdt) / jnp.asarray(keep_prob, wdt)
    if use_codes:  # dropout while serving is unusual; multiply the values
      weights, use_codes = estimators.log2_dequantize(codes, wdt) * mult, False
    else:
      weights = weights * mult
  if use_codes:
    # (..., h, q, k) codes x (..., k, h, d) values -> (..., q, h, d), by shifts.
    out = estimators.log2_matmul(codes, jnp.swapaxes(value, -2, -3))
    return jnp.swapaxes(out, -2, -3).astype(jnp.result_type(wdt, value.dtype))
  if product is None:
    return jnp.einsum("...hqk,...khd->...qhd", weights, value)
  return product(weights, value)
