"""The per-layer steps of ``Rule.smooth`` and ``QuantSpec(rounding="gptq")`` through
calibrate, QAT, convert and serving (Contract 7), Flax-free: the Linen and NNX adapters
call these and only say where the state lives.

Life of a layer whose rule needs calibration statistics (:func:`calibration_needs`):

1. ``calibrate`` keeps a :class:`~jaxq.layer.calib.LayerCalibration` for it (variable
   :data:`CALIB`: Linen ``quant_stats/jaxq_calib``, NNX a ``QuantStats`` attribute),
   created by :func:`initial_calibration` and updated with the layer's ``(M, K)`` input
   view in the same jitted pass as the activation observers. When the pass is done,
   :func:`record_smoothing` chooses the layer's scaling ``s: f32[K]``
   (:func:`jaxq.layer.smooth.choose_smoothing`: SmoothQuant's alpha, or "auto" on
   held-back calibration tokens, identity kept unless better) from the statistics and
   the kernel as it is now, and stores it as :data:`SMOOTH` (``jaxq_smooth``).
2. QAT of a smoothed layer (:func:`qat_operands`) computes ``quant(x / s) @ quant(s W)``
   with that recorded ``s``, constant during training (the weight gradient flows through
   ``s W``); a smoothed layer run in QAT before ``calibrate`` recorded its ``s`` raises a
   ValueError naming it: there is no silent identity.
3. ``convert`` (:func:`convert_kernel`) rounds the smoothed kernel ``s W``: GPTQ from the
   calibration Hessian of ``x / s`` (``H / (s s^T)``) for a "gptq" weight spec, else
   returned in float for the usual round-to-nearest conversion. The static activation
   range of ``x / s`` is computed exactly from the per-channel range
   (:func:`act_qparams`). ``s`` is stored next to the kernel and the serving
   contraction divides the input by it in the pass that quantizes it
   (:func:`jaxq.layer.serve.quantized_contraction`).

Because ``s`` is chosen once, at calibration, QAT, serving and the PTQ simulation all
use the same one. GPTQ's rounding runs on the host (float64 Cholesky of the Hessian), so
it happens at ``convert``, or before the PTQ simulation (a traced forward), which takes
the rounded kernel as :data:`GPTQ_KERNEL` (:func:`check_simulable`; :mod:`jaxq.analysis`
rounds it per candidate width). Stacked layers (``nn.scan`` / ``nnx.vmap``) are smoothed
and rounded one layer of the stack at a time.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import gptq
from jaxq.layer.calib import (DEFAULT_RESERVOIR, LayerCalibration, calibration_init,
                              calibration_needs)
from jaxq.layer.operands import ACT_SCALE, ACT_ZERO_POINT
from jaxq.layer.smooth import (choose_smoothing, gptq_kernel, smooth_kernel,
                               smoothed_act_qparams, smoothed_contraction)
from jaxq.layer.views import Contraction, kernel_matrix
from jaxq.qarray import QArray
from jaxq.spec import QuantSpec, Rule

__all__ = ["CALIB", "SMOOTH", "GPTQ_KERNEL", "ACT_SCALE", "ACT_ZERO_POINT", "calibration_needs",
           "initial_calibration", "record_smoothing", "qat_operands", "convert_kernel",
           "act_qparams", "saw_finite", "check_calibrated", "check_simulable", "is_gptq",
           "missing_message"]

#: Variable of a layer's calibration state (:class:`~jaxq.layer.calib.LayerCalibration`).
CALIB = "jaxq_calib"
#: Variable of a layer's smoothing scale ``s: f32[K]`` (stacked like the kernel).
SMOOTH = "jaxq_smooth"
#: Variable of a GPTQ layer's rounded kernel (QArray) for the PTQ simulation.
GPTQ_KERNEL = "jaxq_gptq_kernel"


def is_gptq(rule: Rule) -> bool:
  return rule.weight is not None and rule.weight.rounding == "gptq"


def initial_calibration(rule: Rule, in_features: int, lead: tuple[int, ...] = (), *,
                        reservoir: int = DEFAULT_RESERVOIR) -> LayerCalibration:
  """The empty calibration state of a layer (of every layer of a stack of shape
  ``lead``)."""
  state = calibration_init(rule, in_features, reservoir=reservoir)
  return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, lead + a.shape), state)


def _stack_indices(lead: tuple[int, ...]):
  return itertools.product(*(range(n) for n in lead))


def _restack(values: list, lead: tuple[int, ...]):
  """A pytree whose leaves stack ``values`` (one per stack index, row-major) to
  ``lead + leaf shape``; a single layer's value when ``lead == ()``."""
  if not lead:
    return values[0]
  return jax.tree_util.tree_map(
      lambda *a: jnp.stack(a).reshape(lead + jnp.shape(a[0])), *values)


def _layer_of(tree, idx):
  return jax.tree_util.tree_map(lambda a: a[idx], tree)


def missing_message(path: str, rule: Rule, what: str) -> str:
  need = []
  if rule.smooth is not None:
    need.append(f"Rule.smooth={rule.smooth!r}")
  if is_gptq(rule):
    need.append("QuantSpec(rounding='gptq')")
  return (f"layer '{path}': {' and '.join(need)} needs {what}, which calibrate never "
          "recorded for it (calibrated with other rules, or the batches never reached "
          "the layer): run calibrate with this rule on batches that reach the layer")


