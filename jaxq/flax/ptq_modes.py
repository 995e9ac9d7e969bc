"""The Linen PTQ modes of a matched layer: calibration (observer update and the kernel's
layout recorded), serving from QArray kernels and stored activation scales, and the
simulation of serving from float variables (:mod:`jaxq.analysis`). Each computes the
layer's contraction through :func:`jaxq.layer.serve.quantized_contraction`.
"""

from __future__ import annotations

import dataclasses
import threading

import jax
import jax.numpy as jnp

from jaxq import calibration
from jaxq.flax import linen as qlinen
from jaxq.flax.kernel_qarray import served_kernel
from jaxq.flax.linen import QUANT_STATS, Contraction, LayerCall, register_mode
from jaxq.layer import operands
from jaxq.layer import smooth_ptq
from jaxq.layer.calib import calibration_update
from jaxq.layer.serve import learned_act_qparams, quantized_contraction, static_act
from jaxq.layer.smooth import smooth_kernel
from jaxq.qarray import QArray

__all__ = ["CALIBRATE_MODE", "SERVE_MODE", "SIM_MODE", "KERNEL_AXES", "KERNEL_RANK",
           "ACT_SCALE", "ACT_ZERO_POINT", "SELECT", "RECORD", "calibrate_handler",
           "serve_handler", "sim_handler", "uncalibrated_message"]

CALIBRATE_MODE = "ptq_calibrate"
SERVE_MODE = "ptq_serve"
SIM_MODE = "ptq_sim"
#: quant_stats entry: int32 contraction axes of a matched kernel (recorded by calibrate).
KERNEL_AXES = "jaxq_kernel_axes"
#: quant_stats entry: the kernel's rank as its layer's call sees it (one layer of a stack).
KERNEL_RANK = "jaxq_kernel_rank"
ACT_SCALE, ACT_ZERO_POINT = operands.ACT_SCALE, operands.ACT_ZERO_POINT

#: Kernel layouts seen while tracing a calibration step (``RECORD.axes``: {path:
#: (contraction axes, rank)}, set by :func:`jaxq.calibrate` around its trace, else unset).
RECORD = threading.local()


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
    return learned_act_qparams(aspec, lambda n: m.get_variable("params", n), call.path)
  if not m.has_variable(QUANT_STATS, operands.ACT_STATS):
    raise ValueError(uncalibrated_message(call.path))
  st = m.get_variable(QUANT_STATS, operands.ACT_STATS)
  del x2_k
  scale, zp = calibration.observer_qparams(st, aspec)
  return {"scale": scale, "zero_point": zp}


def _calibration(call: LayerCall):
  """The layer's ``quant_stats/jaxq_calib`` (ValueError naming the layer if absent)."""
  if not call.module.has_variable(QUANT_STATS, smooth_ptq.CALIB):
    raise ValueError(smooth_ptq.missing_message(
        call.path, call.rule, f"calibration statistics ('{QUANT_STATS}/{smooth_ptq.CALIB}')"))
  return call.module.get_variable(QUANT_STATS, smooth_ptq.CALIB)


def uncalibrated_message(path: str) -> str:
  return (f"layer '{path}': its activation spec has a static range, which needs "
          "calibration: run jaxq.calibrate(qmodel, variables, batches) first (or use "
          "QuantSpec(dynamic=True) for per-token ranges computed at run time)")


# --------------------------------------------------------------------------------------
# Mode handlers
# --------------------------------------------------------------------------------------


def calibrate_handler(call: LayerCall, op: Contraction) -> jax.Array:
  """Calibration: linen's observer update, the kernel's contraction axes recorded, and
  for a smooth / GPTQ rule its :class:`~jaxq.layer.calib.LayerCalibration`
  (``quant_stats/jaxq_calib``) updated with the layer's input view."""
  rec = getattr(RECORD, "axes", None)
  if rec is not None:
    rec[call.path] = (tuple(int(a) % op.rhs.ndim for a in op.rhs_contract), op.rhs.ndim)
  m = call.module
  if smooth_ptq.calibration_needs(call.rule) and m.is_mutable_collection(QUANT_STATS):
    x2, _ = op.lhs_matrix()
    var = m.variable(QUANT_STATS, smooth_ptq.CALIB, smooth_ptq.initial_calibration,
                     call.rule, x2.shape[1])
    var.value = calibration_update(var.value, x2)
  return qlinen.calibrate_handler(call, op)


