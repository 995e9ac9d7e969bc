"""Post-training quantization of Linen models: calibrate, convert, serve in int8.

The flow (Jacob et al. 2018; Nagel et al. 2021, "A White Paper on Neural Network
Quantization", sec. 3)::

  qmodel = jaxq.quantize_model(model, rules)          # which layers, which specs
  variables = calibrate(qmodel, variables, batches)   # activation ranges from real data
  serving_model, serving_vars = convert(qmodel, variables)
  y = serving_model.apply(serving_vars, *args, **kwargs)   # the model's own arguments

:func:`calibrate` runs the float model once per batch (one jitted step) in the mode
``"ptq_calibrate"``: the activation observer (``quant_stats/jaxq_act``, any calibration
of :class:`~jaxq.spec.QuantSpec`: "minmax", "ema", "percentile", "mse") of every matched
layer with a static activation spec is updated, and so is the PTF observer of every
``nn.LayerNorm`` whose rule asks for ``scheme="ptf"`` (:mod:`jaxq.flax.fqvit`). It also
records the contraction axes and the rank of each matched kernel as the layer's call sees
it (``quant_stats/jaxq_kernel_axes``, ``jaxq_kernel_rank``), which :func:`convert` uses
to lay out per-channel and per-group scales.

:func:`convert` replaces each matched kernel in "params" by a :class:`~jaxq.qarray.QArray`
in the kernel's own shape (int8, or bit-packed int4/int2; the float kernel is dropped):
one scale per output feature ("channel": the kernel's non-contracted axes), per tensor, or
per output feature and group of ``group_size`` consecutive elements of the innermost
contracted axis ("group"). The weight range is the min-max of the kernel, or the
``QuantSpec.calibration`` search ("mse": the clipping range minimising the quantization
MSE; "percentile"). Static activation ranges become ``jaxq_act_scale`` /
``jaxq_act_zero_point`` next to the kernel. Without recorded axes (no calibration), the
output axes are taken from the layer's bias shape (a kernel ending in the bias's shape),
else the last axis.

Stacked layers (``nn.scan`` / ``nn.vmap`` with ``variable_axes={"params": 0,
"quant_stats": 0}``): a stored kernel with more axes than its layer's call saw has that
many leading stacking axes; each layer of the stack is quantized on its own, and its
QArray (and activation scales) carry the stacking axis on every leaf while ``shape`` is
one layer's, so that the lifted transform slices them like the float kernel. Without
calibration the stacking axes are read off a bias ``(L, out)`` that the kernel does not
end in.

The serving model (:class:`ServingModel`) runs the original model code. A matched
``nn.Dense`` / ``nn.DenseGeneral`` with an 8-bit weight and an 8-bit signed activation
spec (static per-tensor, or ``dynamic=True`` per token) computes its matmul with
:func:`jaxq.kernels.int8_matmul` (int8 x int8 -> int32, dequantizing epilogue; an
activation zero point is corrected with the kernel's column sums). Every other quantized
layer (weight-only W8/W4, Conv, Einsum, per-group activations) dequantizes its weight on
the fly and fake-quantizes its input with the stored scales. The serving numerics are
exactly those of the ``"ptq_sim"`` mode (quantization simulated from float variables),
used by :mod:`jaxq.analysis`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from jaxq import calibration
from jaxq import kernels
from jaxq import numerics
from jaxq import quantizer
from jaxq.flax import fqvit
from jaxq.flax import linen as qlinen
from jaxq.flax.linen import (LAYER_TYPES, QUANT_STATS, Contraction, LayerCall,
                             QuantizedModel, register_mode)
from jaxq.qarray import QArray, dequantize, quantize_with
from jaxq.spec import QuantSpec, match_rule
from jaxq.flax.paths import module_path
from jaxq.params import tree_get

__all__ = ["calibrate", "convert", "ServingModel", "quantize_kernel", "CALIBRATE_MODE",
           "SERVE_MODE", "SIM_MODE", "KERNEL_AXES", "KERNEL_RANK", "ACT_SCALE",
           "ACT_ZERO_POINT", "normalize_batch"]

CALIBRATE_MODE = "ptq_calibrate"
SERVE_MODE = "ptq_serve"
SIM_MODE = "ptq_sim"
#: quant_stats entry: int32 contraction axes of a matched kernel (recorded by calibrate).
KERNEL_AXES = "jaxq_kernel_axes"
#: quant_stats entry: the kernel's rank as its layer's call sees it (one layer of a stack).
KERNEL_RANK = "jaxq_kernel_rank"
ACT_SCALE, ACT_ZERO_POINT = qlinen.ACT_SCALE, qlinen.ACT_ZERO_POINT
_WEIGHT_NAMES = (qlinen.WEIGHT_SCALE, qlinen.WEIGHT_ZERO_POINT, qlinen.WEIGHT_ALPHA)

# Kernel layouts seen while tracing a calibration step: {path: (contraction axes, rank)}.
_RECORD = threading.local()


def normalize_batch(batch) -> tuple[tuple, dict]:
  """``(args, kwargs)`` of one calibration batch: a tuple/list of positional arguments,
  a dict of keyword arguments, or a bare array (one positional argument)."""
  if isinstance(batch, tuple):
    return batch, {}
  if isinstance(batch, list):
    return tuple(batch), {}
  if isinstance(batch, Mapping):
    return (), dict(batch)
  return (batch,), {}


# --------------------------------------------------------------------------------------
# Weights: QArrays in the kernel's own layout
# --------------------------------------------------------------------------------------


def _check_axes(shape, contract) -> tuple[int, ...]:
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


def quantize_kernel(w: jax.Array, spec: QuantSpec, contract, *, compact: bool = True
                    ) -> QArray:
  """``w`` (a kernel) as a :class:`QArray` of its own shape for a contraction over ``contract``.

  "tensor": one scale; "channel": one per output feature (every non-contracted index);
  "group": one per output feature and per ``group_size`` consecutive elements of the
  innermost contracted axis (the QArray's ``group_axis``). The range of each slice comes
  from ``spec.calibration`` (min-max; "mse": MSE-optimal clipping,
  :func:`jaxq.calibration.mse_range`; "percentile"; "ema" is min-max for one tensor).

  ``compact`` (symmetric specs): scales are rounded up to float16 (5..8 bits) or to the
  8-bit float e4m3b11 (<= 4 bits: 4 + 8/32 bits per weight with groups of 32) and, for a
  concrete ``w`` whose scales all fit, stored in that dtype, with a scalar zero point.
  """
  if spec.scheme != "uniform":
    raise ValueError(f"weight QuantSpec.scheme must be 'uniform'; got {spec.scheme!r}")
  w = jnp.asarray(w)
  contract = _check_axes(w.shape, contract)
  fmt = _scale_format(spec, compact)
  q, ok = _quantize_kernel(w, spec, contract, fmt)
  if fmt is None:
    return q
  stored = q.scale
  if not isinstance(stored, jax.core.Tracer) and bool(jnp.all(ok)):
    stored = stored.astype(SCALE_FORMATS[fmt][0])
  return QArray(q.values, stored, q.zero_point, spec=q.spec, shape=q.shape, dtype=q.dtype,
                group_axis=q.group_axis)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_kernel(w, spec: QuantSpec, contract, fmt):
  axes, ga = _kernel_reduction(w.shape, spec, contract)
  st_spec = spec.replace(estimator="ste") if spec.estimator == "pact" else spec
  view = quantizer.quant_view(w.astype(jnp.float32), spec, ga)
  stat = tuple(1 if a in axes else d for a, d in enumerate(view.shape))
  st = calibration.observer_init(st_spec, stat)
  st = calibration.observer_update(st, view, st_spec, axes)
  scale, zp = calibration.observer_qparams(st, st_spec)
  spec_n = spec.replace(rounding="nearest")
  if fmt is None:
    return quantize_with(w, spec_n, scale, zp, group_axis=ga), jnp.ones((), bool)
  scale, ok = round_up_scale(scale, fmt)
  q = quantize_with(w, spec_n, scale, None, group_axis=ga)
  return QArray(q.values, scale, jnp.zeros((), q.zero_point.dtype), spec=q.spec,
                shape=q.shape, dtype=q.dtype, group_axis=q.group_axis), ok


def _learned_kernel(w, spec: QuantSpec, contract, learned: dict) -> QArray:
  """QArray of ``w`` with a step learned in QAT (LSQ / PACT; (K, N)-view layout)."""
  contract = _check_axes(w.shape, contract)
  if spec.estimator == "pact":
    scale = learned[qlinen.WEIGHT_ALPHA] / spec.qmax
    zp = jnp.zeros_like(scale)
  else:
    scale = learned[qlinen.WEIGHT_SCALE]
    zp = learned.get(qlinen.WEIGHT_ZERO_POINT, jnp.zeros_like(scale))
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


# --------------------------------------------------------------------------------------
# The quantized contraction shared by serving and simulation
# --------------------------------------------------------------------------------------


def _act_spec_for_serving(spec: QuantSpec) -> QuantSpec:
  """Learned steps are plain scales once trained: serve them as "ste"."""
  return spec if spec.estimator == "ste" else spec.replace(estimator="ste")


def _int8_act_ok(spec: QuantSpec) -> bool:
  return (spec.bits == 8 and spec.signed and spec.scheme == "uniform"
          and spec.granularity == "tensor")


def quantized_contraction(call: LayerCall, op: Contraction, qw: QArray | None,
                          act_qparams: dict | None) -> jax.Array:
  """The contraction of a quantized layer with weight ``qw`` (None: ``op.rhs`` in float)
  and static activation ``act_qparams`` ({"scale", "zero_point"}; None when the
  activation spec is dynamic, non-uniform or absent)."""
  aspec = call.rule.act
  x2, x_unview = op.lhs_matrix()
  aview = None
  if aspec is not None:
    aspec = _act_spec_for_serving(aspec)
    aview = qlinen._act_view_spec(aspec, call, x2.shape[1])  # pylint: disable=protected-access
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
    y = kernels.int8_matmul(xq, b_q, sx[:, 0], b_scale, out_dtype=jnp.float32)
    if not aspec.symmetric:  # (xq - zx) @ b_q = xq @ b_q - zx * colsum(b_q)
      colsum = jnp.sum(b_q.astype(jnp.int32), axis=0).astype(jnp.float32)
      y = y - (zx * sx) * (colsum * b_scale)[None, :]
    return op.out_from_matrix(y.astype(out_dtype))

  rhs = op.rhs
  if qw is not None:
    if qw.shape != tuple(op.rhs.shape):
      raise ValueError(f"layer '{call.path}': stored quantized kernel has shape {qw.shape}, "
                       f"the layer expects {tuple(op.rhs.shape)}")
    rhs = dequantize(qw).astype(op.rhs.dtype)
  lhs = op.lhs
  if aview is not None:
    kw = {}
    if act_qparams is not None:
      kw = {"scale": act_qparams["scale"], "zero_point": act_qparams["zero_point"]}
    lhs = x_unview(quantizer.fake_quantize(x2, aview, group_axis=1, require_key=False, **kw))
  return op.compute(lhs, rhs)


def _static_act(aspec: QuantSpec | None) -> bool:
  return aspec is not None and not aspec.dynamic and aspec.scheme == "uniform"


def _act_qparams_from_stats(call: LayerCall, x2_k: int) -> dict | None:
  """Static activation qparams from the layer's calibrated observer or learned step."""
  aspec = call.rule.act
  if not _static_act(aspec):
    return None
  m = call.module
  if aspec.estimator in ("lsq", "pact"):
    return _learned_act(aspec, lambda n: m.get_variable("params", n), call.path)
  if not m.has_variable(QUANT_STATS, qlinen.ACT_STATS):
    raise ValueError(_uncalibrated(call.path))
  st = m.get_variable(QUANT_STATS, qlinen.ACT_STATS)
  del x2_k
  scale, zp = calibration.observer_qparams(st, aspec)
  return {"scale": scale, "zero_point": zp}


def _learned_act(aspec: QuantSpec, get, path: str) -> dict:
  try:
    if aspec.estimator == "pact":
      scale = get(qlinen.ACT_ALPHA) / aspec.qmax
      return {"scale": scale, "zero_point": jnp.zeros_like(scale)}
    scale = get(qlinen.ACT_SCALE)
  except (KeyError, TypeError):
    scale = None
  if scale is None:
    raise ValueError(f"layer '{path}': the learned activation step of estimator="
                     f"{aspec.estimator!r} is missing from params (train or run "
                     "jaxq.flax.init_quant_params first)")
  zp = get(qlinen.ACT_ZERO_POINT) if not aspec.symmetric else None
  return {"scale": scale, "zero_point": jnp.zeros_like(scale) if zp is None else zp}


def _uncalibrated(path: str) -> str:
  return (f"layer '{path}': its activation spec has a static range, which needs "
          "calibration: run jaxq.calibrate(qmodel, variables, batches) first (or use "
          "QuantSpec(dynamic=True) for per-token ranges computed at run time)")


# --------------------------------------------------------------------------------------
# Mode handlers
# --------------------------------------------------------------------------------------


def calibrate_handler(call: LayerCall, op: Contraction) -> jax.Array:
  """Calibration: linen's observer update, plus the kernel's contraction axes recorded."""
  rec = getattr(_RECORD, "axes", None)
  if rec is not None:
    rec[call.path] = (tuple(int(a) % op.rhs.ndim for a in op.rhs_contract), op.rhs.ndim)
  return qlinen.calibrate_handler(call, op)


def serve_handler(call: LayerCall, op: Contraction) -> jax.Array:
  """Serving: the stored QArray kernel and activation scales."""
  m = call.module
  qw = m.get_variable("params", "kernel") if m.has_variable("params", "kernel") else None
  if not isinstance(qw, QArray):
    qw = None
  act = None
  if _static_act(call.rule.act):
    spec = call.rule.act
    if not m.has_variable("params", ACT_SCALE):
      if spec.estimator == "pact" and m.has_variable("params", qlinen.ACT_ALPHA):
        act = _learned_act(spec, lambda n: m.get_variable("params", n), call.path)
      else:
        raise ValueError(_uncalibrated(call.path) + " and convert it")
    else:
      scale = m.get_variable("params", ACT_SCALE)
      zp = (m.get_variable("params", ACT_ZERO_POINT)
            if m.has_variable("params", ACT_ZERO_POINT) else jnp.zeros_like(scale))
      act = {"scale": scale, "zero_point": zp}
  return quantized_contraction(call, op, qw, act)


def sim_handler(call: LayerCall, op: Contraction) -> jax.Array:
  """Simulated PTQ from float variables (the serving numerics, quantized on the fly).

  With a ``"quant_stats"`` variable ``"jaxq_select"`` in the layer's scope, the quantized
  result is used where it is > 0 and the float result elsewhere (one compilation serves
  every one-layer-at-a-time choice; :mod:`jaxq.analysis`). It lives in "quant_stats" so
  that it reaches the layers of ``nn.scan`` / ``nn.vmap`` stacks, stacked like them.
  """
  wspec = call.rule.weight
  qw = None
  if wspec is not None:
    w = jax.lax.stop_gradient(op.rhs)
    learned = {n: call.module.get_variable("params", n) for n in _WEIGHT_NAMES
               if call.module.has_variable("params", n)}
    if wspec.estimator in ("lsq", "pact") and learned:
      qw = _learned_kernel(w, wspec, op.rhs_contract, learned)
    else:
      qw = quantize_kernel(w, wspec, op.rhs_contract)
  act = _act_qparams_from_stats(call, op.lhs.shape[-1])
  y = quantized_contraction(call, op, qw, act)
  m = call.module
  if m.has_variable(QUANT_STATS, SELECT):
    on = m.get_variable(QUANT_STATS, SELECT)
    y = jnp.where(on > 0, y, op.compute(op.lhs, op.rhs))
  return y


#: quant_stats entry: a layer's selection flag read by the "ptq_sim" mode.
SELECT = "jaxq_select"

register_mode(CALIBRATE_MODE, calibrate_handler)
register_mode(SERVE_MODE, serve_handler)
register_mode(SIM_MODE, sim_handler)


# --------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------


def _check_qmodel(qmodel) -> QuantizedModel:
  if not isinstance(qmodel, QuantizedModel):
    raise TypeError("qmodel must be a jaxq QuantizedModel (from jaxq.quantize_model); got "
                    f"{type(qmodel).__name__}")
  return qmodel


def _merge(base: dict, over: dict) -> dict:
  out = dict(base)
  for k, v in over.items():
    if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
      out[k] = _merge(dict(out[k]), dict(v))
    else:
      out[k] = v
  return out


def _unfreeze(tree):
  if isinstance(tree, Mapping):
    return {k: _unfreeze(v) for k, v in tree.items()}
  return tree


def calibrate(qmodel: QuantizedModel, variables: Mapping[str, Any], batches: Iterable,
              *, reset: bool = True, **apply_kwargs) -> dict:
  """Fills the activation observers of ``qmodel`` from ``batches``; returns new variables.

  Args:
    qmodel: a :class:`~jaxq.flax.linen.QuantizedModel` (``jaxq.quantize_model``).
    variables: the model's variables ("params", and any other collections).
    batches: an iterable of positional-argument tuples (a bare array counts as a 1-tuple;
      a dict is taken as keyword arguments), each applied as
      ``qmodel.apply(variables, *batch)`` with the float model's numerics.
    reset: start every observer empty (default) rather than from the statistics already in
      ``variables["quant_stats"]``.
    **apply_kwargs: keyword arguments passed to every call (e.g. ``train=False``).

  Returns:
    ``variables`` with "quant_stats" holding, per matched layer, the activation observer
    ``jaxq_act`` (every ``QuantSpec.calibration``: min-max, EMA, percentile, MSE search),
    the kernel's contraction axes ``jaxq_kernel_axes``, and for LayerNorms with a PTF rule
    the ``jaxq_ptf`` observer. One jitted step serves all batches (of one shape).
  """
  qmodel = _check_qmodel(qmodel)
  cal = qmodel.clone(mode=CALIBRATE_MODE)
  variables = _unfreeze(dict(variables))
  others = {k: v for k, v in variables.items() if k != QUANT_STATS}

  def run(stats, batch_args, batch_kwargs):
    _, new = cal.apply({**others, QUANT_STATS: stats}, *batch_args, mutable=[QUANT_STATS],
                       **batch_kwargs, **apply_kwargs)
    return _unfreeze(new.get(QUANT_STATS, {}))

  step = jax.jit(run)
  stats = None
  recorded: dict[str, tuple[tuple[int, ...], int]] = {}
  n = 0
  for batch in batches:
    args, kwargs = normalize_batch(batch)
    if stats is None:
      _RECORD.axes = recorded
      try:
        shapes = jax.eval_shape(run, {}, args, kwargs)
      finally:
        _RECORD.axes = None
      stats = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      if not reset:
        stats = _merge(stats, _unfreeze(variables.get(QUANT_STATS, {})))
    stats = step(stats, args, kwargs)
    n += 1
  if n == 0:
    raise ValueError("batches is empty: calibration needs at least one batch")
  old = {} if reset else _unfreeze(variables.get(QUANT_STATS, {}))
  for path, (axes, rank) in recorded.items():
    node = stats
    for part in path.split("/"):
      node = node.setdefault(part, {})
    # Stacked like the kernel, so that nn.scan / nn.vmap can slice them as quant_stats.
    kernel = meta.unbox((tree_get(others.get("params", {}), path.split("/")) or {}).get(
        "kernel"))
    lead = tuple(np.shape(kernel))[:max(np.ndim(kernel) - rank, 0)]
    node[KERNEL_AXES] = jnp.broadcast_to(jnp.asarray(axes, jnp.int32), lead + (len(axes),))
    node[KERNEL_RANK] = jnp.full(lead, rank, jnp.int32)
  return {**others, QUANT_STATS: _merge(old, stats)}


# --------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------


def _infer_contract(kernel, bias) -> tuple[int, ...]:
  """Contraction axes of a kernel without a recorded layout: the kernel ends in the bias's
  (output) shape, else in one output axis."""
  nd = kernel.ndim
  if bias is not None and 1 <= jnp.ndim(bias) < nd and tuple(kernel.shape[nd - jnp.ndim(
      bias):]) == tuple(jnp.shape(bias)):
    return tuple(range(nd - jnp.ndim(bias)))
  return tuple(range(nd - 1))


def _infer_stack(kernel, bias) -> int:
  """Leading stacking axes of a kernel without a recorded rank: those of a bias that the
  kernel does not end in but starts with (``kernel (L, in, out)``, ``bias (L, out)``)."""
  if bias is None or jnp.ndim(bias) < 2 or _infer_contract(kernel, bias) != tuple(
      range(kernel.ndim - 1)) or kernel.shape[-1] != jnp.shape(bias)[-1]:
    return 0
  if tuple(kernel.shape[kernel.ndim - jnp.ndim(bias):]) == tuple(jnp.shape(bias)):
    return 0
  stack = jnp.ndim(bias) - 1
  return stack if tuple(kernel.shape[:stack]) == tuple(jnp.shape(bias)[:stack]) else 0


def _per_layer(fn, stack: int):
  """``fn`` mapped over ``stack`` leading stacking axes of all its arguments."""
  for _ in range(stack):
    fn = jax.vmap(fn)
  return fn


def _kernel_stack(path: str, kernel, rank: int | None, bias) -> int:
  """Leading stacking axes of a stored kernel whose layer's call sees rank ``rank``."""
  if rank is None:
    return _infer_stack(kernel, bias)
  if not 0 < rank <= kernel.ndim:
    raise ValueError(f"layer '{path}': its kernel of shape {tuple(kernel.shape)} has fewer "
                     f"axes than the {rank} its layer's call saw in calibration")
  return kernel.ndim - rank


def _convert_kernel(path: str, spec: QuantSpec, kernel, bias, contract, learned: dict,
                    stack: int) -> QArray:
  """The QArray of one layer's (or, per layer, one stack's) kernel; errors name ``path``."""
  if jnp.ndim(kernel) - stack < 2:
    raise ValueError(
        f"layer '{path}': its 'kernel' of shape {tuple(jnp.shape(kernel))} is not a "
        "contraction kernel (rank < 2 per layer); exclude the module with "
        "Rule(path=..., weight=None)")
  if contract is None:
    contract = _infer_contract(kernel[(0,) * stack],
                               None if bias is None else bias[(0,) * stack])
  try:
    if spec.estimator in ("lsq", "pact") and learned:
      return _per_layer(lambda w, l: _learned_kernel(w, spec, contract, l), stack)(
          kernel, learned)
    return _per_layer(lambda w: quantize_kernel(w, spec, contract), stack)(kernel)
  except ValueError as e:
    raise ValueError(f"layer '{path}' (kernel of shape {tuple(jnp.shape(kernel))}): {e}"
                     ) from e


def convert(qmodel: QuantizedModel, variables: Mapping[str, Any]
            ) -> tuple[ServingModel, dict]:
  """Converts a (calibrated) quantized model for serving: ``(serving_model, serving_vars)``.

  Every kernel of a layer that a rule with a weight spec matches becomes a
  :class:`~jaxq.qarray.QArray` (int8 / packed int4 ...; see the module docstring), the
  float kernel is not kept; static activation ranges (from :func:`calibrate`, or learned
  LSQ/PACT steps) become ``jaxq_act_scale`` / ``jaxq_act_zero_point``; PTF LayerNorm
  statistics become ``jaxq_ptf_*`` (:mod:`jaxq.flax.fqvit`). "quant_stats" and learned
  weight steps are dropped. ``serving_model.apply(serving_vars, *args, **kwargs)`` takes
  the original model's arguments.
  """
  qmodel = _check_qmodel(qmodel)
  variables = _unfreeze(dict(variables))
  if "params" not in variables:
    raise ValueError("variables must contain a 'params' collection")
  params = variables["params"]
  stats = variables.get(QUANT_STATS, {})
  flat = traverse_util.flatten_dict(params, keep_empty_nodes=False)
  flat_stats = traverse_util.flatten_dict(stats)
  # Both are stacked like their layer: every layer of a stack has the same layout.
  recorded = {k[:-1]: tuple(int(a) for a in np.asarray(v).reshape(-1, np.shape(v)[-1])[0])
              for k, v in flat_stats.items() if k[-1] == KERNEL_AXES}
  ranks = {k[:-1]: int(np.asarray(v).reshape(-1)[0])
           for k, v in flat_stats.items() if k[-1] == KERNEL_RANK}
  layers = sorted({k[:-1] for k in flat if k[-1] == "kernel"} | set(recorded))
  for lp in layers:
    path = "/".join(lp)
    rule = match_rule(qmodel.rules, path)
    if rule is None or (rule.weight is None and rule.act is None):
      continue
    if recorded and lp not in recorded:
      continue  # calibration saw no quantized layer call here
    node = tree_get(params, lp) or {}
    kernel = node.get("kernel")
    if isinstance(kernel, meta.AxisMetadata):
      kernel = kernel.unbox()
    bias, stack = meta.unbox(node.get("bias")), 0
    if kernel is not None and not isinstance(kernel, QArray):
      stack = _kernel_stack(path, kernel, ranks.get(lp), bias)
    if rule.weight is not None and kernel is not None and not isinstance(kernel, QArray):
      learned = {n: node[n] for n in _WEIGHT_NAMES if n in node}
      flat[lp + ("kernel",)] = _convert_kernel(path, rule.weight, kernel, bias,
                                               recorded.get(lp), learned, stack)
    for n in _WEIGHT_NAMES:
      flat.pop(lp + (n,), None)
    aspec = rule.act
    if _static_act(aspec) and aspec.estimator == "ste":
      st = tree_get(stats, lp + (qlinen.ACT_STATS,))
      if st is None:
        raise ValueError(_uncalibrated(path))
      scale, zp = _per_layer(lambda s: calibration.observer_qparams(s, aspec), stack)(st)
      flat[lp + (ACT_SCALE,)] = scale
      flat[lp + (ACT_ZERO_POINT,)] = zp
    elif _static_act(aspec) and aspec.estimator == "lsq" and lp + (ACT_SCALE,) in flat \
        and aspec.symmetric:
      flat[lp + (ACT_ZERO_POINT,)] = jnp.zeros_like(flat[lp + (ACT_SCALE,)])
  flat.update(fqvit.convert_params(qmodel.rules, params, stats))
  serving = {k: v for k, v in variables.items() if k != QUANT_STATS}
  serving["params"] = traverse_util.unflatten_dict(flat)
  model = ServingModel(qmodel.model, qmodel.rules, mode=SERVE_MODE, int8="forward")
  return model, serving


# --------------------------------------------------------------------------------------
# The serving model
# --------------------------------------------------------------------------------------


_QUANTIZED_PARAMS = ("kernel",)


def _param_interceptor(root: tuple[str, ...], rules):
  """Serves QArray parameters to the layers' own code.

  A matched Dense/DenseGeneral/Conv/Einsum, whose contraction the "ptq_serve" handler
  computes from the QArray, receives a zero placeholder (dead code under jit); any other
  module owning a QArray parameter receives its dequantized value.
  """

  def icpt(next_fun, args, kwargs, context):
    m = context.module
    if m.scope is None or isinstance(m, QuantizedModel) or "param" in vars(m):
      return next_fun(*args, **kwargs)
    names = [n for n in _QUANTIZED_PARAMS if m.has_variable("params", n)
             and isinstance(m.get_variable("params", n), QArray)]
    if not names:
      return next_fun(*args, **kwargs)
    path_t = module_path(m)
    rule = (match_rule(rules, "/".join(path_t[len(root):]))
            if path_t[:len(root)] == root else None)
    handled = (context.method_name == "__call__" and isinstance(m, LAYER_TYPES)
               and rule is not None and (rule.weight is not None or rule.act is not None))
    orig = m.param

    def param(name, init_fn, *a, **kw):
      if name in names:
        q = m.get_variable("params", name)
        if handled:
          return jnp.broadcast_to(jnp.zeros((), q.dtype), q.shape)
        return dequantize(q)
      return orig(name, init_fn, *a, **kw)

    object.__setattr__(m, "param", param)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__delattr__(m, "param")

  return icpt


class ServingModel(QuantizedModel):
  """The converted model: ``apply(serving_variables, *args, **kwargs)`` as the original.

  Runs the wrapped model's own code; matched layers compute their contractions from the
  QArray kernels and stored activation scales (mode "ptq_serve"), LayerNorm/attention
  rules apply FQ-ViT's PTF / log2 quantizers (:mod:`jaxq.flax.fqvit`).
  """

  @contextlib.contextmanager
  def _quantizing(self):
    """QArray kernels read as their dequantized values, around the QAT interceptors."""
    with nn.intercept_methods(_param_interceptor(module_path(self), self.rules)):
      with super()._quantizing():
        yield


def serving_nbytes(tree) -> int:
  """Bytes of a variables tree as stored (QArrays count their integer storage)."""
  leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, QArray))
  total = 0
  for leaf in leaves:
    if isinstance(leaf, QArray):
      total += leaf.nbytes
    else:
      total += int(np.prod(jnp.shape(leaf), dtype=np.int64)) * jnp.dtype(
          jnp.result_type(leaf)).itemsize
  return total


__all__ += ["serving_nbytes", "serve_handler", "sim_handler", "calibrate_handler",
            "quantized_contraction", "SELECT", "round_up_scale", "SCALE_FORMATS"]