def saw_finite(state: LayerCalibration) -> bool:
  """Whether the calibration ``state`` of a layer (of every layer of its stack) holds
  data: a finite input row for the GPTQ Hessian (which skips the others), else a finite
  input value (the smoothing statistics count NaN / Inf rows as tokens)."""
  if state.hessian is not None:
    return bool(np.all(np.asarray(state.hessian.count) > 0))
  seen = np.asarray(state.stats.lo) <= np.asarray(state.stats.hi)
  return bool(np.all(np.any(seen, axis=-1)))


def check_calibrated(rule: Rule, state, s, path: str) -> None:
  """ValueError naming ``path`` when a rule that needs them lacks calibration
  statistics (``state``) or a recorded smoothing scale (``s``)."""
  if state is None:
    raise ValueError(missing_message(path, rule, f"calibration statistics ({CALIB})"))
  if rule.smooth is not None and s is None:
    raise ValueError(missing_message(path, rule, f"a smoothing scale ({SMOOTH})"))
  if not saw_finite(state):
    raise ValueError(f"layer '{path}': calibration saw no finite token of this layer "
                     "(every batch was NaN/Inf there, in some layer of its stack)")


def record_smoothing(kernel: jax.Array, contract, rule: Rule, state: LayerCalibration,
                     stack: int = 0, path: str = "") -> jax.Array | None:
  """The scaling ``s`` of each layer of a stack (``stack`` leading kernel axes) from its
  calibration ``state`` and kernel (host; None when ``rule.smooth`` is None)."""
  if rule.smooth is None:
    return None
  kernel = jnp.asarray(kernel)
  lead = tuple(kernel.shape[:stack])
  scales = []
  for idx in _stack_indices(lead):
    w2, _ = kernel_matrix(kernel[idx], tuple(contract))
    scales.append(choose_smoothing(w2, rule, _layer_of(state, idx), path).scale)
  return _restack(scales, lead)


def qat_operands(op: Contraction, rule: Rule, s: jax.Array | None, path: str
                 ) -> Contraction:
  """The operands QAT quantizes: ``(x / s, s W)`` for a smoothed rule, ``op`` itself
  otherwise. ``s`` is the scale ``calibrate`` recorded (None: never recorded)."""
  if rule.smooth is None:
    return op
  if rule.lora is not None:
    raise ValueError(f"layer '{path}': Rule.smooth with Rule.lora is not supported (the "
                     "adapter would read the unsmoothed input); use one or the other")
  if s is None:
    raise ValueError(
        f"layer '{path}': Rule.smooth={rule.smooth!r} trains with the scaling s that "
        f"jaxq.calibrate (jaxq.nnx.calibrate) records ('{SMOOTH}'), and none is recorded "
        "for this layer: calibrate the quantized model on a few batches before training "
        "(create its variables with the float model's init)")
  return smoothed_contraction(op, s, path)


def convert_kernel(kernel: jax.Array, contract, rule: Rule, state: LayerCalibration,
                   s: jax.Array | None, stack: int = 0, *,
                   damping: float = gptq.DEFAULT_DAMPING, path: str = ""
                   ) -> jax.Array | QArray:
  """The kernel ``convert`` stores for a layer that :func:`calibration_needs`: the
  GPTQ QArray of ``s W`` (stacked, one layer of the stack at a time) for a "gptq"
  weight spec, else the smoothed float kernel ``s W`` (``kernel`` when ``s`` is None)
  for the adapter's round-to-nearest conversion."""
  kernel = jnp.asarray(kernel)
  lead = tuple(kernel.shape[:stack])
  out = []
  for idx in _stack_indices(lead):
    s_i = None if s is None else jnp.asarray(s)[idx]
    k = smooth_kernel(kernel[idx], contract, s_i, path)
    if is_gptq(rule):
      k = gptq_kernel(k, contract, rule.weight, _layer_of(state, idx), s_i,
                      damping=damping, path=path)
    out.append(k)
  return _restack(out, lead)


def act_qparams(state: LayerCalibration, s: jax.Array, act: QuantSpec, stack: int = 0,
                path: str = "") -> dict:
  """Static ``{"scale", "zero_point"}`` of the smoothed input ``x / s`` of each layer of
  a stack, exact from the per-channel calibration range (jit- and vmap-able)."""
  fn = lambda st, sc: smoothed_act_qparams(st, sc, act, path)  # noqa: E731
  for _ in range(stack):
    fn = jax.vmap(fn)
  return fn(state, s)


def check_simulable(rule: Rule, path: str, rounded: QArray | None = None) -> None:
  """The PTQ simulation computes in a trace; GPTQ rounds on the host, so a GPTQ layer is
  simulated with the QArray ``rounded`` that :func:`convert_kernel` gave it beforehand
  (:data:`GPTQ_KERNEL`, set by :mod:`jaxq.analysis`), and raises without one."""
  if is_gptq(rule) and rounded is None:
    raise ValueError(
        f"layer '{path}': QuantSpec(rounding='gptq') rounds the kernel on the host "
        "(float64 Cholesky of its calibration Hessian), which the traced PTQ simulation "
        f"cannot run: it simulates the kernel stored as '{GPTQ_KERNEL}' by jaxq.analysis "
        "(sensitivity rounds it before simulating); else simulate with "
        "rounding='nearest', or measure the converted model")
