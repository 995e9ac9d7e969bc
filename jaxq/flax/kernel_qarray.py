"""A layer's stored kernel as a :class:`~jaxq.qarray.QArray`, in the kernel's own layout.

What :func:`jaxq.flax.ptq.convert` does to one kernel, and :mod:`jaxq.flax.ptq`'s
simulation mode to one kernel in a trace: scales per tensor, per output feature (every
non-contracted axis) or per output feature and group of ``group_size`` consecutive
elements of the innermost contracted axis; ranges from ``QuantSpec.calibration`` or from
steps learned in QAT (LSQ / PACT); float32 scales (served weights equal the QAT weights)
or, on request, compact float16 / float8 scales; stacked layers (``nn.scan`` /
``nn.vmap``) quantized one layer at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxq import calibration
from jaxq import numerics
from jaxq import quantizer
from jaxq.layer.operands import WEIGHT_ALPHA, WEIGHT_SCALE, WEIGHT_ZERO_POINT
from jaxq.params import looks_stacked, output_axes, per_layer
from jaxq.qarray import QArray, quantize_with
from jaxq.spec import QuantSpec, learned_step

__all__ = ["SCALE_FORMATS", "check_axes", "convert_kernel", "infer_contract",
           "kernel_stack", "learned_kernel", "quantize_kernel",
           "round_up_scale", "served_kernel"]


def check_axes(shape, contract) -> tuple[int, ...]:
  nd = len(shape)
  axes = tuple(sorted({int(a) % nd for a in contract}))
  if not axes or len(axes) == nd:
    raise ValueError(f"contraction axes {tuple(contract)} of a kernel of shape {shape} must "
                     "leave at least one contracted and one output axis")
  return axes


def _kernel_reduction(shape, spec: QuantSpec, contract) -> tuple[tuple[int, ...], int]:
  """(axes of the quant view one scale is shared over, group axis)."""
  nd = len(shape)
  if spec.granularity == "tensor":
    return tuple(range(nd)), 0
  if spec.granularity == "channel":
    return tuple(contract), 0
  ga = max(contract)  # innermost contracted axis (Flax kernels are (..., in, out))
  if shape[ga] % spec.group_size:
    raise ValueError(f"weight group_size={spec.group_size} does not divide the innermost "
                     f"input axis (length {shape[ga]}) of a kernel of shape {tuple(shape)}")
  return (ga + 1,), ga


#: Compact scale formats of symmetric weights: (dtype, mantissa bits, min normal, max).
#: 8-bit float scales per group of 4-bit weights as in the OCP MX / NVFP4 formats; the
#: exponent bias of e4m3b11 covers typical weight steps (1e-3 .. 30) without a
#: second-level scale.
SCALE_FORMATS = {
    "float8": (jnp.float8_e4m3b11fnuz, 3, 2.0**-10, 30.0),
    "float16": (jnp.float16, 10, 2.0**-14, 65504.0),
}


def _scale_format(spec: QuantSpec, compact: bool) -> str | None:
  """The compact scale format of ``spec`` (None: float32 scales, the trained values)."""
  if not compact or not spec.symmetric:
    return None
  return "float8" if spec.bits <= 4 else "float16"


def round_up_scale(scale: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array]:
  """``(s_up, ok)``: each scale rounded UP to the nearest value of format ``fmt`` (so no
  weight clips), where that value is a normal number of the format; ``s`` elsewhere."""
  _, m, lo, hi = SCALE_FORMATS[fmt]
  s = jnp.asarray(scale, jnp.float32)
  _, ex = jnp.frexp(s)  # s = f 2^ex, f in [0.5, 1): the format's step is 2^(ex - 1 - m)
  step = numerics.exp2_int(ex - 1 - m)
  up = jnp.ceil(s / step) * step
  ok = (up >= lo) & (up <= hi)
  return jnp.where(ok, up, s), ok


def quantize_kernel(w: jax.Array, spec: QuantSpec, contract, *, compact: bool = False
                    ) -> QArray:
  """``w`` (a kernel) as a :class:`QArray` of its own shape for a contraction over ``contract``.

  "tensor": one scale; "channel": one per output feature (every non-contracted index);
  "group": one per output feature and per ``group_size`` consecutive elements of the
  innermost contracted axis (the QArray's ``group_axis``). The range of each slice comes
  from ``spec.calibration`` (min-max; "mse": MSE-optimal clipping,
  :func:`jaxq.calibration.mse_range`; "percentile"; "ema" is min-max for one tensor).

  The scales are float32 by default: the QArray dequantizes to exactly the weights
  that QAT fake-quantizes with the same spec. ``compact=True`` (symmetric specs) rounds
  them up to float16 (5..8 bits) or to the 8-bit float e4m3b11 (<= 4 bits: 4 + 8/32 bits
  per weight with groups of 32) and, for a concrete ``w`` whose scales all fit, stores
  them in that dtype, with a scalar zero point: fewer bytes, but the served weights then
  differ from the trained ones (benchmarks/RESULTS.md, "Compact weight scales").

  A NaN in ``w`` makes the scale of its slice NaN (a "tensor" spec then keeps one scale
  per output feature), so the dequantized kernel is NaN in every output column that
  fake quantization makes NaN.
  """
  if spec.scheme != "uniform":
    raise ValueError(f"weight QuantSpec.scheme must be 'uniform'; got {spec.scheme!r}")
  w = jnp.asarray(w)
  contract = check_axes(w.shape, contract)
  fmt = _scale_format(spec, compact)
  # One non-finite check per concrete kernel; the quantizer compiled for a finite kernel
  # then takes plain min / max (as QAT does for finite weights) and tracks no NaN.
  finite = not isinstance(w, jax.core.Tracer) and bool(_all_finite(w))
  q, ok = _quantize_kernel(w, spec, contract, fmt, finite)
  if fmt is None:
    return q
  stored = q.scale
  if not isinstance(stored, jax.core.Tracer) and bool(jnp.all(ok)):
    stored = stored.astype(SCALE_FORMATS[fmt][0])
  return QArray(q.values, stored, q.zero_point, spec=q.spec, shape=q.shape, dtype=q.dtype,
                group_axis=q.group_axis)


@jax.jit
def _all_finite(w):
  return jnp.all(jnp.isfinite(w))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize_kernel(w, spec: QuantSpec, contract, fmt, finite: bool):
  axes, ga = _kernel_reduction(w.shape, spec, contract)
  st_spec = spec.replace(estimator="ste") if spec.estimator == "pact" else spec
  view = quantizer.quant_view(w.astype(jnp.float32), spec, ga)
  if spec.calibration in ("minmax", "ema"):  # the range of one tensor, as in QAT
    lo, hi = ((jnp.min(view, axes, keepdims=True), jnp.max(view, axes, keepdims=True))
              if finite else numerics.minmax(view, axes))
    scale, zp = quantizer.qparams_from_range(lo, hi, st_spec)
  else:
    stat = tuple(1 if a in axes else d for a, d in enumerate(view.shape))
    st = calibration.observer_init(st_spec, stat)
    st = calibration.observer_update(st, view, st_spec, axes)
    scale, zp = calibration.observer_qparams(st, st_spec)
  spec_n = spec.replace(rounding="nearest")
  ok = jnp.ones((), bool)
  if fmt is not None:
    scale, ok = round_up_scale(scale, fmt)
    zp = None
  q = quantize_with(w, spec_n, scale, zp, group_axis=ga)
  scale = q.scale
  if not finite:  # NaN scales where a slice (a "tensor" spec: an output column) has a NaN
    nan_axes = tuple(contract) if spec.granularity == "tensor" else axes
    scale = jnp.where(jnp.any(jnp.isnan(view), axis=nan_axes, keepdims=True), jnp.nan, scale)
  zp = q.zero_point if not spec.symmetric else jnp.zeros((), q.zero_point.dtype)
  return QArray(q.values, scale, zp, spec=q.spec, shape=q.shape, dtype=q.dtype,
                group_axis=q.group_axis), ok


def learned_kernel(w, spec: QuantSpec, contract, learned: dict) -> QArray:
  """QArray of ``w`` with a step learned in QAT (LSQ / PACT; (K, N)-view layout)."""
  contract = check_axes(w.shape, contract)
  if spec.estimator == "pact":
    scale = learned[WEIGHT_ALPHA] / spec.qmax
    zp = jnp.zeros_like(scale)
  else:
    scale = learned[WEIGHT_SCALE]
    zp = learned.get(WEIGHT_ZERO_POINT, jnp.zeros_like(scale))
  if spec.granularity == "tensor":
    shape = (1,) * w.ndim
  elif spec.granularity == "channel":
    shape = tuple(1 if a in contract else d for a, d in enumerate(w.shape))
  elif len(contract) == 1 and w.ndim == 2:
    shape = jnp.shape(scale)
  else:
    raise ValueError("a learned per-group weight step can only be converted for 2-D "
                     f"kernels; got kernel shape {tuple(w.shape)}")
  scale = jnp.reshape(scale, shape)
  zp = jnp.reshape(zp, shape)
  ga = max(contract) if spec.granularity == "group" else 0
  return quantize_with(w, spec.replace(rounding="nearest"), scale, zp, group_axis=ga)


def served_kernel(w, spec: QuantSpec, contract, learned: dict, *, compact: bool = False
                  ) -> QArray:
  """The QArray that serving stores for one layer's kernel ``w``: from the step learned
  in QAT when ``spec`` learns one and ``learned`` ({variable name: value}) holds it, else
  from ``spec.calibration`` (:func:`quantize_kernel`)."""
  if learned_step(spec) and learned:
    return learned_kernel(w, spec, contract, learned)
  return quantize_kernel(w, spec, contract, compact=compact)


def infer_contract(kernel, bias) -> tuple[int, ...]:
  """Contraction axes of a kernel without a recorded layout: the kernel ends in the bias's
  (output) shape, else in one output axis (:func:`jaxq.params.output_axes`)."""
  bias_shape = None if bias is None else tuple(jnp.shape(bias))
  return tuple(range(kernel.ndim - output_axes(tuple(kernel.shape), bias_shape)))


def _infer_stack(kernel, bias) -> int:
  """Leading stacking axes of a kernel without a recorded rank: those of a bias that the
  kernel does not end in but starts with (``kernel (L, in, out)``, ``bias (L, out)``;
  :func:`jaxq.params.looks_stacked`)."""
  if bias is None:
    return 0
  shape, bias_shape = tuple(kernel.shape), tuple(jnp.shape(bias))
  if shape == bias_shape or not looks_stacked(shape, bias_shape):
    return 0
  return len(bias_shape) - 1


def kernel_stack(path: str, kernel, rank: int | None, bias) -> int:
  """Leading stacking axes of a stored kernel whose layer's call sees rank ``rank``."""
  if rank is None:
    return _infer_stack(kernel, bias)
  if not 0 < rank <= kernel.ndim:
    raise ValueError(f"layer '{path}': its kernel of shape {tuple(kernel.shape)} has fewer "
                     f"axes than the {rank} its layer's call saw in calibration")
  return kernel.ndim - rank


def convert_kernel(path: str, spec: QuantSpec, kernel, bias, contract, learned: dict,
                    stack: int, compact: bool) -> QArray:
  """The QArray of one layer's (or, per layer, one stack's) kernel; errors name ``path``."""
  if jnp.ndim(kernel) - stack < 2:
    raise ValueError(
        f"layer '{path}': its 'kernel' of shape {tuple(jnp.shape(kernel))} is not a "
        "contraction kernel (rank < 2 per layer); exclude the module with "
        "Rule(path=..., weight=None)")
  if contract is None:
    contract = infer_contract(kernel[(0,) * stack],
                               None if bias is None else bias[(0,) * stack])
  try:
    return per_layer(lambda w, l: served_kernel(w, spec, contract, l, compact=compact),
                     stack)(kernel, learned)
  except ValueError as e:
    raise ValueError(f"layer '{path}' (kernel of shape {tuple(jnp.shape(kernel))}): {e}"
                     ) from e
