"""Serving Flax NNX models in int8 / int4: :func:`convert`, and the PTQ simulation mode.

:func:`convert` turns a (calibrated, :func:`jaxq.flax.nnx_ptq.calibrate`) quantized NNX
model into a serving model, called with the original model's arguments. In a copy of the
model (``nnx.clone``; the given model is left as it is), every quantized layer with a
weight spec gets its ``kernel`` replaced by an ``nnx.Param`` holding a
:class:`~jaxq.qarray.QArray` of the kernel's shape (int8, bit-packed int4 ...; per tensor,
per output feature or per output feature and group; :func:`jaxq.flax.kernel_qarray.
convert_kernel`, the conversion Linen's :func:`jaxq.flax.ptq.convert` uses: the same
layouts, float32 scales by default, ``compact_scales=True`` for float16 / float8 ones); no
float copy of it is kept. A static activation range becomes ``jaxq_act_scale`` /
``jaxq_act_zero_point`` (``nnx.Param``), from the calibrated observer or from the step
learned in QAT (LSQ, LSQ+, PACT: ``alpha / qmax``); observers and learned weight steps are
dropped. Stacked layers (``nnx.vmap``) are converted one layer at a time, their QArrays
carrying the stacking axes on every leaf, so that ``nnx.scan`` slices them.

A layer whose rule smooths or GPTQ-rounds (:mod:`jaxq.layer.smooth_ptq`) stores ``s W``
(GPTQ-rounded from its calibration Hessian, damping ``gptq_damping``), keeps
``jaxq_smooth`` and gets the exact activation range of ``x / s``; its ``jaxq_calib`` is
dropped. Serving divides its input by ``s`` where it quantizes it.

Each converted layer becomes a serving subclass (``ServingLinear``, ...) in the mode
``"serve"``: for the duration of a call its ``kernel`` attribute is a zero placeholder of
the kernel's shape and dtype (what the layer's own code reads; dead code under ``jit``)
that carries the QArray as Variable metadata, and the layer's contraction is computed by
:func:`jaxq.layer.serve.quantized_contraction` from the QArray and the stored scales, the
function Linen's serving uses: W8A8 layers (8-bit weights per tensor / channel, 8-bit
signed per-tensor static or dynamic activations) run :func:`jaxq.kernels.int8_matmul`.

The mode ``"sim"`` computes the same serving numerics from the float kernel, quantized
on the fly, and the calibrated observers (or learned steps): what :mod:`jaxq.analysis`
uses, with a per-layer selection flag ``jaxq_select`` (a :class:`SimSelect` variable
that is > 0 where the quantized result is used, the float one elsewhere) so that one
compilation serves every one-layer-at-a-time choice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxq import calibration
from jaxq import gptq
from jaxq.flax.kernel_qarray import convert_kernel, served_kernel
from jaxq.flax.nnx import (ACT_INITIALIZED, CONFIG, MODE, RULES, LayerConfig,
                           QuantStats, kernel_layout, register_mode)
from jaxq.flax.nnx_classes import node_subclass, set_class
from jaxq.flax.nnx_embed import convert_embeds, quantized_embeds
from jaxq.flax.nnx_fqvit import SIM_MODES, FqvitConfig, ptf_observer_qparams
from jaxq.flax.nnx_ptq import inference_view, quantized_modules
from jaxq.flax.batches import split_static_kwargs
from jaxq.layer.operands import (ACT_ALPHA, ACT_NAMES, ACT_SCALE, ACT_STATS,
                                 ACT_ZERO_POINT, WEIGHT_NAMES, is_learned)
from jaxq.layer import smooth_ptq
from jaxq.layer.serve import learned_act_qparams, quantized_contraction, static_act
from jaxq.layer.smooth import smooth_kernel
from jaxq.layer.views import Contraction, patched
from jaxq.params import check_rule_fields, per_layer
from jaxq.qarray import QArray

__all__ = ["convert", "serve_handler", "sim_handler", "serving_class", "SimSelect",
           "simulator", "eval_forward", "act_qparams", "SERVE_MODE", "SIM_MODE",
           "SELECT"]

SERVE_MODE, SIM_MODE = "serve", "sim"
#: The mode of a served FQ-ViT layer: the serving numerics of jaxq.flax.nnx_fqvit.
FQVIT_SERVE_MODE = SIM_MODES[0]
#: Attribute of a layer in the "sim" mode: its selection flag (:class:`SimSelect`).
SELECT = "jaxq_select"
# Variable metadata key of the serving placeholder kernel: the QArray it stands for.
_SERVED = "jaxq_qarray"


class SimSelect(nnx.Variable):
  """Selection flag of a layer in the "sim" mode: quantized result where > 0."""


def _get(layer, name: str):
  var = getattr(layer, name, None)
  return None if var is None else var.get_value()


def act_qparams(layer: nnx.Module, path: str, aspec, stack: int) -> dict | None:
  """Static activation ``{"scale", "zero_point"}`` of a quantized layer (None for a
  dynamic or absent spec): from its learned step, else its calibrated observer."""
  if not static_act(aspec):
    return None
  if is_learned(aspec, act=True):
    ready = _get(layer, ACT_INITIALIZED)
    if ready is not None and not isinstance(ready, jax.core.Tracer) and not bool(
        jnp.all(ready)):
      raise ValueError(f"layer '{path}': its learned activation step "
                       f"(estimator={aspec.estimator!r}) was never initialised: train "
                       "the model (or call it once in training mode) first")
    steps = {n: _get(layer, n) for n in ACT_NAMES if _get(layer, n) is not None}
    return per_layer(lambda s: learned_act_qparams(aspec, s.get, path), stack)(steps)
  st = _get(layer, ACT_STATS)
  if st is None or (not isinstance(st["n"], jax.core.Tracer)
                    and not bool(jnp.all(st["n"] > 0))):
    raise ValueError(f"layer '{path}': its activation spec has a static range, which "
                     "needs calibration: run jaxq.nnx.calibrate(qmodel, batches) on data "
                     "that reaches the layer with finite values first (or use "
                     "QuantSpec(dynamic=True) for per-token ranges computed at run time)")
  scale, zp = per_layer(lambda s: calibration.observer_qparams(s, aspec), stack)(st)
  return {"scale": scale, "zero_point": zp}


# --------------------------------------------------------------------------------------
# Mode handlers
# --------------------------------------------------------------------------------------


def serve_handler(layer: nnx.Module, op: Contraction) -> jax.Array:
  """Mode "serve": the contraction from the stored QArray kernel and activation scales."""
  cfg: LayerConfig = getattr(layer, CONFIG)
  qw = layer.kernel.get_metadata().get(_SERVED)
  act = None
  if static_act(cfg.rule.act):
    act = {"scale": _get(layer, ACT_SCALE), "zero_point": _get(layer, ACT_ZERO_POINT)}
  return quantized_contraction(op, cfg.path, cfg.rule.act, qw, act,
                               smooth=_smoothing(layer, cfg))


def _smoothing(layer, cfg: LayerConfig) -> jax.Array | None:
  """The layer's recorded smoothing scale (None without a smooth rule)."""
  if cfg.rule.smooth is None:
    return None
  s = _get(layer, smooth_ptq.SMOOTH)
  if s is None:
    raise ValueError(smooth_ptq.missing_message(
        cfg.path, cfg.rule, f"a smoothing scale ('{smooth_ptq.SMOOTH}')"))
  return s


