"""Where Linen PTQ keeps the state of ``Rule.smooth`` / ``QuantSpec(rounding="gptq")``
layers (the Linen side of :mod:`jaxq.layer.smooth_ptq`).

* calibration: ``quant_stats/jaxq_calib`` (a :class:`~jaxq.layer.calib.LayerCalibration`,
  stacked like the kernel under ``nn.scan`` / ``nn.vmap``), updated by the
  ``"ptq_calibrate"`` mode; when the pass is done :func:`record` stores the layer's
  scaling as ``quant_stats/jaxq_smooth``, which QAT (:func:`jaxq.flax.linen.qat_handler`)
  and the ``"ptq_sim"`` mode read;
* serving: :func:`convert_layer` puts the smoothed (GPTQ-rounded) kernel, ``s`` as
  ``params/jaxq_smooth`` and the activation scales of ``x / s`` into the serving params.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import traverse_util
from flax.core import meta

from jaxq import gptq
from jaxq.flax.ptq_modes import KERNEL_AXES, KERNEL_RANK
from jaxq.layer import smooth_ptq
from jaxq.layer.serve import static_act
from jaxq.params import tree_get
from jaxq.qarray import QArray
from jaxq.spec import Rule, match_rule

__all__ = ["initial_calibrations", "record", "simulation_stats", "convert_layer"]


def initial_calibrations(rules, tree: dict, keys: tuple[str, ...] = ()) -> dict:
  """``tree`` (zeros shaped like the calibration state) with every ``jaxq_calib`` entry
  set to the empty :class:`~jaxq.layer.calib.LayerCalibration` of its layer's rule."""
  out = {}
  for k, v in tree.items():
    if k == smooth_ptq.CALIB:
      rule = match_rule(rules, "/".join(keys))
      if v.stats is not None:
        lead, kk = v.stats.lo.shape[:-1], v.stats.lo.shape[-1]
      else:
        lead, kk = v.hessian.xtx.shape[:-2], v.hessian.xtx.shape[-1]
      res = {} if v.tokens is None else {"reservoir": v.tokens.rows.shape[-2]}
      out[k] = smooth_ptq.initial_calibration(rule, kk, tuple(lead), **res)
    elif isinstance(v, Mapping):
      out[k] = initial_calibrations(rules, v, keys + (k,))
    else:
      out[k] = v
  return out


def record(node: dict, rule: Rule, path: str, kernel, axes, stack: int) -> bool:
  """Stores the layer's scaling ``jaxq_smooth`` in its "quant_stats" ``node`` after a
  calibration pass; False when its ``jaxq_calib`` did not come back (a lifted
  transform that does not map "quant_stats")."""
  if smooth_ptq.CALIB not in node:
    return False
  s = smooth_ptq.record_smoothing(kernel, axes, rule, node[smooth_ptq.CALIB], stack, path)
  if s is not None:
    node[smooth_ptq.SMOOTH] = s
  return True


def simulation_stats(rules, stats: dict, params: dict, *, choose: bool = True) -> dict:
  """``stats`` (a calibrated "quant_stats") ready for the ``"ptq_sim"`` mode with
  ``rules``: each layer's ``jaxq_smooth`` chosen anew for them (``choose``) from its
  ``jaxq_calib`` and kernel in ``params``, as calibrating with ``rules`` would record it
  (the statistics do not depend on the weight spec, the choice may: ``smooth="auto"``
  searches with it), and each GPTQ layer's kernel rounded on the host as ``convert``
  rounds it (default damping), stored as ``jaxq_gptq_kernel``. :mod:`jaxq.analysis`
  calibrates once for all candidate widths with this."""
  flat = traverse_util.flatten_dict(stats)
  for key, cal in list(flat.items()):
    if key[-1] != smooth_ptq.CALIB:
      continue
    lp, path = key[:-1], "/".join(key[:-1])
    rule = match_rule(rules, path)
    kernel = meta.unbox((tree_get(params, lp) or {}).get("kernel"))
    axes = np.asarray(flat[lp + (KERNEL_AXES,)])
    axes = tuple(int(a) for a in axes.reshape(-1, axes.shape[-1])[0])
    stack = np.ndim(kernel) - int(np.asarray(flat[lp + (KERNEL_RANK,)]).reshape(-1)[0])
    s = smooth_ptq.record_smoothing(kernel, axes, rule, cal, stack, path) if choose else (
        flat.get(lp + (smooth_ptq.SMOOTH,)))
    if s is not None:
      flat[lp + (smooth_ptq.SMOOTH,)] = s
    if smooth_ptq.is_gptq(rule):
      flat[lp + (smooth_ptq.GPTQ_KERNEL,)] = smooth_ptq.convert_kernel(
          kernel, axes, rule, cal, s, stack, path=path)
  return traverse_util.unflatten_dict(flat)


def convert_layer(flat: dict, lp: tuple[str, ...], rule: Rule, stats: dict, kernel,
                  contract, stack: int, damping: float = gptq.DEFAULT_DAMPING):
  """Converts a layer whose rule :func:`~jaxq.layer.smooth_ptq.calibration_needs`:
  writes its GPTQ QArray (or, without a weight spec, its smoothed float kernel),
  ``jaxq_smooth`` and the activation scales of ``x / s`` into the flat serving params;
  returns the kernel left for round-to-nearest conversion (the smoothed float kernel,
  or the QArray already stored). ValueError naming the layer when calibration did not
  record what the rule needs."""
  path = "/".join(lp)
  cal = tree_get(stats, lp + (smooth_ptq.CALIB,))
  s = tree_get(stats, lp + (smooth_ptq.SMOOTH,))
  smooth_ptq.check_calibrated(rule, cal, s, path)
  kernel = smooth_ptq.convert_kernel(kernel, contract, rule, cal, s, stack,
                                     damping=damping, path=path)
  if isinstance(kernel, QArray) or rule.weight is None:
    flat[lp + ("kernel",)] = kernel
  if s is not None:
    flat[lp + (smooth_ptq.SMOOTH,)] = s
    if static_act(rule.act):
      act = smooth_ptq.act_qparams(cal, s, rule.act, stack, path)
      flat[lp + (smooth_ptq.ACT_SCALE,)] = act["scale"]
      flat[lp + (smooth_ptq.ACT_ZERO_POINT,)] = act["zero_point"]
  return kernel
