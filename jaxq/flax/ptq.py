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
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from jaxq import calibration
from jaxq.flax import fqvit
from jaxq.flax import linen as qlinen
from jaxq.flax.kernel_qarray import (SCALE_FORMATS, convert_kernel, kernel_stack,
                                     learned_kernel, quantize_kernel,
                                     round_up_scale)
from jaxq.flax.linen import (LAYER_TYPES, QUANT_STATS, Contraction, LayerCall,
                             QuantizedModel, register_mode)
from jaxq.layer import operands
from jaxq.layer.serve import quantized_contraction, static_act
from jaxq.qarray import QArray, dequantize
from jaxq.spec import QuantSpec, match_rule
from jaxq.flax.paths import module_path
from jaxq.params import per_layer, tree_get

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
ACT_SCALE, ACT_ZERO_POINT = operands.ACT_SCALE, operands.ACT_ZERO_POINT
_WEIGHT_NAMES = operands.WEIGHT_NAMES

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
# The quantized contraction shared by serving and simulation
# --------------------------------------------------------------------------------------


def _act_qparams_from_stats(call: LayerCall, x2_k: int) -> dict | None:
  """Static activation qparams from the layer's calibrated observer or learned step."""
  aspec = call.rule.act
  if not static_act(aspec):
    return None
  m = call.module
  if aspec.estimator in ("lsq", "pact"):
    return _learned_act(aspec, lambda n: m.get_variable("params", n), call.path)
  if not m.has_variable(QUANT_STATS, operands.ACT_STATS):
    raise ValueError(_uncalibrated(call.path))
  st = m.get_variable(QUANT_STATS, operands.ACT_STATS)
  del x2_k
  scale, zp = calibration.observer_qparams(st, aspec)
  return {"scale": scale, "zero_point": zp}


def _learned_act(aspec: QuantSpec, get, path: str) -> dict:
  try:
    if aspec.estimator == "pact":
      scale = get(operands.ACT_ALPHA) / aspec.qmax
      return {"scale": scale, "zero_point": jnp.zeros_like(scale)}
    scale = get(operands.ACT_SCALE)
  except (KeyError, TypeError):
    scale = None
  if scale is None:
    raise ValueError(f"layer '{path}': the learned activation step of estimator="
                     f"{aspec.estimator!r} is missing from params (train or run "
                     "jaxq.flax.init_quant_params first)")
  zp = get(operands.ACT_ZERO_POINT) if not aspec.symmetric else None
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
  if static_act(call.rule.act):
    spec = call.rule.act
    if not m.has_variable("params", ACT_SCALE):
      if spec.estimator == "pact" and m.has_variable("params", operands.ACT_ALPHA):
        act = _learned_act(spec, lambda n: m.get_variable("params", n), call.path)
      else:
        raise ValueError(_uncalibrated(call.path) + " and convert it")
    else:
      scale = m.get_variable("params", ACT_SCALE)
      zp = (m.get_variable("params", ACT_ZERO_POINT)
            if m.has_variable("params", ACT_ZERO_POINT) else jnp.zeros_like(scale))
      act = {"scale": scale, "zero_point": zp}
  return quantized_contraction(op, call.path, call.rule.act, qw, act)


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
      qw = learned_kernel(w, wspec, op.rhs_contract, learned)
    else:
      qw = quantize_kernel(w, wspec, op.rhs_contract)
  act = _act_qparams_from_stats(call, op.lhs.shape[-1])
  y = quantized_contraction(op, call.path, call.rule.act, qw, act)
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


def split_static_kwargs(kwargs: Mapping[str, Any]) -> tuple[tuple, dict]:
  """``(static, arrays)``: keyword arguments that are Python scalars / strings / None
  (flags such as ``train=False``, hashable: a jit static argument) and the others."""
  static = tuple(sorted((k, v) for k, v in kwargs.items()
                        if v is None or isinstance(v, (bool, int, float, str))))
  names = {k for k, _ in static}
  return static, {k: v for k, v in kwargs.items() if k not in names}


def _is_empty(args, kwargs) -> bool:
  """Whether a batch holds an array with no elements (e.g. a zero-length final batch)."""
  return any(jnp.size(a) == 0 for a in jax.tree_util.tree_leaves((args, kwargs))
             if hasattr(a, "shape"))


def _path_keys(path: str) -> tuple[str, ...]:
  """The variable-tree keys of a "/"-joined layer path ("" is the root: the model is
  the layer)."""
  return tuple(path.split("/")) if path else ()


def _calibration_run(cal, others, stats, args, array_kwargs, static_kwargs):
  _, new = cal.apply({**others, QUANT_STATS: stats}, *args, mutable=[QUANT_STATS],
                     **array_kwargs, **dict(static_kwargs))
  return _unfreeze(new.get(QUANT_STATS, {}))


