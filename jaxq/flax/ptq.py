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

Smoothing and GPTQ (``Rule.smooth``, ``QuantSpec(rounding="gptq")``; Contract 7,
:mod:`jaxq.layer.smooth_ptq`, state in :mod:`jaxq.flax.ptq_smooth`): :func:`calibrate`
also accumulates, in the same jitted pass, each such layer's per-channel statistics, the
Hessian of its inputs and (``smooth="auto"``) a token reservoir
(``quant_stats/jaxq_calib``), then chooses and records its scaling ``s``
(``quant_stats/jaxq_smooth``, used by QAT and the ``"ptq_sim"`` mode). :func:`convert`
stores ``s W`` (GPTQ-rounded from the Hessian of ``x / s`` for a "gptq" weight spec,
damping ``gptq_damping``), ``params/jaxq_smooth`` and the exact activation range of
``x / s``; serving divides the input by ``s`` where it quantizes it.

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

import functools
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from jaxq import calibration
from jaxq import gptq
from jaxq.flax import embed_linen, fqvit
from jaxq.flax.batches import is_empty_batch, normalize_batch, split_static_kwargs
from jaxq.flax.kernel_qarray import (SCALE_FORMATS, convert_kernel, kernel_stack,
                                     quantize_kernel, round_up_scale)
from jaxq.flax.linen import QUANT_STATS, QuantizedModel
from jaxq.flax.ptq_modes import (ACT_SCALE, ACT_ZERO_POINT, CALIBRATE_MODE, KERNEL_AXES,
                                 KERNEL_RANK, RECORD, SELECT, SERVE_MODE, SIM_MODE,
                                 uncalibrated_message)
from jaxq.layer import operands
from jaxq.flax import ptq_smooth
from jaxq.layer.serve import static_act
from jaxq.layer.smooth_ptq import CALIB, calibration_needs, check_calibrated, saw_finite
from jaxq.params import check_rule_fields, per_layer, tree_get
from jaxq.qarray import QArray
from jaxq.spec import match_rule

__all__ = ["calibrate", "convert", "ServingModel", "quantize_kernel", "CALIBRATE_MODE",
           "SERVE_MODE", "SIM_MODE", "KERNEL_AXES", "KERNEL_RANK", "ACT_SCALE",
           "ACT_ZERO_POINT", "normalize_batch", "serving_nbytes", "split_static_kwargs",
           "is_empty_batch", "SELECT", "round_up_scale", "SCALE_FORMATS"]


# --------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------


def _check_qmodel(qmodel, where: str) -> QuantizedModel:
  if not isinstance(qmodel, QuantizedModel):
    raise TypeError("qmodel must be a jaxq QuantizedModel (from jaxq.quantize_model); got "
                    f"{type(qmodel).__name__}")
  check_rule_fields(qmodel.rules, where, lora=False, smooth=True, gptq=True)
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


def _path_keys(path: str) -> tuple[str, ...]:
  """The variable-tree keys of a "/"-joined layer path ("": the model is the layer)."""
  return tuple(path.split("/")) if path else ()


def _calibration_run(cal, others, stats, args, array_kwargs, static_kwargs):
  _, new = cal.apply({**others, QUANT_STATS: stats}, *args, mutable=[QUANT_STATS],
                     **array_kwargs, **dict(static_kwargs))
  return _unfreeze(new.get(QUANT_STATS, {}))


#: One compiled calibration step per (model, static kwargs, shapes), reused across calls.
_calibration_step = jax.jit(_calibration_run, static_argnums=(0, 5))


def _check_observers(qmodel: QuantizedModel, stats, recorded) -> None:
  """Every layer calibration reached with a static activation spec (or smooth / GPTQ
  statistics) saw finite values; raises ValueError naming the layers otherwise."""
  missing, empty = [], []
  for path in recorded:
    rule, cal = match_rule(qmodel.rules, path), tree_get(stats, _path_keys(path) + (CALIB,))
    if cal is not None and not saw_finite(cal):
      empty.append(path)
    if rule is None or rule.act is None or rule.act.dynamic or path in empty:
      continue
    st = tree_get(stats, _path_keys(path) + (operands.ACT_STATS,))
    if st is None:
      missing.append(path)
    elif not bool(jnp.all(jnp.asarray(st["n"]) > 0)):
      empty.append(path)
  if missing:
    raise ValueError(_lost_message(missing, "activation observers"))
  if empty:
    raise ValueError(_no_finite(empty))


