"""Spec-driven fake quantization: a :class:`~jaxq.spec.QuantSpec` in, the right op out.

Every higher layer (params trees, Flax modules, PTQ) quantizes through two functions:

* :func:`compute_qparams` -- min-max ``(scale, zero_point)`` of a tensor at the spec's
  granularity (Nagel et al. 2021, "A White Paper on Neural Network Quantization", sec. 2);
* :func:`fake_quantize` -- ``x -> x_hat`` with the spec's scheme, estimator and rounding,
  dispatching to the custom-VJP ops of :mod:`jaxq.estimators`.

Layout of scales. For "tensor" and "channel" the scale broadcasts against ``x`` itself
(keepdims: per-tensor ``(1, ..., 1)``, per-channel ``1`` everywhere but ``spec.axis``).
For "group" it broadcasts against the *grouped view* ``numerics.to_groups(x, g,
group_axis)``, which splits ``group_axis`` (length ``n``) into ``(n // g, g)``: one scale
per (group, channel), i.e. shape ``1`` everywhere but the group-count axis ``group_axis``
and the channel axis ``spec.axis`` (shifted by one when it lies after ``group_axis``;
not kept separately when it *is* the grouped axis). :func:`quant_view`,
:func:`from_quant_view`, :func:`quant_axes` and :func:`stat_shape` expose this layout so
that observers (:mod:`jaxq.calibration`) and learnable steps can use it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxq import estimators
from jaxq import nf4
from jaxq import numerics
from jaxq.spec import QuantSpec, check_spec


# ---------------------------------------------------------------------------------------
# Scale layout
# ---------------------------------------------------------------------------------------


def quant_view(x: jax.Array, spec: QuantSpec, group_axis: int = 0) -> jax.Array:
  """The array the scales broadcast against: ``x`` itself, or its grouped view."""
  if spec.granularity == "group":
    if jnp.ndim(x) == 0:
      raise ValueError("granularity='group' needs an array of rank >= 1; got a scalar")
    return numerics.to_groups(x, spec.group_size, group_axis)
  return x


def from_quant_view(xv: jax.Array, spec: QuantSpec, group_axis: int = 0) -> jax.Array:
  """Inverse of :func:`quant_view`."""
  if spec.granularity == "group":
    return numerics.from_groups(xv, group_axis)
  return xv


def quant_axes(ndim: int, spec: QuantSpec, group_axis: int = 0) -> tuple[int, ...]:
  """Axes of the quant view (:func:`quant_view`) that one scale is shared over.

  ``ndim`` is the rank of ``x`` (not of its grouped view).
  """
  if spec.granularity == "tensor" or ndim == 0:
    return tuple(range(ndim))
  channel = numerics.normalize_axis(spec.axis, ndim, "QuantSpec.axis")
  if spec.granularity == "channel":
    return numerics.reduction_axes(ndim, "channel", channel)
  group = numerics.normalize_axis(group_axis, ndim, "group_axis")
  keep = {group}
  if channel != group:
    keep.add(channel if channel < group else channel + 1)
  return tuple(a for a in range(ndim + 1) if a not in keep)


def stat_shape(shape: tuple[int, ...], spec: QuantSpec, group_axis: int = 0
               ) -> tuple[int, ...]:
  """Shape of ``scale`` / ``zero_point`` (keepdims, against the quant view) for ``shape``."""
  shape = tuple(shape)
  if spec.granularity == "group":
    if not shape:
      raise ValueError("granularity='group' needs an array of rank >= 1; got a scalar")
    ga = numerics.normalize_axis(group_axis, len(shape), "group_axis")
    n, g = shape[ga], spec.group_size
    if n % g:
      raise ValueError(
          f"group_size={g} must divide the length {n} of the grouped axis {ga} "
          f"(shape {shape})")
    shape = shape[:ga] + (n // g, g) + shape[ga + 1:]
  axes = quant_axes(len(shape) - (spec.granularity == "group"), spec, group_axis)
  return tuple(1 if a in axes else d for a, d in enumerate(shape))


# ---------------------------------------------------------------------------------------
# Quantization parameters
# ---------------------------------------------------------------------------------------


def qparams_from_range(lo: jax.Array, hi: jax.Array, spec: QuantSpec
                       ) -> tuple[jax.Array, jax.Array]:
  """``(scale, zero_point)`` (float32; float64 for a float64 range) mapping the real range ``[lo, hi]`` per the spec.

  Thin wrapper over :func:`jaxq.numerics.scale_zero_point` with the spec's bits,
  signedness, symmetry and power-of-two option.
  """
  spec = check_spec(spec)
  return numerics.scale_zero_point(
      lo, hi, spec.bits, signed=spec.signed, symmetric=spec.symmetric,
      pow2_scale=spec.pow2_scale)


def compute_qparams(x: jax.Array, spec: QuantSpec, *, group_axis: int = 0
                    ) -> tuple[jax.Array, jax.Array]:
  """Min-max ``(scale, zero_point)`` of ``x`` at ``spec.granularity``.

  The range of each slice is its finite min and max (NaN and +-Inf ignored, a slice
  with no finite value counts as ``[0, 0]``); see :func:`qparams_from_range`. The
  results are float32 (float64 for float64 ``x``) with the keepdims layout described in the module docstring:
  they broadcast against ``x``, or against ``to_groups(x, spec.group_size, group_axis)``
  for "group".
  """
  spec = check_spec(spec)
  if spec.scheme == "nf4":
    raise ValueError("scheme='nf4' has no (scale, zero_point): its absmax per group comes "
                     "from jaxq.nf4.nf4_codes")
  x = numerics.check_float(x)
  xv = quant_view(x, spec, group_axis)
  lo, hi = numerics.minmax(xv, quant_axes(x.ndim, spec, group_axis))
  return qparams_from_range(lo, hi, spec)


# ---------------------------------------------------------------------------------------
# Fake quantization
# ---------------------------------------------------------------------------------------


def _rounding_key(spec: QuantSpec, key, require_key: bool):
  """The key to round with: None means round to nearest."""
  if spec.rounding != "stochastic":
    return None
  if key is None:
    if require_key:
      raise ValueError(
          "QuantSpec.rounding='stochastic' needs a PRNG key: pass key=jax.random.key(...)"
          " (or require_key=False to round to nearest when no key is given)")
    return None
  return key


def fake_quantize(
    x: jax.Array,
    spec: QuantSpec,
    *,
    group_axis: int = 0,
    scale: jax.Array | None = None,
    zero_point: jax.Array | None = None,
    alpha: jax.Array | None = None,
    factor_exp: jax.Array | None = None,
    key: jax.Array | None = None,
    grad_scale: float | jax.Array | None = None,
    require_key: bool = True,
) -> jax.Array:
  """Quantize-dequantize ``x`` as ``spec`` says; returns an array of x's shape and dtype.

  Dispatch on ``spec.scheme`` and ``spec.estimator``:

  * "uniform" + "ste": :func:`jaxq.estimators.fake_quant`. Without ``scale`` the
    min-max qparams of ``x`` (:func:`compute_qparams`) are used, behind
    ``stop_gradient`` (the range follows the data; no gradient flows into it).
  * "uniform" + "lsq": :func:`jaxq.estimators.lsq_fake_quant` (LSQ, Esser et al. 2020;
    LSQ+ with a learned ``zero_point``, Bhalgat et al. 2020). ``scale`` is the learned
    step and must be given; ``grad_scale`` is passed on (None: ``1/sqrt(n * qmax)``).
  * "uniform" + "pact": :func:`jaxq.estimators.pact_fake_quant` (Choi et al. 2018) with
    the learned clipping level ``alpha``. Give ``alpha`` directly, or ``scale``
    (then ``alpha = scale * qmax``, so a PACT quantizer can be driven by the same
    step-size parameter as the others); one of them is required.
  * "log2": :func:`jaxq.estimators.log2_fake_quant` (FQ-ViT; no parameters).
  * "ptf": :func:`jaxq.estimators.ptf_fake_quant` (FQ-ViT power-of-two factors over the
    last axis; ``spec.granularity`` does not apply). Give ``scale``, ``zero_point`` and
    ``factor_exp`` together, or none of them to calibrate on ``x`` with
    :func:`jaxq.estimators.ptf_calibrate` (behind ``stop_gradient``).
  * "nf4": :func:`jaxq.nf4.nf4_fake_quant` (straight-through): one absmax per
    ``group_size`` consecutive elements of ``group_axis`` and per index of every other
    axis (``spec.axis`` does not apply); no parameters.

  ``zero_point`` defaults to 0 when ``scale`` is given for a symmetric spec; an
  asymmetric spec with an explicit ``scale`` needs it too. Scales and zero points
  broadcast against ``x`` (or its grouped view for "group", see module docstring).

  Rounding: ``spec.rounding == "stochastic"`` rounds ``floor(v + u)`` with ``key``
  (not available for "log2"). A missing key raises ValueError, unless ``require_key=False``,
  which rounds to nearest instead (the Flax contract: "rounds to nearest otherwise").
  With ``rounding="nearest"`` or ``"gptq"`` (GPTQ happens in ``convert``; here a
  weight rounds to nearest) the key is ignored.

  Inputs narrower than float32 (bf16, f16) are quantized in float32 and cast back.
  NaN propagates; +-Inf saturates to the ends of the range.
  """
  spec = check_spec(spec)
  x = numerics.check_float(x)
  key = _rounding_key(spec, key, require_key)
  if grad_scale is not None and not (spec.scheme == "uniform" and spec.estimator == "lsq"):
    raise ValueError(
        "grad_scale is only used by estimator='lsq' with scheme='uniform'; got "
        f"estimator={spec.estimator!r}, scheme={spec.scheme!r}")
  if alpha is not None and not (spec.scheme == "uniform" and spec.estimator == "pact"):
    raise ValueError("alpha is only used by estimator='pact' with scheme='uniform'")
  if factor_exp is not None and spec.scheme != "ptf":
    raise ValueError("factor_exp is only used by scheme='ptf'")
  dtype = x.dtype
  xc = x.astype(numerics.compute_dtype(dtype))

  if spec.scheme == "log2":
    if key is not None:
      raise ValueError(
          "QuantSpec.rounding='stochastic' is not supported with scheme='log2'")
    if scale is not None or zero_point is not None:
      raise ValueError("scheme='log2' has no scale or zero_point; do not pass them")
    return estimators.log2_fake_quant(xc, spec.bits).astype(dtype)
  if spec.scheme == "ptf":
    given = [v is not None for v in (scale, zero_point, factor_exp)]
    if any(given) and not all(given):
      raise ValueError(
          "scheme='ptf' needs scale, zero_point and factor_exp together (or none of "
          "them, to calibrate on x)")
    if not any(given):
      scale, zero_point, factor_exp = jax.lax.stop_gradient(
          estimators.ptf_calibrate(xc, spec.bits, signed=spec.signed))
    return estimators.ptf_fake_quant(
        xc, scale, zero_point, factor_exp, spec.qmin, spec.qmax, key=key).astype(dtype)

  if spec.scheme == "nf4":
    if scale is not None or zero_point is not None:
      raise ValueError("scheme='nf4' takes its absmax from x; do not pass scale or "
                       "zero_point")
    return nf4.nf4_fake_quant(x, spec.group_size,
                              numerics.normalize_axis(group_axis, x.ndim, "group_axis"))

  xv = quant_view(xc, spec, group_axis)
  if spec.estimator == "pact":
    if alpha is None:
      if scale is None:
        raise ValueError(
            "estimator='pact' needs the learned clipping level: pass alpha= (or scale=, "
            "then alpha = scale * qmax)")
      alpha = jnp.asarray(scale) * spec.qmax
    numerics.check_broadcast("alpha", alpha, xv.shape)
    out = estimators.pact_fake_quant(xv, alpha, spec.bits, key=key)
    return from_quant_view(out, spec, group_axis).astype(dtype)

  if scale is None:
    if spec.estimator == "lsq":
      raise ValueError(
          "estimator='lsq' learns its step size: pass scale= (e.g. initialised with "
          "jaxq.estimators.lsq_init_scale)")
    if zero_point is not None:
      raise ValueError("zero_point given without scale; pass both or neither")
    scale, zero_point = jax.lax.stop_gradient(compute_qparams(xc, spec, group_axis=group_axis))
  elif zero_point is None:
    if not spec.symmetric:
      raise ValueError(
          "an asymmetric spec (symmetric=False) with an explicit scale needs zero_point")
    zero_point = jnp.zeros((), jnp.float32)
  numerics.check_broadcast("scale", scale, xv.shape)
  numerics.check_broadcast("zero_point", zero_point, xv.shape)
  if spec.estimator == "lsq":
    out = estimators.lsq_fake_quant(
        xv, scale, zero_point, spec.qmin, spec.qmax, grad_scale, key=key)
  else:
    out = estimators.fake_quant(xv, scale, zero_point, spec.qmin, spec.qmax, key=key)
  return from_quant_view(out, spec, group_axis).astype(dtype)
