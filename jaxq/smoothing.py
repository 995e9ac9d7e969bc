"""Equivalent per-input-channel scaling of a layer: SmoothQuant and AWQ.

On the 2-D views of a layer, ``x: (M, K)`` activations and ``W: (K, N)`` kernel, any
positive ``s: f32[K]`` gives the same output in float,

    x @ W = (x / s) @ (s[:, None] * W),

but moves quantization difficulty between the two factors: the layer computes
``quant(x / s) @ quant(s[:, None] * W)``.

* SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training
  Quantization for Large Language Models", ICML 2023), for W8A8: activation outliers
  live in a few input channels, so divide them out,
  ``s_k = max|x_k|^alpha / max_n |W_kn|^(1 - alpha)`` (:func:`smoothquant_scales`),
  ``alpha`` in ``[0, 1]`` (0.5 in the paper) balancing the two ranges.
* AWQ (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression
  and Acceleration", MLSys 2024), for weight-only quantization: scaling up the weight
  rows of salient (large-activation) channels lowers their relative rounding error,
  ``s_k = mean|x_k|^alpha`` normalised to ``sqrt(max s * min s) = 1``
  (:func:`awq_scales`); the layer computes ``x @ (Q(s W) / s)``.

A channel whose statistic is zero, NaN or Inf (or whose formula gives a non-finite or
zero scale) keeps ``s_k = 1``.

The per-layer searches (:func:`search_smoothquant`, :func:`search_awq`) choose ``alpha``
on a grid by the layer's relative output error ``||y_hat - y||^2 / ||y||^2`` on
*held-back* calibration tokens (statistics and static activation ranges come from the
other tokens; :func:`split_tokens`), and keep the identity ``s = 1`` unless a scaling
is strictly better there: a choice made on the tokens it was fitted to overfits them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import quantizer
from jaxq.spec import QuantSpec

SMOOTHQUANT_ALPHAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2).tolist())
AWQ_ALPHAS = tuple(np.linspace(0.0, 1.0, 20).tolist())

_HIGHEST = jax.lax.Precision.HIGHEST


class ChannelStats(NamedTuple):
  """Running per-input-channel activation statistics of one layer."""
  absmax: jax.Array  # f32[K]: max |x_k| (SmoothQuant)
  abssum: jax.Array  # f32[K]: sum |x_k| (AWQ's mean |x_k| = abssum / count)
  count: jax.Array  # i32[]: tokens seen


def stats_init(in_features: int) -> ChannelStats:
  """Empty statistics for a layer with ``in_features`` inputs (K)."""
  if isinstance(in_features, bool) or not isinstance(in_features, (int, np.integer)) or (
      in_features < 1):
    raise ValueError(f"in_features must be a positive int; got {in_features!r}")
  zeros = jnp.zeros((in_features,), jnp.float32)
  return ChannelStats(zeros, zeros, jnp.zeros((), jnp.int32))


def stats_update(stats: ChannelStats, x: jax.Array) -> ChannelStats:
  """Adds a batch ``x: (..., K)`` (leading axes are tokens). Pure and jit-able; an
  empty batch leaves ``stats`` unchanged; NaN / Inf propagate into the channel's
  statistic (and that channel then keeps scale 1)."""
  k = stats.absmax.shape[0]
  if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != k:
    raise ValueError(f"x must have shape (..., {k}) to match the statistics; got "
                     f"{jnp.shape(x)}")
  a = jnp.abs(jnp.reshape(jnp.asarray(x, jnp.float32), (-1, k)))
  return ChannelStats(jnp.maximum(stats.absmax, jnp.max(a, axis=0, initial=0.0)),
                      stats.abssum + jnp.sum(a, axis=0), stats.count + a.shape[0])


def stats_mean_abs(stats: ChannelStats) -> jax.Array:
  """``mean|x_k|`` over the tokens seen (zeros when none)."""
  return stats.abssum / jnp.maximum(stats.count, 1).astype(jnp.float32)


def check_alpha(alpha) -> float:
  """``alpha`` must be a number in ``[0, 1]``."""
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not (
      0.0 <= float(alpha) <= 1.0):
    raise ValueError(f"alpha must be a float in [0, 1]; got {alpha!r}")
  return float(alpha)


def _check_kernel(w) -> jax.Array:
  w = jnp.asarray(w)
  if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"w must be a 2-D float (K, N) kernel; got shape {w.shape}, dtype "
                     f"{w.dtype}")
  return w


def _check_channels(name: str, v, k: int) -> jax.Array:
  v = jnp.asarray(v, jnp.float32)
  if v.shape != (k,):
    raise ValueError(f"{name} must have shape (K,) = ({k},) to match the kernel; got "
                     f"{v.shape}")
  return v


def _guard(s: jax.Array, *stats: jax.Array) -> jax.Array:
  """1 where a statistic is zero or non-finite, or the scale is not finite and > 0."""
  ok = jnp.isfinite(s) & (s > 0)
  for v in stats:
    ok &= jnp.isfinite(v) & (v > 0)
  return jnp.where(ok, s, 1.0).astype(jnp.float32)


def smoothquant_scales(act_absmax: jax.Array, w: jax.Array, alpha: float) -> jax.Array:
  """SmoothQuant's ``s_k = max|x_k|^alpha / max_n |W_kn|^(1 - alpha)``: ``f32[K]``."""
  alpha = check_alpha(alpha)
  w = _check_kernel(w)
  a = _check_channels("act_absmax", act_absmax, w.shape[0])
  wmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=1)
  return _guard(a ** alpha / wmax ** (1.0 - alpha), a, wmax)