def _lost_message(paths, what: str) -> str:
  return (f"calibration reached layer(s) {', '.join(repr(p) for p in paths)} but their "
          f"{what} ('{QUANT_STATS}' variables) did not come back: the layers "
          "run inside a lifted transform (nn.vmap, nn.scan, nn.remat, ...) whose "
          f"variable_axes do not include '{QUANT_STATS}'; add it, e.g. "
          f"variable_axes={{'params': 0, '{QUANT_STATS}': 0}} (or broadcast it)")


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
    the kernel's contraction axes ``jaxq_kernel_axes``, for LayerNorms with a PTF rule
    the ``jaxq_ptf`` observer, and for smooth / GPTQ rules ``jaxq_calib`` (statistics,
    Hessian, token reservoir) and the chosen scaling ``jaxq_smooth``. One compiled step
    serves all batches of one shape, and later calls with the same model and shapes.

  Raises:
    ValueError: no non-empty batch; an observer that saw no finite value (naming the
      layers); observers lost by a lifted transform that does not map "quant_stats".
  """
  qmodel = _check_qmodel(qmodel, "jaxq.calibrate")
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
    if is_empty_batch(args, kwargs):
      continue
    static, arrays = split_static_kwargs({**kwargs, **apply_kwargs})
    if stats is None:
      RECORD.axes = recorded
      try:
        shapes = jax.eval_shape(
            functools.partial(_calibration_run, cal, static_kwargs=static), others, {},
            args, arrays)
      finally:
        RECORD.axes = None
      stats = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      stats = ptq_smooth.initial_calibrations(qmodel.rules, stats)
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
    rule = match_rule(qmodel.rules, path)
    if calibration_needs(rule) and not ptq_smooth.record(node, rule, path, kernel, axes,
                                                         len(lead)):
      raise ValueError(_lost_message([path], "smoothing / GPTQ statistics"))
  return {**others, QUANT_STATS: _merge(old, stats)}


# --------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------


def convert(qmodel: QuantizedModel, variables: Mapping[str, Any], *,
            compact_scales: bool = False,
            gptq_damping: float = gptq.DEFAULT_DAMPING) -> tuple[ServingModel, dict]:
  """Converts a (calibrated) quantized model for serving: ``(serving_model, serving_vars)``.

  Every kernel of a layer that a rule with a weight spec matches becomes a
  :class:`~jaxq.qarray.QArray` (int8 / packed int4 ...; see the module docstring), the
  float kernel is not kept; static activation ranges (from :func:`calibrate`, or learned
  LSQ/PACT steps) become ``jaxq_act_scale`` / ``jaxq_act_zero_point``; PTF LayerNorm
  statistics become ``jaxq_ptf_*`` (:mod:`jaxq.flax.fqvit`). "quant_stats" and learned
  weight steps are dropped; a matched ``nn.Embed``'s table becomes a QArray with one
  scale per row (or row and group; :mod:`jaxq.layer.embed`).
  ``serving_model.apply(serving_vars, *args, **kwargs)`` takes the original model's
  arguments.

  By default the served kernels dequantize to exactly the weights that QAT computes with
  the same spec (float32 scales), so the served model is the trained model.
  ``compact_scales=True`` stores symmetric weight scales as float16 (5..8 bits) or
  float8 e4m3b11 (<= 4 bits), rounded up (:func:`quantize_kernel`): smaller, at the
  cost measured in benchmarks/RESULTS.md ("Compact weight scales").

  Smooth / GPTQ layers (module docstring) are converted from the ``jaxq_calib`` and
  ``jaxq_smooth`` that :func:`calibrate` recorded; ``gptq_damping`` is GPTQ's damping, a
  fraction of the Hessian's mean diagonal (the paper's 1% by default). A GPTQ layer
  that saw fewer calibration tokens than its input width warns (``UserWarning`` naming
  it): GPTQ then measured worse than round-to-nearest (benchmarks/RESULTS.md).

  Raises:
    ValueError: a layer with a static activation spec that calibration never reached or
      whose observer saw no finite value (naming the layers); a smooth / GPTQ layer
      whose statistics calibrate did not record (naming it). Layers without static
      activations that calibration did not reach are quantized with the layout inferred
      from their kernel and bias shapes, with a ``UserWarning`` naming them.
  """
  qmodel = _check_qmodel(qmodel, "jaxq.convert")
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
    needs = calibration_needs(rule)
    if needs and lp not in recorded:
      check_calibrated(rule, None, None, path)  # raises, naming the layer
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
    smoothed = needs and kernel is not None and not isinstance(kernel, QArray)
    if smoothed:  # kernel: s W (GPTQ-rounded: stored); jaxq_smooth and act scales stored
      kernel = ptq_smooth.convert_layer(flat, lp, rule, stats, kernel, recorded[lp],
                                        stack, gptq_damping)
    if rule.weight is not None and kernel is not None and not isinstance(kernel, QArray):
      learned = {n: node[n] for n in operands.WEIGHT_NAMES if n in node}
      flat[lp + ("kernel",)] = convert_kernel(path, rule.weight, kernel, bias,
                                               recorded.get(lp), learned, stack,
                                               compact_scales)
    for n in operands.WEIGHT_NAMES:
      flat.pop(lp + (n,), None)
    aspec = rule.act
    # A smoothed layer's activation scales (of x / s) were stored by convert_layer.
    if (static_act(aspec) and aspec.estimator == "ste"
        and not (smoothed and rule.smooth is not None)):
      st = tree_get(stats, lp + (operands.ACT_STATS,))
      if st is None:
        raise ValueError(uncalibrated_message(path))
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
  embed_linen.convert_tables(qmodel.rules, params, flat)  # nn.Embed tables -> QArrays
  serving = {k: v for k, v in variables.items() if k != QUANT_STATS}
  serving["params"] = traverse_util.unflatten_dict(flat)
  model = ServingModel(qmodel.model, qmodel.rules, mode=SERVE_MODE, int8="forward")
  return model, serving


# --------------------------------------------------------------------------------------
# The serving model
# --------------------------------------------------------------------------------------


class ServingModel(QuantizedModel):
  """The converted model: ``apply(serving_variables, *args, **kwargs)`` as the original.

  Runs the wrapped model's own code; matched layers compute their contractions from the
  QArray kernels and stored activation scales (mode "ptq_serve"), LayerNorm/attention
  rules apply FQ-ViT's PTF / log2 quantizers (:mod:`jaxq.flax.fqvit`). QArray kernels
  reach the layers' code as :func:`jaxq.flax.qarray_params.qarray_param_interceptor`
  serves them.
  """


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

