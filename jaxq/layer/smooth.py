"""Smoothing and GPTQ rounding of one contraction (Contract 7), Flax-free.

On the 2-D views of a layer, ``x2: (M, K)`` input and ``w2: (K, N)`` kernel, a positive
``s: f32[K]`` leaves the float product unchanged, ``x2 @ w2 = (x2 / s) @ (s[:, None] *
w2)``, and the quantized layer computes ``quant(x2 / s) @ quant(s[:, None] * w2)``
(SmoothQuant, Xiao et al. 2023; AWQ, Lin et al. 2024; the math and the searches are in
:mod:`jaxq.smoothing`). What is stored for serving is the smoothed kernel ``s W`` (as its
QArray) and ``s``; the activation is divided by ``s`` in the same elementwise pass that
quantizes it (:func:`smoothed_input`; a static per-tensor activation scale ``a`` then
acts as the per-input-channel scale ``s * a``), so the integer matmul is unchanged.

Per layer, from the :class:`jaxq.layer.calib.LayerCalibration` that ``calibrate``
filled (the scaling is chosen when the calibration pass ends and recorded, so that QAT,
serving and the PTQ simulation share it; GPTQ runs at ``convert``;
:mod:`jaxq.layer.smooth_ptq`):

* ``Rule.smooth = alpha``: SmoothQuant's ``s_k = max|x_k|^alpha / max|W_k|^(1-alpha)``
  with an activation spec, AWQ's ``s_k = mean|x_k|^alpha`` (normalised) for a
  weight-only rule.
* ``Rule.smooth = "auto"``: alpha on a grid (AWQ's search for a weight-only rule), chosen
  by the layer's output error on held-back calibration tokens (the later half of the
  layer's token reservoir; statistics and activation ranges of the search from the
  earlier half), keeping the identity ``s = 1`` unless a scaling is strictly better
  there: a choice scored on the tokens it was fitted to overfits them (issue 19). The
  chosen alpha is then applied to the statistics of all calibration tokens.
* ``QuantSpec(rounding="gptq")``: :func:`jaxq.gptq.gptq_quantize` of the (smoothed)
  kernel with the Hessian of the (smoothed) inputs, ``H / (s s^T)``.

Smoothing needs the kernel's rows to be the input channels (``K`` of both views equal:
Dense / DenseGeneral, Einsum, 1x1 Conv); GPTQ needs a kernel whose contracted axes come
first (Dense / DenseGeneral layouts).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxq import gptq
from jaxq import quantizer
from jaxq import smoothing
from jaxq.layer.calib import LayerCalibration, reservoir_tokens, stats_range
from jaxq.layer.operands import act_view_spec
from jaxq.layer.views import Contraction, kernel_matrix
from jaxq.qarray import QArray, dequantize, quantize_with
from jaxq.spec import QuantSpec, Rule

__all__ = [
    "smoothed_operands", "smoothed_contraction", "smoothed_input", "SmoothingResult",
    "choose_smoothing", "smooth_kernel", "smoothed_act_qparams", "gptq_kernel",
    "view_qarray_to_kernel", "convert_weight", "HOLDOUT",
]

#: Fraction of a layer's token reservoir held back to score ``smooth="auto"``.
HOLDOUT = 0.5


def smoothed_operands(x2: jax.Array, w2: jax.Array, s: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
  """``(x2 / s, s[:, None] * w2)``: the same product in float."""
  return smoothing.smooth(x2, w2, s)


def smoothed_input(x2: jax.Array, s: jax.Array | None) -> jax.Array:
  """``x2 / s`` in ``x2``'s dtype (``x2`` when ``s`` is None): what the activation
  quantizer of a smoothed layer sees."""
  if s is None:
    return x2
  return (x2 / jnp.asarray(s, jnp.float32)).astype(x2.dtype)


def _check_rows(op_k: int, w_k: int, path: str) -> None:
  if op_k != w_k:
    raise ValueError(
        f"layer '{path}': Rule.smooth scales the kernel's rows by the input channels, but "
        f"its kernel has {w_k} contracted rows for {op_k} input channels (a Conv with a "
        "spatial kernel); exclude it from the smoothing rule")


def smoothed_contraction(op: Contraction, s: jax.Array, path: str) -> Contraction:
  """``op`` on the smoothed operands ``x / s`` and ``s W`` (QAT of a smoothed layer:
  hand the result to :func:`jaxq.layer.qat.qat_contraction`)."""
  x2, x_unview = op.lhs_matrix()
  w2, w_unview = op.rhs_matrix()
  _check_rows(x2.shape[1], w2.shape[0], path)
  xs, ws = smoothed_operands(x2, w2, s)
  return Contraction(op.kind, x_unview(xs), w_unview(ws), op.lhs_contract,
                     op.rhs_contract, op.compute, op.matmul_ok, op.out_shape)


class SmoothingResult(NamedTuple):
  """The scaling ``convert`` chose for one layer."""
  scale: jax.Array  # f32[K] (ones: the identity was kept)
  alpha: float | None  # None: identity
  held_back_error: float | None  # "auto": relative output error of the choice
  identity_error: float | None  # "auto": the same without smoothing


def _need(state: LayerCalibration | None, field: str, what: str, path: str):
  v = None if state is None else getattr(state, field)
  if v is None:
    raise ValueError(f"layer '{path}': {what} needs calibration statistics ({field}) that "
                     "calibrate never collected: run calibrate with this rule first")
  return v


def choose_smoothing(w2: jax.Array, rule: Rule, state: LayerCalibration | None,
                     path: str = "") -> SmoothingResult | None:
  """The scaling of the layer at ``path`` (kernel view ``w2: (K, N)``) for
  ``rule.smooth``; None when ``rule.smooth`` is None."""
  if rule.smooth is None:
    return None
  stats = _need(state, "stats", f"Rule.smooth={rule.smooth!r}", path)
  k = w2.shape[0]
  if stats.lo.shape != (k,):
    raise ValueError(f"layer '{path}': calibration statistics have {stats.lo.shape[0]} "
                     f"input channels, the kernel {k} rows")
  w2 = jnp.asarray(w2, jnp.float32)
  weight_only = rule.act is None
  mean_abs = smoothing.stats_mean_abs(stats.channels)

  def scales(alpha):
    if weight_only:
      return smoothing.awq_scales(mean_abs, alpha)
    return smoothing.smoothquant_scales(stats.channels.absmax, w2, alpha)

  if rule.smooth != "auto":
    return SmoothingResult(scales(float(rule.smooth)), float(rule.smooth), None, None)
  tokens = reservoir_tokens(_need(state, "tokens", "Rule.smooth='auto'", path))
  tokens = tokens[jnp.all(jnp.isfinite(tokens), axis=1)]
  if tokens.shape[0] < 2:
    raise ValueError(f"layer '{path}': Rule.smooth='auto' needs at least 2 finite "
                     f"calibration tokens; calibrate saw {tokens.shape[0]}")
  x_fit, x_eval = smoothing.split_tokens(tokens, HOLDOUT)
  if weight_only:
    choice = smoothing.search_awq(x_fit, x_eval, w2, rule.weight)
  else:
    act_view_spec(rule.act, path, k)  # the spec must fit the layer
    choice = smoothing.search_smoothquant(x_fit, x_eval, w2, rule.weight, rule.act)
  s = jnp.ones((k,), jnp.float32) if choice.alpha is None else scales(choice.alpha)
  return SmoothingResult(s, choice.alpha, choice.error, choice.identity_error)


def smooth_kernel(kernel: jax.Array, contract, s: jax.Array | None,
                  path: str = "") -> jax.Array:
  """The stored kernel of a smoothed layer: rows of its ``(K, N)`` view times ``s``."""
  if s is None:
    return kernel
  w2, unview = kernel_matrix(kernel, tuple(contract))
  _check_rows(jnp.shape(s)[0], w2.shape[0], path)
  return unview(smoothing.smooth(jnp.zeros((1, w2.shape[0]), w2.dtype), w2, s)[1])


def smoothed_act_qparams(state: LayerCalibration | None, s: jax.Array, act: QuantSpec,
                         path: str = "") -> dict:
  """Static activation ``{"scale", "zero_point"}`` of the smoothed input ``x / s``:
  the min-max range of ``x_k / s_k`` is ``[lo_k / s_k, hi_k / s_k]`` (``s > 0``), so
  the per-channel calibration range gives it exactly, at the spec's granularity."""
  stats = _need(state, "stats", "Rule.smooth with a static activation", path)
  count = stats.channels.count
  if not isinstance(count, jax.core.Tracer) and int(count) == 0:
    raise ValueError(f"layer '{path}': calibration saw no token of this layer")
  lo, hi = stats_range(stats)
  s = jnp.asarray(s, jnp.float32)
  aview = act_view_spec(act, path, s.shape[0])
  rows = jnp.stack([lo / s, hi / s])  # (2, K): same per-slice min and max as x / s
  scale, zp = quantizer.compute_qparams(rows, aview, group_axis=1)
  return {"scale": scale, "zero_point": zp}


