"""Post-training calibration of Flax NNX models: :func:`calibrate`.

The NNX counterpart of :func:`jaxq.flax.ptq.calibrate`::

  qmodel = jaxq.nnx.quantize_model(model, rules)
  jaxq.nnx.calibrate(qmodel, batches)       # activation observers filled in place
  serving = jaxq.nnx.convert(qmodel)        # jaxq.flax.nnx_serve
  y = serving(*args)

:func:`calibrate` runs the model once per batch in the mode ``"calibrate"``
(:func:`jaxq.flax.nnx.register_mode`): the float forward (each quantized layer computes
its contraction on float operands), and the activation observer ``jaxq_act`` (a
:class:`~jaxq.flax.nnx.QuantStats`, :mod:`jaxq.calibration`) of every quantized layer with
a static (non-dynamic) activation spec is updated with the layer's input, whatever the
spec's calibration: a "minmax" spec, which keeps no observer in QAT, gets one here
(created before the first batch). Everything is as Linen's ``"ptq_calibrate"`` mode does
it, so a Linen model and its NNX twin calibrated on the same batches hold the same ranges.
A layer whose rule smooths or GPTQ-rounds (Contract 7, :mod:`jaxq.layer.smooth_ptq`)
also accumulates its :class:`~jaxq.layer.calib.LayerCalibration` (attribute
``jaxq_calib``, a ``QuantStats``) in the same pass; its scaling ``s`` is then chosen and
stored as ``jaxq_smooth`` (``QuantStats``), which QAT, :func:`jaxq.nnx.convert` and the
simulation use.

The model runs as at inference: a view with ``deterministic=True`` and
``use_running_average=True`` (``nnx.view``: BatchNorm uses its running statistics,
Dropout is off); the model's own mode and every other variable are left as they are.
One compiled step (``nnx.split`` + ``jax.jit``, the graph static) serves every batch of
one shape, and later calls with the same model structure and shapes.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxq import calibration
from jaxq.flax import nnx_embed
from jaxq.flax.nnx_fqvit import PTF_STATS
from jaxq.flax.nnx import (CONFIG, LAYER_TYPES, MODE, RULES, LayerConfig, QuantStats,
                           kernel_layout, register_mode)
from jaxq.flax.batches import is_empty_batch, normalize_batch, split_static_kwargs
from jaxq.layer import smooth_ptq
from jaxq.layer.calib import calibration_update
from jaxq.layer.operands import ACT_STATS, act_stat_shape, observer_view
from jaxq.layer.views import Contraction
from jaxq.params import check_rule_fields

__all__ = ["calibrate", "transfer_calibration", "calibrate_handler", "quantized_modules",
           "modes", "inference_view", "CALIBRATE_MODE"]

CALIBRATE_MODE = "calibrate"

# Paths of the layers a calibration trace reached (set while tracing, else None).
_REACHED = threading.local()


def quantized_modules(model: nnx.Module) -> Iterator[tuple[str, nnx.Module, LayerConfig]]:
  """``(path, layer, config)`` of every quantized layer of ``model`` (paths as now nested)."""
  for path_t, module in nnx.iter_modules(model):
    cfg = getattr(module, CONFIG, None) if isinstance(module, LAYER_TYPES) else None
    if isinstance(cfg, LayerConfig):
      yield "/".join(str(p) for p in path_t), module, cfg


@contextlib.contextmanager
def modes(model: nnx.Module, mode: str):
  """Every quantized layer of ``model`` (contractions and FQ-ViT layers: every module
  with a ``jaxq_mode``) in ``mode`` for the duration of the block."""
  layers = [m for _, m in nnx.iter_modules(model) if MODE in vars(m)]
  old = [getattr(m, MODE) for m in layers]
  try:
    for m in layers:
      setattr(m, MODE, mode)
    yield
  finally:
    for m, o in zip(layers, old):
      setattr(m, MODE, o)


def inference_view(model: nnx.Module) -> nnx.Module:
  """``model`` as at inference (``nnx.view``: ``deterministic=True``,
  ``use_running_average=True`` where a module has them), sharing its arrays."""
  return nnx.view(model, deterministic=True, use_running_average=True,
                  raise_if_not_found=False)


def calibrate_handler(layer: nnx.Module, op: Contraction) -> jax.Array:
  """Mode "calibrate": float forward; the static activation observer updated."""
  cfg: LayerConfig = getattr(layer, CONFIG)
  reached = getattr(_REACHED, "paths", None)
  if reached is not None:
    reached.add(cfg.path)
  x2, _ = op.lhs_matrix()
  if cfg.act is not None and not cfg.act.dynamic:
    var = getattr(layer, ACT_STATS)
    view, axes = observer_view(x2, cfg.act, 1)
    var.set_value(calibration.observer_update(var.get_value(), view, cfg.act, axes))
  if smooth_ptq.calibration_needs(cfg.rule):
    var = getattr(layer, smooth_ptq.CALIB)
    var.set_value(calibration_update(var.get_value(), x2))
  return op.compute(op.lhs, op.rhs)


register_mode(CALIBRATE_MODE, calibrate_handler)


def _fresh_observer(layer: nnx.Module, cfg: LayerConfig):
  """An empty observer of ``cfg.act`` for the layer, stacked like its kernel."""
  stack, _, k = kernel_layout(layer)
  lead = tuple(layer.kernel.get_value().shape[:stack])
  state = calibration.observer_init(cfg.act, act_stat_shape(cfg.act, k))
  return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, lead + a.shape), state)


def _run(graphdef, static_kwargs, stats, rest, args, arrays):
  model = nnx.merge(graphdef, stats, rest)
  model(*args, **arrays, **dict(static_kwargs))
  return nnx.state(model, QuantStats)


#: One compiled calibration step per (graph, static kwargs, shapes).
_step = jax.jit(_run, static_argnums=(0, 1))


def _record_smoothing(layers) -> None:
  """Chooses and stores ``jaxq_smooth`` of each ``(path, layer, config)`` whose rule
  smooths, from its ``jaxq_calib`` and kernel."""
  for _, layer, cfg in layers:
    var = getattr(layer, smooth_ptq.CALIB, None)
    if smooth_ptq.calibration_needs(cfg.rule) and var is not None and (
        var.get_value() is not None):
      stack, contract, _ = kernel_layout(layer)
      s = smooth_ptq.record_smoothing(layer.kernel.get_value(), contract, cfg.rule,
                                      var.get_value(), stack, cfg.path)
      if s is not None:
        setattr(layer, smooth_ptq.SMOOTH, QuantStats(s))


def _copy_state(source: nnx.Module, target: nnx.Module, names) -> None:
  """The ``names`` variables of each quantized layer of ``source`` set on the layer of
  ``target`` at the same path (None there where ``source`` has none)."""
  values = {p: layer for p, layer, _ in quantized_modules(source)}
  for path, target_layer, _ in quantized_modules(target):
    layer = values.get(path)
    for name in names:
      value = getattr(layer, name).get_value() if hasattr(layer, name) else None
      if isinstance(getattr(target_layer, name, None), QuantStats):
        getattr(target_layer, name).set_value(value)
      elif value is not None:
        setattr(target_layer, name, QuantStats(value))


def transfer_calibration(source: nnx.Module, target: nnx.Module) -> nnx.Module:
  """Gives ``target`` (the model of ``source`` quantized with other weight specs) the
  calibration of ``source``, in place, as calibrating it on the same batches would:
  activation observers and ``jaxq_calib`` statistics copied (the calibration forward is
  the float model's, whatever the weight spec), ``jaxq_smooth`` chosen anew for
  ``target``'s rules (``smooth="auto"`` searches with the weight spec). Returns
  ``target``; :mod:`jaxq.analysis` calibrates once for all candidate widths with it."""
  _copy_state(source, target, (ACT_STATS, smooth_ptq.CALIB))
  _record_smoothing(list(quantized_modules(target)))
  return target


def calibrate(qmodel: nnx.Module, batches: Iterable, *, reset: bool = True,
              **call_kwargs) -> nnx.Module:
  """Fills the activation observers of an NNX ``qmodel`` from ``batches``, in place.

  Args:
    qmodel: a model quantized by :func:`jaxq.nnx.quantize_model`.
    batches: an iterable of batches, each a tuple / list of positional arguments, a dict
      of keyword arguments, or a bare array (one positional argument), called as
      ``qmodel(*args, **kwargs)`` with the float model's numerics. A batch holding an
      empty array (a zero-length final batch) is skipped.
    reset: start every observer empty (default) rather than from its current state.
    **call_kwargs: keyword arguments passed to every call.

  Returns:
    ``qmodel``, whose quantized layers with a static activation spec now hold their
    calibrated observer ``jaxq_act`` (see the module docstring).

  Raises:
    ValueError: no non-empty batch; a layer the batches reached whose observer saw no
      finite value (naming the layers). ``qmodel`` is then left as it was.
  """
  if not list(quantized_modules(qmodel)) and not any(nnx_embed.quantized_embeds(qmodel)):
    raise ValueError("qmodel has no quantized layer: quantize it with "
                     "jaxq.nnx.quantize_model(model, rules) first")
  check_rule_fields(getattr(qmodel, RULES, ()), "jaxq.nnx.calibrate", lora=False,
                    smooth=True, gptq=True)
  work = nnx.clone(qmodel)  # qmodel changes only when calibration succeeds
  layers = list(quantized_modules(work))
  for _, layer, cfg in layers:
    if cfg.act is not None and not cfg.act.dynamic and (
        reset or not isinstance(getattr(layer, ACT_STATS, None), QuantStats)):
      setattr(layer, ACT_STATS, QuantStats(_fresh_observer(layer, cfg)))
    if smooth_ptq.calibration_needs(cfg.rule) and (
        reset or not isinstance(getattr(layer, smooth_ptq.CALIB, None), QuantStats)):
      stack, _, k = kernel_layout(layer)
      lead = tuple(layer.kernel.get_value().shape[:stack])
      setattr(layer, smooth_ptq.CALIB,
              QuantStats(smooth_ptq.initial_calibration(cfg.rule, k, lead)))
  ptf = [m for _, m in nnx.iter_modules(work) if PTF_STATS in vars(m)]
  if reset:
    nnx_embed.reset_observers(work)  # nnx.Embed attend observers
    for m in ptf:
      var = getattr(m, PTF_STATS)
      var.set_value(jax.tree_util.tree_map(jnp.zeros_like, var.get_value()))
  with modes(work, CALIBRATE_MODE):
    graphdef, stats, rest = nnx.split(inference_view(work), QuantStats, ...)
  reached: set[str] = set()
  seen = False
  for batch in batches:
    args, kwargs = normalize_batch(batch)
    if is_empty_batch(args, kwargs):
      continue
    static, arrays = split_static_kwargs({**kwargs, **call_kwargs})
    if not seen:  # one abstract trace records which layers the batches reach
      _REACHED.paths = reached
      try:
        jax.eval_shape(functools.partial(_run, graphdef, static), stats, rest, args, arrays)
      finally:
        _REACHED.paths = None
      seen = True
    stats = _step(graphdef, static, stats, rest, args, arrays)
  if not seen:
    raise ValueError("batches is empty (or every batch is): calibration needs at least "
                     "one non-empty batch")
  nnx.update(work, stats)
  empty = [path for path, layer, cfg in layers if cfg.path in reached and (
      (cfg.act is not None and not cfg.act.dynamic
       and not bool(jnp.all(getattr(layer, ACT_STATS).get_value()["n"] > 0)))
      or (smooth_ptq.calibration_needs(cfg.rule)
          and not smooth_ptq.saw_finite(getattr(layer, smooth_ptq.CALIB).get_value())))]
  if empty:
    raise ValueError(
        f"calibration saw no finite activation value at layer(s) "
        f"{', '.join(repr(p) for p in empty)} (every batch was NaN/Inf there, in the "
        "whole tensor or some of its channels); calibrate on data that reaches them with "
        "finite values")
  _record_smoothing([(p, l, c) for p, l, c in layers if c.path in reached])
  _copy_state(work, qmodel, (ACT_STATS, smooth_ptq.CALIB, smooth_ptq.SMOOTH))
  nnx_embed.copy_observers(work, qmodel)
  for layer, target in zip(ptf, [m for _, m in nnx.iter_modules(qmodel)
                                 if PTF_STATS in vars(m)]):
    getattr(target, PTF_STATS).set_value(getattr(layer, PTF_STATS).get_value())
  return qmodel