def sim_handler(layer: nnx.Module, op: Contraction) -> jax.Array:
  """Mode "sim": the serving numerics, the kernel quantized on the fly (a GPTQ layer's
  rounded beforehand: ``jaxq_gptq_kernel``); with a :class:`SimSelect` flag, the float
  result where it is <= 0."""
  cfg: LayerConfig = getattr(layer, CONFIG)
  qw = _get(layer, smooth_ptq.GPTQ_KERNEL)
  smooth_ptq.check_simulable(cfg.rule, cfg.path, qw)
  s = _smoothing(layer, cfg)
  w = jax.lax.stop_gradient(op.rhs)
  if s is not None:
    w = smooth_kernel(w, op.rhs_contract, s, cfg.path)
  if cfg.rule.weight is not None and qw is None:
    learned = {n: _get(layer, n) for n in WEIGHT_NAMES if _get(layer, n) is not None}
    qw = served_kernel(w, cfg.rule.weight, op.rhs_contract, learned)
  if s is not None and static_act(cfg.rule.act):
    act = smooth_ptq.act_qparams(_calibration(layer, cfg), s, cfg.rule.act, path=cfg.path)
  else:
    act = act_qparams(layer, cfg.path, cfg.rule.act, 0)
  sop = op if s is None else dataclasses.replace(op, rhs=w)
  y = quantized_contraction(sop, cfg.path, cfg.rule.act, qw, act, smooth=s)
  select = _get(layer, SELECT)
  if select is not None:
    y = jnp.where(select > 0, y, op.compute(op.lhs, op.rhs))
  return y