def _smoothing(call: LayerCall, collection: str) -> jax.Array | None:
  """The layer's recorded smoothing scale (None without a smooth rule); a ValueError
  naming the layer when its rule smooths and none is stored in ``collection``."""
  if call.rule.smooth is None:
    return None
  m = call.module
  if not m.has_variable(collection, smooth_ptq.SMOOTH):
    raise ValueError(smooth_ptq.missing_message(
        call.path, call.rule, f"a smoothing scale ('{collection}/{smooth_ptq.SMOOTH}')"))
  return m.get_variable(collection, smooth_ptq.SMOOTH)


def serve_handler(call: LayerCall, op: Contraction) -> jax.Array:
  """Serving: the stored QArray kernel and activation scales."""
  m = call.module
  # The kernel, or an nn.Embed's table (attend: jaxq.flax.embed_linen).
  qw = next((m.get_variable("params", n) for n in ("kernel", "embedding")
             if m.has_variable("params", n)), None)
  if not isinstance(qw, QArray):
    qw = None
  act = None
  if static_act(call.rule.act):
    spec = call.rule.act
    if not m.has_variable("params", ACT_SCALE):
      if spec.estimator == "pact" and m.has_variable("params", operands.ACT_ALPHA):
        act = learned_act_qparams(spec, lambda n: m.get_variable("params", n), call.path)
      else:
        raise ValueError(uncalibrated_message(call.path) + " and convert it")
    else:
      scale = m.get_variable("params", ACT_SCALE)
      zp = (m.get_variable("params", ACT_ZERO_POINT)
            if m.has_variable("params", ACT_ZERO_POINT) else jnp.zeros_like(scale))
      act = {"scale": scale, "zero_point": zp}
  return quantized_contraction(op, call.path, call.rule.act, qw, act,
                               smooth=_smoothing(call, "params"))


def sim_handler(call: LayerCall, op: Contraction) -> jax.Array:
  """Simulated PTQ from float variables (the serving numerics, quantized on the fly).

  A GPTQ layer uses the kernel rounded beforehand (``quant_stats/jaxq_gptq_kernel``).
  With a ``"quant_stats"`` variable ``"jaxq_select"`` in the layer's scope, the quantized
  result is used where it is > 0 and the float result elsewhere (one compilation serves
  every one-layer-at-a-time choice; :mod:`jaxq.analysis`). It lives in "quant_stats" so
  that it reaches the layers of ``nn.scan`` / ``nn.vmap`` stacks, stacked like them.
  """
  wspec, m = call.rule.weight, call.module
  qw = (m.get_variable(QUANT_STATS, smooth_ptq.GPTQ_KERNEL)
        if m.has_variable(QUANT_STATS, smooth_ptq.GPTQ_KERNEL) else None)
  smooth_ptq.check_simulable(call.rule, call.path, qw)
  s = _smoothing(call, QUANT_STATS)
  w = jax.lax.stop_gradient(op.rhs)
  if s is not None:
    w = smooth_kernel(w, op.rhs_contract, s, call.path)
  if wspec is not None and qw is None:
    learned = {n: call.module.get_variable("params", n) for n in operands.WEIGHT_NAMES
               if call.module.has_variable("params", n)}
    qw = served_kernel(w, wspec, op.rhs_contract, learned)
  if s is not None and static_act(call.rule.act):
    act = smooth_ptq.act_qparams(_calibration(call), s, call.rule.act, path=call.path)
  else:
    act = _act_qparams_from_stats(call, op.lhs.shape[-1])
  sop = op if s is None else dataclasses.replace(op, rhs=w)
  y = quantized_contraction(sop, call.path, call.rule.act, qw, act, smooth=s)
  if m.has_variable(QUANT_STATS, SELECT):
    on = m.get_variable(QUANT_STATS, SELECT)
    y = jnp.where(on > 0, y, op.compute(op.lhs, op.rhs))
  return y


#: quant_stats entry: a layer's selection flag read by the "ptq_sim" mode.
SELECT = "jaxq_select"

register_mode(CALIBRATE_MODE, calibrate_handler)
register_mode(SERVE_MODE, serve_handler)
register_mode(SIM_MODE, sim_handler)