def view_qarray_to_kernel(q2: QArray, kernel_shape, contract) -> QArray:
  """A QArray of a kernel's ``(K, N)`` view (contracted axes leading, in order) as the
  QArray of the kernel (same codes and scales; groups along the innermost contracted
  axis, as :mod:`jaxq.flax.kernel_qarray` lays them out)."""
  shape = tuple(int(d) for d in kernel_shape)
  nc = len(contract)
  if tuple(int(a) % len(shape) for a in contract) != tuple(range(nc)):
    raise ValueError(f"GPTQ needs a kernel whose contracted axes come first; got axes "
                     f"{tuple(contract)} of a kernel of shape {shape}")
  spec = q2.spec
  lead, out = shape[:nc], shape[nc:]
  if spec.granularity == "group":
    g = spec.group_size
    if lead[-1] % g:
      raise ValueError(f"QuantSpec.group_size={g} must divide the innermost input axis "
                       f"(length {lead[-1]}) of a kernel of shape {shape}")
    qshape = lead[:-1] + (lead[-1] // g, 1) + out
    ga = nc - 1
  elif spec.granularity == "channel":
    qshape, ga = (1,) * nc + out, 0
  else:
    qshape, ga = (1,) * len(shape), 0
  scale = jnp.reshape(q2.scale, qshape)
  zp = None if spec.symmetric else jnp.reshape(q2.zero_point, qshape)
  w = jnp.reshape(dequantize(q2).astype(jnp.float32), shape)
  q = quantize_with(w, spec, scale, zp, group_axis=ga)
  # A symmetric spec's zero point is 0: one scalar, as jaxq.flax.kernel_qarray stores it.
  zp = jnp.zeros((), q.zero_point.dtype) if spec.symmetric else q.zero_point
  return QArray(q.values, q.scale, zp, spec=spec, shape=shape, dtype=q2.dtype,
                group_axis=ga)


def gptq_kernel(kernel: jax.Array, contract, spec: QuantSpec,
                state: LayerCalibration | None, s: jax.Array | None = None, *,
                damping: float = gptq.DEFAULT_DAMPING, path: str = "") -> QArray:
  """The GPTQ QArray (kernel shape) of ``kernel`` (already smoothed by ``s`` when given)
  from the layer's calibration Hessian (of the smoothed inputs: ``H / (s s^T)``)."""
  hs = _need(state, "hessian", "QuantSpec(rounding='gptq')", path)
  if int(hs.count) == 0:
    raise ValueError(f"layer '{path}': GPTQ needs calibration tokens; calibrate saw no "
                     "finite token of this layer")
  w2, _ = kernel_matrix(jnp.asarray(kernel), tuple(contract))
  if w2.shape[0] != hs.xtx.shape[0]:
    raise ValueError(f"layer '{path}': GPTQ rounds the kernel's rows with the Hessian of "
                     f"its inputs; the kernel has {w2.shape[0]} contracted rows for "
                     f"{hs.xtx.shape[0]} input channels (a Conv with a spatial kernel)")
  if int(hs.count) < w2.shape[0]:
    warnings.warn(
        f"layer '{path}': GPTQ from {int(hs.count)} calibration tokens for {w2.shape[0]} "
        "inputs: with fewer tokens than inputs GPTQ measured worse than round-to-nearest "
        "on unseen tokens (benchmarks/RESULTS.md, 'GPTQ, AWQ and SmoothQuant at the op "
        "level'); calibrate on more tokens or raise the damping", UserWarning,
        stacklevel=2)
  h = gptq.hessian(hs)
  if s is not None:
    h = smoothing.smooth_hessian(h, s)
  try:
    q2 = gptq.gptq_quantize(w2, h, spec, damping=damping)
    return view_qarray_to_kernel(q2, jnp.shape(kernel), contract)
  except ValueError as e:
    raise ValueError(f"layer '{path}': {e}") from e


def convert_weight(kernel: jax.Array, contract, rule: Rule,
                   state: LayerCalibration | None, *,
                   damping: float = gptq.DEFAULT_DAMPING, path: str = ""
                   ) -> tuple[jax.Array | QArray, SmoothingResult | None]:
  """Smoothing and GPTQ for one layer's kernel at ``convert``.

  Returns ``(kernel_out, smoothing)``: ``kernel_out`` is the GPTQ QArray (kernel shape)
  when ``rule.weight.rounding == "gptq"``, else the (smoothed) float kernel, to be
  quantized as any kernel (round to nearest, the weight spec's calibration); the
  serving model divides the input by ``smoothing.scale`` (None: no smoothing).
  """
  w2, _ = kernel_matrix(jnp.asarray(kernel), tuple(contract))
  sm = choose_smoothing(w2, rule, state, path)
  s = None if sm is None else sm.scale
  k = smooth_kernel(kernel, contract, s, path)
  if rule.weight is not None and rule.weight.rounding == "gptq":
    k = gptq_kernel(k, contract, rule.weight, state, s, damping=damping, path=path)
  return k, sm