register_mode(SERVE_MODE, serve_handler)
register_mode(SIM_MODE, sim_handler)


# --------------------------------------------------------------------------------------
# The serving layers
# --------------------------------------------------------------------------------------

def serving_class(cls: type) -> type:
  """The serving subclass of a quantized layer class (one per class: stable graphdefs).

  Its ``__call__`` runs the quantized layer's call with ``kernel`` replaced by a zero
  placeholder that carries the QArray (see the module docstring)."""

  def make_call(base_call):
    def __call__(self, *args, **kwargs):  # pylint: disable=invalid-name
      q = self.kernel.get_value()
      if not isinstance(q, QArray):
        return base_call(self, *args, **kwargs)
      stand_in = nnx.Param(jnp.zeros(q.shape, q.dtype), **{_SERVED: q})
      with patched(self, kernel=stand_in):
        return base_call(self, *args, **kwargs)
    return __call__

  return node_subclass(cls, "Serving", make_call, module=__name__,
                       doc=f"A served ``{cls.__name__}`` made by ``jaxq.nnx.convert`` "
                           "(QArray kernel).")


def _calibration(layer, cfg: LayerConfig):
  st = _get(layer, smooth_ptq.CALIB)
  if st is None:
    raise ValueError(smooth_ptq.missing_message(
        cfg.path, cfg.rule, f"calibration statistics ('{smooth_ptq.CALIB}')"))
  return st


def _drop(layer, names) -> None:
  for n in names:
    if n in vars(layer):
      delattr(layer, n)


def convert(qmodel: nnx.Module, *, compact_scales: bool = False,
            gptq_damping: float = gptq.DEFAULT_DAMPING) -> nnx.Module:
  """A serving copy of a (calibrated) quantized NNX model; see the module docstring.

  Args:
    qmodel: a model quantized by :func:`jaxq.nnx.quantize_model` and, for static
      activation specs, calibrated (:func:`jaxq.nnx.calibrate`) or trained (learned
      steps). It is not modified and stays usable.
    compact_scales: as :func:`jaxq.flax.ptq.convert`'s: float16 (5..8 bits) / float8
      (<= 4 bits) symmetric weight scales, rounded up; default float32 scales, with which
      the served weights equal the QAT weights.
    gptq_damping: GPTQ's damping (fraction of the Hessian's mean diagonal), as
      :func:`jaxq.flax.ptq.convert`'s.

  Returns:
    The serving model: ``serving(*args, **kwargs)`` as the original model;
    ``nnx.state(serving)`` holds the QArray kernels and the activation scales.

  Raises:
    ValueError: a static activation spec that was never calibrated (or whose observer saw
      no finite value) or a learned step never initialised, naming the layer; a kernel
      the weight spec does not fit; a model converted already; a smooth / GPTQ layer
      whose statistics calibrate did not record.
  """
  layers = list(quantized_modules(qmodel))
  if not layers and not any(quantized_embeds(qmodel)):
    raise ValueError("qmodel has no quantized layer: quantize it with "
                     "jaxq.nnx.quantize_model(model, rules) first")
  check_rule_fields(getattr(qmodel, RULES, ()), "jaxq.nnx.convert", lora=False, smooth=True,
                    gptq=True)
  served = [p for p, layer, _ in layers if isinstance(layer.kernel.get_value(), QArray)]
  if served:
    raise ValueError(f"layer(s) {', '.join(repr(p) for p in served)} hold QArray kernels "
                     "already: convert the quantized model, not its serving model")
  serving = nnx.clone(qmodel)
  for _, layer, cfg in list(quantized_modules(serving)):
    rule, path = cfg.rule, cfg.path
    stack, contract, _ = kernel_layout(layer)
    kernel = layer.kernel.get_value()
    if smooth_ptq.calibration_needs(rule):
      cal, s = _get(layer, smooth_ptq.CALIB), _get(layer, smooth_ptq.SMOOTH)
      smooth_ptq.check_calibrated(rule, cal, s, path)
      kernel = smooth_ptq.convert_kernel(kernel, contract, rule, cal, s, stack,
                                         damping=gptq_damping, path=path)
      act = (smooth_ptq.act_qparams(cal, s, rule.act, stack, path)
             if s is not None and static_act(rule.act) else
             act_qparams(layer, path, rule.act, stack))
    else:
      act = act_qparams(layer, path, rule.act, stack)
    if rule.weight is not None and not isinstance(kernel, QArray):
      learned = {n: _get(layer, n) for n in WEIGHT_NAMES if _get(layer, n) is not None}
      kernel = convert_kernel(path, rule.weight, kernel, None, contract, learned, stack,
                              compact_scales)
    if kernel is not layer.kernel.get_value():
      layer.kernel = nnx.Param(kernel)
    _drop(layer, WEIGHT_NAMES + (ACT_ALPHA, ACT_STATS, ACT_INITIALIZED, SELECT,
                                 smooth_ptq.CALIB))
    if act is not None:
      setattr(layer, ACT_SCALE, nnx.Param(act["scale"]))
      setattr(layer, ACT_ZERO_POINT, nnx.Param(act["zero_point"]))
    setattr(layer, MODE, SERVE_MODE)
    set_class(layer, serving_class(type(layer)))
  convert_embeds(serving, act_qparams)  # nnx.Embed tables -> QArrays
  # FQ-ViT layers serve from their calibrated PTF observers and log2 codes.
  for _, layer in nnx.iter_modules(serving):
    fq = getattr(layer, CONFIG, None)
    if isinstance(fq, FqvitConfig):
      if fq.kind == "ptf":
        ptf_observer_qparams(layer)  # a ValueError naming a never-calibrated LayerNorm
      setattr(layer, MODE, FQVIT_SERVE_MODE)
  return serving


