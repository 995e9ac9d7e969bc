"""A matched Linen layer call: its contraction routed to a mode handler, and the
quantizer state it keeps in Linen variables (the Linen side of :mod:`jaxq.layer`).

:func:`run_layer` runs the layer's own ``__call__`` with its contraction op
(``dot_general`` / ``conv_general_dilated``; ``nn.Einsum``'s einsum) replaced by one that
hands the :class:`~jaxq.layer.views.Contraction` to a handler. The readers
:func:`weight_kwargs` / :func:`act_kwargs` give :func:`jaxq.layer.qat.qat_contraction`
an operand view's fake-quant kwargs from the layer's learned steps ("params") or
activation observer ("quant_stats").
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import module as nn_module
from jax import lax

from jaxq import calibration
from jaxq.flax.paths import module_path
from jaxq.layer.observers import observed_qparams
from jaxq.layer.operands import (ACT_NAMES, ACT_STATS, RNG_STREAM, WEIGHT_NAMES,
                                 act_stat_shape, is_learned, is_observed, observer_view,
                                 state_names, weight_qparams)
from jaxq.layer.views import (Contraction, conv_hook, dot_general_hook, einsum_axes,
                              patched, resolve_op)
from jaxq.params import init_weight_state
from jaxq.spec import QuantSpec, Rule

__all__ = ["LayerCall", "run_layer", "layer_param", "weight_kwargs", "act_observer",
           "act_kwargs", "QUANT_STATS"]

QUANT_STATS = "quant_stats"


# --------------------------------------------------------------------------------------
# The contraction of one layer call (jaxq.layer.views.Contraction)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """A matched layer call as handed to a mode handler."""

  module: nn.Module
  path: str
  rule: Rule
  mode: str
  int8: str

  def rng(self) -> jax.Array | None:
    """A fresh key from the "jaxq" stream, or None when the stream is not given."""
    if self.module.has_rng(RNG_STREAM):
      return self.module.make_rng(RNG_STREAM)
    return None


def _run_dot_general(call: LayerCall, handler, next_fun, args, kwargs):
  m = call.module
  base = resolve_op(m.dot_general_cls, m.dot_general, lax.dot_general)
  qdot = dot_general_hook(base, call.path, functools.partial(handler, call))
  with patched(m, dot_general=qdot, dot_general_cls=None):
    return next_fun(*args, **kwargs)


def _run_conv(call: LayerCall, handler, next_fun, args, kwargs):
  m = call.module
  base = resolve_op(m.conv_general_dilated_cls, m.conv_general_dilated,
                    lax.conv_general_dilated)
  qconv = conv_hook(base, functools.partial(handler, call))
  with patched(m, conv_general_dilated=qconv, conv_general_dilated_cls=None):
    return next_fun(*args, **kwargs)


def _run_einsum(call: LayerCall, handler, inputs, einsum_str=None):
  """Flax's ``nn.Einsum.__call__`` with the einsum handed to ``handler``."""
  m = call.module
  einsum_str = nn_module.merge_param("einsum_str", m.einsum_str, einsum_str)
  einsum_str = einsum_str.replace(" ", "")
  lc, rc, _ = einsum_axes(einsum_str, call.path, inputs.ndim)
  kernel = m.param("kernel", m.kernel_init, m.shape, m.param_dtype)
  if m.use_bias:
    bias_shape, broadcasted_bias_shape = m._get_bias_shape(einsum_str, inputs, kernel)  # pylint: disable=protected-access
    bias = m.param("bias", m.bias_init, bias_shape, m.param_dtype)
  else:
    bias = None
  inputs, kernel, bias = m.promote_dtype(inputs, kernel, bias, dtype=m.dtype)

  def compute(l, r):
    return jnp.einsum(einsum_str, l, r, precision=m.precision,
                      preferred_element_type=m.preferred_element_type)

  y = handler(call, Contraction("einsum", inputs, kernel, lc, rc, compute))
  if bias is not None:
    y += jnp.reshape(bias, broadcasted_bias_shape)
  return y


