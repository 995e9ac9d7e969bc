"""Where a quantized NNX layer keeps its quantizer state, and how it is read and written.

The state is attributes of the layer (reserved names, :data:`jaxq.flax.nnx.RESERVED_NAMES`):

* learned steps, ``nnx.Param`` (``jaxq_weight_scale``, ``jaxq_act_alpha``, ...,
  :mod:`jaxq.layer.operands`), trained by ``nnx.Optimizer(model, tx, wrt=nnx.Param)``;
  an activation step is initialised from the first activation seen in training mode
  (the flag ``jaxq_act_initialized``, a :class:`QuantStats`, records it);
* the activation observer ``jaxq_act``, a :class:`QuantStats` (the NNX analogue of the
  Linen "quant_stats" collection), updated in training mode and read in evaluation mode;
* ``jaxq_rngs``: the ``nnx.Rngs`` with a "jaxq" stream that stochastic rounding draws
  from (:func:`next_key`), or None;
* ``jaxq_act_unobserved``, a static flag: True when the observer was seen never updated
  at the moment the layer entered evaluation mode (``model.eval()``, ``nnx.view``, or
  setting ``use_running_average``), where its count is concrete. It lets a read under
  ``nnx.jit``, where the count is traced, raise the never-updated ValueError
  (:mod:`jaxq.layer.observers`).

The readers below give :func:`jaxq.layer.qat.qat_contraction` the fake-quant kwargs of
an operand view from that state.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxq import calibration
from jaxq.layer.observers import never_observed, observed_qparams
from jaxq.layer.operands import (ACT_NAMES, ACT_STATS, RNG_STREAM, WEIGHT_NAMES,
                                 is_learned, is_observed, observer_view, state_names,
                                 weight_qparams)
from jaxq.params import init_weight_state
from jaxq.spec import QuantSpec

__all__ = ["QuantStats", "ACT_INITIALIZED", "ACT_UNOBSERVED", "RNGS", "weight_kwargs",
           "act_kwargs", "note_mode", "next_key", "mode_methods"]

ACT_INITIALIZED = "jaxq_act_initialized"
#: The ``nnx.Rngs`` (with a "jaxq" stream, or None) a jaxq module draws its keys from.
RNGS = "jaxq_rngs"
ACT_UNOBSERVED = "jaxq_act_unobserved"
_EVAL_HINT = (" (in evaluation mode since model.eval(); if its statistics were restored "
              "or updated since, call model.eval() again)")


class QuantStats(nnx.Variable):
  """Activation-quantizer statistics of a quantized NNX layer (not trained by optax).

  ``jaxq_act`` holds the observer state (``{"lo", "hi", "n"}``, :mod:`jaxq.calibration`),
  ``jaxq_act_initialized`` whether the learned activation step has been initialised.
  Updated in training mode, read in evaluation mode. Select them with
  ``nnx.state(model, QuantStats)``.
  """


def weight_kwargs(layer, spec: QuantSpec, w2):
  """fake_quantize kwargs of the kernel view ``w2 (K, N)`` (learned step, one-shot
  observer, or ``{}``: min-max of ``w2``)."""
  return weight_qparams(spec, w2, lambda: {
      k: getattr(layer, n).get_value() for k, n in state_names(spec, WEIGHT_NAMES).items()})


def act_kwargs(layer, path: str, spec: QuantSpec, x2, training: bool):
  """fake_quantize kwargs of the activation view ``x2 (M, K)``: in training mode the
  learned step is initialised on first use and the observer updated, then read."""
  if is_learned(spec, act=True):
    names = state_names(spec, ACT_NAMES)
    init = init_weight_state(x2, spec, 1)
    flag = getattr(layer, ACT_INITIALIZED)
    ready = flag.get_value()
    values = {k: jnp.where(ready, getattr(layer, n).get_value(), init[k])
              for k, n in names.items()}
    if training:
      for k, n in names.items():
        getattr(layer, n).set_value(values[k])
      flag.set_value(jnp.ones_like(ready))
    return values
  if is_observed(spec):
    var = getattr(layer, ACT_STATS)
    state = var.get_value()
    if training:
      view, axes = observer_view(x2, spec, 1)
      state = calibration.observer_update(state, view, spec, axes)
      var.set_value(state)
      scale, zp = calibration.observer_qparams(state, spec)
    else:
      scale, zp = observed_qparams(state, spec, path,
                                   known_unobserved=getattr(layer, ACT_UNOBSERVED),
                                   hint=_EVAL_HINT)
    return {"scale": scale, "zero_point": zp}
  return {}


def note_mode(layer, use_running_average) -> None:
  """Records, as the layer's mode changes, whether its observer is known unobserved:
  entering evaluation mode with a concrete never-updated observer sets the flag;
  training mode (where the observer may be updated under a trace) clears it."""
  var = vars(layer).get(ACT_STATS)
  if var is None or ACT_UNOBSERVED not in vars(layer):
    return
  unobserved = bool(use_running_average) and never_observed(var.get_value()) is True
  # A static attribute of the layer (graphdef), so that nnx.jit traces see it.
  setattr(layer, ACT_UNOBSERVED, unobserved)


def next_key(module):
  """A fresh key from the "jaxq" stream of the module's ``nnx.Rngs``, or None."""
  rngs = getattr(module, RNGS)
  return None if rngs is None else rngs[RNG_STREAM]()


def mode_methods(base: type) -> dict:
  """``set_view`` and ``__setattr__`` for a jaxq subclass of ``base``: ``nnx.view(...,
  use_running_average=...)`` selects the layer's mode, and every change of
  ``use_running_average`` (``model.train()`` / ``model.eval()``) goes through
  :func:`note_mode`."""
  base_set_view = getattr(base, "set_view", None)

  def set_view(self, use_running_average: bool | None = None, **kwargs):
    """``nnx.view`` hook: ``use_running_average`` selects the activation-stats mode."""
    if use_running_average is not None:
      self.use_running_average = use_running_average
    if base_set_view is not None:
      return base_set_view(self, **kwargs)
    return kwargs

  def __setattr__(self, name, value):  # pylint: disable=invalid-name
    base.__setattr__(self, name, value)
    if name == "use_running_average":
      note_mode(self, value)

  return {"set_view": set_view, "__setattr__": __setattr__}