# --------------------------------------------------------------------------------------
# Simulation, one layer at a time (jaxq.analysis)
# --------------------------------------------------------------------------------------


def _forward(graphdef, static_kwargs, *states_args):
  *states, args, kwargs = states_args
  return nnx.merge(graphdef, *states)(*args, **kwargs, **dict(static_kwargs))


_forward_jit = jax.jit(_forward, static_argnums=(0, 1))


def eval_forward(model: nnx.Module) -> Callable:
  """``run(args, kwargs)``: ``model`` called as at inference (``deterministic=True``,
  ``use_running_average=True``), compiled once per argument shapes."""
  graphdef, state = nnx.split(inference_view(model))

  def run(args, kwargs):
    static, arrays = split_static_kwargs(kwargs)
    return _forward_jit(graphdef, static, state, args, arrays)

  return run


def simulator(qmodel: nnx.Module) -> tuple[list[str], dict[str, int], Callable]:
  """``(paths, sizes, run)`` for a calibrated quantized model: the quantized layers'
  paths, their kernel sizes, and ``run(path, args, kwargs)``, the model's output with only
  the layer at ``path`` quantized (mode "sim", serving numerics) and evaluated as at
  inference. One compilation serves every ``path`` (the layers' :class:`SimSelect`
  flags are an argument). GPTQ layers are rounded here, on the host, with convert's
  default damping."""
  sim = nnx.clone(qmodel)
  layers = list(quantized_modules(sim))
  sizes = {}
  for path, layer, cfg in layers:
    stack, contract, _ = kernel_layout(layer)
    shape = layer.kernel.get_value().shape
    sizes[path] = math.prod(shape)
    if smooth_ptq.is_gptq(cfg.rule):  # rounded on the host once, as convert rounds it
      cal, s = _get(layer, smooth_ptq.CALIB), _get(layer, smooth_ptq.SMOOTH)
      smooth_ptq.check_calibrated(cfg.rule, cal, s, cfg.path)
      setattr(layer, smooth_ptq.GPTQ_KERNEL, QuantStats(smooth_ptq.convert_kernel(
          layer.kernel.get_value(), contract, cfg.rule, cal, s, stack, path=cfg.path)))
    setattr(layer, SELECT, SimSelect(jnp.zeros(shape[:stack], jnp.float32)))
    setattr(layer, MODE, SIM_MODE)
  for _, embed_layer, _ in quantized_embeds(sim):  # not analysed: float (calibration)
    setattr(embed_layer, MODE, "calibrate")
  view = inference_view(sim)
  graphdef, _, rest = nnx.split(view, SimSelect, ...)
  flags = {path: getattr(layer, SELECT) for path, layer, _ in quantized_modules(view)}

  def run(path, args, kwargs):
    for p, var in flags.items():
      var.set_value(jnp.full(var.get_value().shape, float(p == path), jnp.float32))
    static, arrays = split_static_kwargs(kwargs)
    return _forward_jit(graphdef, static, nnx.state(view, SimSelect), rest, args, arrays)

  return [p for p, _, _ in layers], sizes, run