def run_layer(call: LayerCall, handler, next_fun, args, kwargs):
  if isinstance(call.module, (nn.Dense, nn.DenseGeneral)):
    return _run_dot_general(call, handler, next_fun, args, kwargs)
  if isinstance(call.module, nn.Conv):
    return _run_conv(call, handler, next_fun, args, kwargs)
  return _run_einsum(call, handler, *args, **kwargs)


# --------------------------------------------------------------------------------------
# Quantizers of the two operands (views and specs: jaxq.layer.operands)
# --------------------------------------------------------------------------------------


def layer_param(module, name, init_fn):
  """A jaxq parameter in the layer's "params": read, or created when "params" is mutable."""
  if not module.has_variable("params", name) and not module.is_mutable_collection("params"):
    raise ValueError(
        f"layer '{'/'.join(module_path(module))}' needs the quantizer parameter '{name}', "
        "which the given params lack (a float checkpoint?): add it with "
        "jaxq.flax.init_quant_params(qmodel, variables, *example_args)")
  # get / put rather than `variable`: a setup-style layer (nn.Embed) reads its jaxq
  # state in a method that is not @compact, where `variable` may not create it.
  if not module.has_variable("params", name):
    module.put_variable("params", name, init_fn())
  return module.get_variable("params", name)


def _learned_kwargs(module, spec, v, group_axis, names) -> dict[str, jax.Array]:
  """fake_quantize kwargs of a learned step (LSQ / LSQ+ / PACT), created from ``v``."""
  init = functools.lru_cache(maxsize=None)(lambda: init_weight_state(v, spec, group_axis))
  return {key: layer_param(module, name, lambda key=key: init()[key])
          for key, name in state_names(spec, names).items()}


def weight_kwargs(call: LayerCall, spec: QuantSpec, w2: jax.Array):
  """fake_quantize kwargs for the kernel view ``w2 (K, N)`` ({} -> min-max of w2)."""
  return weight_qparams(
      spec, w2, lambda: _learned_kwargs(call.module, spec, w2, 0, WEIGHT_NAMES))


def act_observer(call: LayerCall, spec: QuantSpec, x2: jax.Array, always_update: bool):
  """Reads (and, when "quant_stats" is mutable, updates) the layer's activation observer."""
  m = call.module
  mutable = m.is_mutable_collection(QUANT_STATS)
  if not mutable and not m.has_variable(QUANT_STATS, ACT_STATS):
    raise ValueError(
        f"layer '{call.path}': activation calibration={spec.calibration!r} keeps its "
        f"range in the '{QUANT_STATS}' collection, which the given variables lack: use "
        f"variables from qmodel.init(...) or apply(..., mutable=['{QUANT_STATS}'])")
  if m.has_variable(QUANT_STATS, ACT_STATS):
    state = m.get_variable(QUANT_STATS, ACT_STATS)
  else:
    state = calibration.observer_init(spec, act_stat_shape(spec, x2.shape[1]))
  if mutable or always_update:
    view, axes = observer_view(x2, spec, 1)
    state = calibration.observer_update(state, view, spec, axes)
    m.put_variable(QUANT_STATS, ACT_STATS, state)
  return state


def act_kwargs(call: LayerCall, spec: QuantSpec, x2: jax.Array):
  """fake_quantize kwargs for the activation view ``x2 (M, K)`` ({} -> range of x2)."""
  if is_learned(spec, act=True):
    return _learned_kwargs(call.module, spec, x2, 1, ACT_NAMES)
  if not is_observed(spec):
    return {}
  st = act_observer(call, spec, x2, always_update=False)
  if call.module.is_mutable_collection(QUANT_STATS):  # just updated
    scale, zp = calibration.observer_qparams(st, spec)
  else:  # read: refused when never updated (jaxq.layer.observers)
    scale, zp = observed_qparams(st, spec, call.path)
  return {"scale": scale, "zero_point": zp}