#: One compiled calibration step per (model, static kwargs, shapes), reused across calls.
_calibration_step = jax.jit(_calibration_run, static_argnums=(0, 5))


def _check_observers(qmodel: QuantizedModel, stats, recorded) -> None:
  """Every layer calibration reached with a static activation spec has an observer that
  saw finite values; raises ValueError naming the layers otherwise."""
  missing, empty = [], []
  for path in recorded:
    rule = match_rule(qmodel.rules, path)
    if rule is None or rule.act is None or rule.act.dynamic:
      continue
    st = tree_get(stats, _path_keys(path) + (operands.ACT_STATS,))
    if st is None:
      missing.append(path)
    elif not bool(jnp.all(jnp.asarray(st["n"]) > 0)):
      empty.append(path)
  if missing:
    raise ValueError(
        f"calibration reached layer(s) {', '.join(repr(p) for p in missing)} but their "
        f"activation observers ('{QUANT_STATS}' variables) did not come back: the layers "
        "run inside a lifted transform (nn.vmap, nn.scan, nn.remat, ...) whose "
        f"variable_axes do not include '{QUANT_STATS}'; add it, e.g. "
        f"variable_axes={{'params': 0, '{QUANT_STATS}': 0}} (or broadcast it)")
  if empty:
    raise ValueError(_no_finite(empty))


def _no_finite(paths) -> str:
  return (f"calibration saw no finite activation values at layer(s) "
          f"{', '.join(repr(p) for p in paths)} (every batch was NaN/Inf there, for the "
          "whole tensor or some of its channels): their ranges would be empty and the "
          "served layer garbage; calibrate on data that reaches them with finite values")


def calibrate(qmodel: QuantizedModel, variables: Mapping[str, Any], batches: Iterable,
              *, reset: bool = True, **apply_kwargs) -> dict:
  """Fills the activation observers of ``qmodel`` from ``batches``; returns new variables.

  Args:
    qmodel: a :class:`~jaxq.flax.linen.QuantizedModel` (``jaxq.quantize_model``).
    variables: the model's variables ("params", and any other collections).
    batches: an iterable of positional-argument tuples (a bare array counts as a 1-tuple;
      a dict is taken as keyword arguments), each applied as
      ``qmodel.apply(variables, *batch)`` with the float model's numerics. A batch with
      an empty array (a zero-length final batch) contributes nothing.
    reset: start every observer empty (default) rather than from the statistics already in
      ``variables["quant_stats"]``.
    **apply_kwargs: keyword arguments passed to every call (e.g. ``train=False``).

  Returns:
    ``variables`` with "quant_stats" holding, per matched layer, the activation observer
    ``jaxq_act`` (every ``QuantSpec.calibration``: min-max, EMA, percentile, MSE search),
    the kernel's contraction axes ``jaxq_kernel_axes``, and for LayerNorms with a PTF rule
    the ``jaxq_ptf`` observer. One compiled step serves all batches of one shape, and
    later calls with the same model and shapes.

  Raises:
    ValueError: no non-empty batch; an observer that saw no finite value (naming the
      layers); observers lost by a lifted transform that does not map "quant_stats".
  """
  qmodel = _check_qmodel(qmodel)
  cal = qmodel.clone(mode=CALIBRATE_MODE)
  variables = _unfreeze(dict(variables))
  others = {k: v for k, v in variables.items() if k != QUANT_STATS}
  try:
    step = functools.partial(_calibration_step, cal)
    hash(cal)
  except TypeError:  # a model with unhashable attributes: compiled for this call only
    step = jax.jit(functools.partial(_calibration_run, cal), static_argnums=(4,))
  stats = None
  recorded: dict[str, tuple[tuple[int, ...], int]] = {}
  for batch in batches:
    args, kwargs = normalize_batch(batch)
    if _is_empty(args, kwargs):
      continue
    static, arrays = split_static_kwargs({**kwargs, **apply_kwargs})
    if stats is None:
      _RECORD.axes = recorded
      try:
        shapes = jax.eval_shape(
            functools.partial(_calibration_run, cal, static_kwargs=static), others, {},
            args, arrays)
      finally:
        _RECORD.axes = None
      stats = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      if not reset:
        stats = _merge(stats, _unfreeze(variables.get(QUANT_STATS, {})))
    stats = step(others, stats, args, arrays, static)
  if stats is None:
    raise ValueError("batches is empty (or every batch is): calibration needs at least "
                     "one non-empty batch")
  _check_observers(qmodel, stats, recorded)
  old = {} if reset else _unfreeze(variables.get(QUANT_STATS, {}))
  for path, (axes, rank) in recorded.items():
    node = stats
    for part in _path_keys(path):
      node = node.setdefault(part, {})
    # Stacked like the kernel, so that nn.scan / nn.vmap can slice them as quant_stats.
    kernel = meta.unbox((tree_get(others.get("params", {}), _path_keys(path)) or {}).get(
        "kernel"))
    lead = tuple(np.shape(kernel))[:max(np.ndim(kernel) - rank, 0)]
    node[KERNEL_AXES] = jnp.broadcast_to(jnp.asarray(axes, jnp.int32), lead + (len(axes),))
    node[KERNEL_RANK] = jnp.full(lead, rank, jnp.int32)
  return {**others, QUANT_STATS: _merge(old, stats)}