def awq_scales(act_mean_abs: jax.Array, alpha: float) -> jax.Array:
  """AWQ's ``s_k = mean|x_k|^alpha / sqrt(max_j s_j * min_j s_j)``: ``f32[K]``."""
  alpha = check_alpha(alpha)
  a = jnp.asarray(act_mean_abs, jnp.float32)
  if a.ndim != 1:
    raise ValueError(f"act_mean_abs must have shape (K,); got {a.shape}")
  s = _guard(a ** alpha, a)
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def smooth(x: jax.Array, w: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(x / s, s[:, None] * W)``: the same product in float."""
  w = _check_kernel(w)
  s = _check_channels("s", s, w.shape[0])
  return (x / s).astype(x.dtype), (s[:, None] * w).astype(w.dtype)


def smooth_hessian(h: jax.Array, s: jax.Array) -> jax.Array:
  """The Hessian ``2 (x/s)^T (x/s) / n = H / (s s^T)`` of smoothed inputs (for GPTQ
  after AWQ or SmoothQuant)."""
  s = jnp.asarray(s, jnp.float32)
  return h / (s[:, None] * s[None, :])


def split_tokens(x: jax.Array, holdout: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """``(x_fit, x_eval)``: the last ``holdout`` fraction of the tokens (rows of the
  ``(M, K)`` view; keep the calibration order so they come from other batches) is held
  back to choose the scaling; at least one token on each side."""
  if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not (
      0.0 < holdout < 1.0):
    raise ValueError(f"holdout must be a float in (0, 1); got {holdout!r}")
  x = jnp.reshape(x, (-1, jnp.shape(x)[-1]))
  m = x.shape[0]
  if m < 2:
    raise ValueError(f"x needs at least 2 tokens to hold some back; got {m}")
  n_eval = min(max(1, int(round(m * holdout))), m - 1)
  return x[:m - n_eval], x[m - n_eval:]


def _fake_act(x_fit, x_eval, spec: QuantSpec | None):
  """The evaluation tokens quantized as served: static ranges from the fit tokens."""
  if spec is None:
    return x_eval
  if spec.dynamic:  # per row (and group along K), from the row itself
    dyn = spec.replace(granularity="channel" if spec.granularity == "tensor" else
                       spec.granularity, axis=0, dynamic=False)
    return quantizer.fake_quantize(x_eval, dyn, group_axis=1)
  if spec.granularity != "tensor":  # per input channel / group of channels
    spec = spec.replace(axis=-1)
  scale, zp = quantizer.compute_qparams(x_fit, spec, group_axis=1)
  return quantizer.fake_quantize(x_eval, spec, scale=scale, zero_point=zp, group_axis=1)


@functools.partial(jax.jit, static_argnames=("weight_spec", "act_spec", "weight_only"))
def scaled_output_error(x_fit, x_eval, w, s, weight_spec: QuantSpec | None,
                        act_spec: QuantSpec | None, weight_only: bool = False):
  """Relative output error ``||y_hat - y||^2 / ||y||^2`` on ``x_eval`` of the layer
  scaled by ``s``: ``quant(x / s) @ quant(s W)`` (activation ranges from ``x_fit / s``),
  or ``x @ (Q(s W) / s)`` when ``weight_only``. Float32, full-precision matmuls."""
  x_fit = x_fit.astype(jnp.float32)
  x_eval = x_eval.astype(jnp.float32)
  w = w.astype(jnp.float32)
  y = jnp.matmul(x_eval, w, precision=_HIGHEST)
  sw = s[:, None] * w
  wq = sw if weight_spec is None else quantizer.fake_quantize(sw, weight_spec)
  if weight_only:
    y_hat = jnp.matmul(x_eval, wq / s[:, None], precision=_HIGHEST)
  else:
    xq = _fake_act(x_fit / s, x_eval / s, act_spec)
    y_hat = jnp.matmul(xq, wq, precision=_HIGHEST)
  return jnp.sum((y_hat - y) ** 2) / jnp.maximum(jnp.sum(y ** 2), 1e-30)


class SmoothingChoice(NamedTuple):
  """Result of a per-layer search."""
  scale: jax.Array  # f32[K]; ones when the identity was kept
  alpha: float | None  # the chosen alpha, None for the identity
  error: float  # held-back relative output error of the choice
  identity_error: float  # held-back error without scaling
  errors: dict  # {alpha: held-back error} over the grid


def _check_search(x_fit, x_eval, w, alphas):
  w = _check_kernel(w)
  k = w.shape[0]
  for name, x in (("x_fit", x_fit), ("x_eval", x_eval)):
    if jnp.ndim(x) != 2 or jnp.shape(x)[1] != k or jnp.shape(x)[0] < 1:
      raise ValueError(f"{name} must be (M, K) = (M >= 1, {k}) tokens; got "
                       f"{jnp.shape(x)}")
  alphas = tuple(check_alpha(a) for a in alphas)
  if not alphas:
    raise ValueError("alphas must hold at least one value in [0, 1]")
  return w, alphas


def _search(x_fit, x_eval, w, scales_of, alphas, weight_spec, act_spec, weight_only):
  err = lambda s: float(scaled_output_error(
      x_fit, x_eval, w, s, weight_spec, act_spec, weight_only))
  ones = jnp.ones((w.shape[0],), jnp.float32)
  identity = err(ones)
  errors = {a: err(scales_of(a)) for a in alphas}
  best = min(errors, key=errors.get)
  if errors[best] < identity:
    return SmoothingChoice(scales_of(best), best, errors[best], identity, errors)
  return SmoothingChoice(ones, None, identity, identity, errors)


def search_smoothquant(x_fit, x_eval, w, weight_spec: QuantSpec | None,
                       act_spec: QuantSpec | None, alphas=SMOOTHQUANT_ALPHAS
                       ) -> SmoothingChoice:
  """SmoothQuant "auto": the alpha minimising the held-back error of
  ``quant(x / s) @ quant(s W)``; scales from ``max|x_fit|``; identity unless better.

  The weight is fake-quantized with its own min-max qparams; a static activation with
  min-max qparams of ``x_fit / s`` (whatever ``act_spec.calibration`` says: the search
  ranks scalings, the range setting proper is calibrate's job), a dynamic one per
  token of ``x_eval / s``.
  """
  w, alphas = _check_search(x_fit, x_eval, w, alphas)
  if weight_spec is None and act_spec is None:
    raise ValueError("smoothing needs a weight spec or an activation spec; both are None")
  absmax = stats_update(stats_init(w.shape[0]), x_fit).absmax
  return _search(x_fit, x_eval, w, lambda a: smoothquant_scales(absmax, w, a), alphas,
                 weight_spec, act_spec, False)


def search_awq(x_fit, x_eval, w, weight_spec: QuantSpec, alphas=AWQ_ALPHAS
               ) -> SmoothingChoice:
  """AWQ for a weight-only rule: the alpha minimising the held-back error of
  ``x @ (Q(s W) / s)`` with ``s = mean|x_fit|^alpha``; identity unless better."""
  w, alphas = _check_search(x_fit, x_eval, w, alphas)
  if not isinstance(weight_spec, QuantSpec):
    raise ValueError(f"AWQ needs a weight spec (jaxq.QuantSpec); got {weight_spec!r}")
  mean_abs = stats_mean_abs(stats_update(stats_init(w.shape[0]), x_fit))
  return _search(x_fit, x_eval, w, lambda a: awq_scales(mean_abs, a), alphas,
                 weight_spec, None, True)