# --------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------


def convert(qmodel: QuantizedModel, variables: Mapping[str, Any], *,
            compact_scales: bool = False) -> tuple[ServingModel, dict]:
  """Converts a (calibrated) quantized model for serving: ``(serving_model, serving_vars)``.

  Every kernel of a layer that a rule with a weight spec matches becomes a
  :class:`~jaxq.qarray.QArray` (int8 / packed int4 ...; see the module docstring), the
  float kernel is not kept; static activation ranges (from :func:`calibrate`, or learned
  LSQ/PACT steps) become ``jaxq_act_scale`` / ``jaxq_act_zero_point``; PTF LayerNorm
  statistics become ``jaxq_ptf_*`` (:mod:`jaxq.flax.fqvit`). "quant_stats" and learned
  weight steps are dropped. ``serving_model.apply(serving_vars, *args, **kwargs)`` takes
  the original model's arguments.

  By default the served kernels dequantize to exactly the weights that QAT computes with
  the same spec (float32 scales), so the served model is the trained model.
  ``compact_scales=True`` stores symmetric weight scales as float16 (5..8 bits) or
  float8 e4m3b11 (<= 4 bits), rounded up (:func:`quantize_kernel`): smaller, at the
  cost measured in benchmarks/RESULTS.md ("Compact weight scales").

  Raises:
    ValueError: a layer with a static activation spec that calibration never reached or
      whose observer saw no finite value (naming the layers). Layers without static
      activations that calibration did not reach are quantized with the layout inferred
      from their kernel and bias shapes, with a ``UserWarning`` naming them.
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
  unreached, uncalibrated = [], []
  for lp in layers:
    path = "/".join(lp)
    rule = match_rule(qmodel.rules, path)
    if rule is None or (rule.weight is None and rule.act is None):
      continue
    if recorded and lp not in recorded:
      if static_act(rule.act):
        uncalibrated.append(path)
        continue
      unreached.append(path)
    node = tree_get(params, lp) or {}
    kernel = node.get("kernel")
    if isinstance(kernel, meta.AxisMetadata):
      kernel = kernel.unbox()
    bias, stack = meta.unbox(node.get("bias")), 0
    if kernel is not None and not isinstance(kernel, QArray):
      stack = kernel_stack(path, kernel, ranks.get(lp), bias)
    if rule.weight is not None and kernel is not None and not isinstance(kernel, QArray):
      learned = {n: node[n] for n in _WEIGHT_NAMES if n in node}
      flat[lp + ("kernel",)] = convert_kernel(path, rule.weight, kernel, bias,
                                               recorded.get(lp), learned, stack,
                                               compact_scales)
    for n in _WEIGHT_NAMES:
      flat.pop(lp + (n,), None)
    aspec = rule.act
    if static_act(aspec) and aspec.estimator == "ste":
      st = tree_get(stats, lp + (operands.ACT_STATS,))
      if st is None:
        raise ValueError(_uncalibrated(path))
      if not bool(jnp.all(jnp.asarray(st["n"]) > 0)):
        raise ValueError(_no_finite([path]))
      scale, zp = per_layer(lambda s: calibration.observer_qparams(s, aspec), stack)(st)
      flat[lp + (ACT_SCALE,)] = scale
      flat[lp + (ACT_ZERO_POINT,)] = zp
    elif static_act(aspec) and aspec.estimator == "lsq" and lp + (ACT_SCALE,) in flat \
        and aspec.symmetric:
      flat[lp + (ACT_ZERO_POINT,)] = jnp.zeros_like(flat[lp + (ACT_SCALE,)])
  if uncalibrated:
    raise ValueError(
        f"calibration never reached layer(s) {', '.join(repr(p) for p in uncalibrated)}, "
        "whose static activation specs need calibrated ranges: calibrate with inputs "
        "(and keyword arguments) that call them, or exclude them with "
        "Rule(path, weight=None, act=None)")
  if unreached:
    warnings.warn(
        f"calibration never reached layer(s) {', '.join(repr(p) for p in unreached)}: "
        "their kernels are quantized with the layout inferred from the kernel and bias "
        "shapes", UserWarning, stacklevel=2)
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
      with super()._quantizing() as icpt:
        yield icpt


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
            "split_static_kwargs",
            "SELECT", "round_up_scale", "SCALE_FORMATS"]
