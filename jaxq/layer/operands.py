"""Quantizing the two operands of a layer's contraction: view specs, learned steps,
observers and the fake-quantized contraction.

On the 2-D views (:mod:`jaxq.layer.views`), for weights ``granularity="channel"`` is one
scale per output feature (all non-contracted kernel axes; ``spec.axis`` must name one of
them, :func:`jaxq.params.check_weight_axis`) and ``"group"`` groups ``group_size``
consecutive elements of the innermost contracted kernel axis, which it must divide: the
semantics of :func:`jaxq.quantize_params` on the same kernel, bit for bit. For
activations, "tensor" is one scale, "channel" one per contracted feature, "group" one per
group of features (shared by all rows), and ``dynamic=True`` ranges per row (token) at
run time.

Where the state lives (Linen variables, NNX attributes) is the adapter's business: the
functions here take readers (callables) for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxq import calibration
from jaxq import quantizer
from jaxq.layer.views import Contraction
from jaxq.params import check_weight_axis
from jaxq.spec import WEIGHT_SCHEMES, QuantSpec, learned_step

__all__ = [
    "weight_view_spec", "act_view_spec", "is_learned", "is_observed",
    "state_names", "act_stat_shape", "observer_view", "weight_observer_qparams",
    "weight_qparams", "fake_quantized_compute", "RNG_STREAM", "ACT_STATS", "WEIGHT_SCALE",
    "WEIGHT_ZERO_POINT", "WEIGHT_ALPHA", "ACT_SCALE", "ACT_ZERO_POINT", "ACT_ALPHA",
    "WEIGHT_NAMES", "ACT_NAMES",
]

#: rng stream (Linen) / ``nnx.Rngs`` stream (NNX) of stochastic-rounding keys.
RNG_STREAM = "jaxq"
#: The activation observer's state (Linen "quant_stats" variable, NNX attribute).
ACT_STATS = "jaxq_act"
WEIGHT_SCALE, WEIGHT_ZERO_POINT, WEIGHT_ALPHA = (
    "jaxq_weight_scale", "jaxq_weight_zero_point", "jaxq_weight_alpha")
ACT_SCALE, ACT_ZERO_POINT, ACT_ALPHA = ("jaxq_act_scale", "jaxq_act_zero_point",
                                        "jaxq_act_alpha")
#: ``(scale, zero_point, alpha)`` names of the learned weight / activation steps.
WEIGHT_NAMES = (WEIGHT_SCALE, WEIGHT_ZERO_POINT, WEIGHT_ALPHA)
ACT_NAMES = (ACT_SCALE, ACT_ZERO_POINT, ACT_ALPHA)
_ONE_SHOT_CALIBRATIONS = ("percentile", "mse")

# --------------------------------------------------------------------------------------
# Specs on the operand views
# --------------------------------------------------------------------------------------


def weight_view_spec(spec: QuantSpec, path: str, kernel_shape: Sequence[int],
                     rhs_contract: Sequence[int]) -> QuantSpec:
  """``spec`` as it applies to the ``(K, N)`` kernel view (checked against the kernel)."""
  if spec.scheme not in WEIGHT_SCHEMES:
    raise ValueError(f"layer '{path}': weight QuantSpec.scheme must be 'uniform' or 'nf4'; "
                     f"got {spec.scheme!r} (log2/ptf are activation schemes)")
  check_weight_axis(spec, path, kernel_shape, rhs_contract)
  if spec.granularity == "group":
    inner = kernel_shape[rhs_contract[-1]]
    if inner % spec.group_size:
      raise ValueError(
          f"layer '{path}': weight group_size={spec.group_size} does not divide the "
          f"kernel's input axis (length {inner}, kernel shape {tuple(kernel_shape)})")
  return spec if spec.granularity == "tensor" else spec.replace(axis=-1)


def act_view_spec(spec: QuantSpec, path: str, k: int) -> QuantSpec:
  """``spec`` as it applies to the ``(M, K)`` activation view (``k`` input features)."""
  if spec.granularity == "group" and spec.axis != -1:
    raise ValueError(f"layer '{path}': an activation 'group' spec groups the input "
                     f"features (axis=-1), shared by all rows (per row: dynamic=True); got "
                     f"axis={spec.axis}")
  if spec.granularity == "group" and k % spec.group_size:
    raise ValueError(f"layer '{path}': activation group_size={spec.group_size} does not "
                     f"divide the number of input features {k}")
  if spec.dynamic:
    if spec.estimator != "ste" or spec.scheme != "uniform":
      raise ValueError(f"layer '{path}': a dynamic activation spec computes its range "
                       "per row at run time; it needs estimator='ste', scheme='uniform'")
    if spec.granularity == "channel":
      raise ValueError(f"layer '{path}': dynamic=True quantizes per row (token); use "
                       "granularity 'tensor' (per row) or 'group' (per row and group)")
    if spec.granularity == "tensor":
      return spec.replace(granularity="channel", axis=0)
    return spec.replace(axis=0)
  if spec.granularity == "channel" and spec.axis != -1:
    raise ValueError(f"layer '{path}': an activation 'channel' spec is per input feature "
                     f"(axis=-1); got axis={spec.axis}")
  return spec if spec.granularity == "tensor" else spec.replace(axis=-1)


# The one learned-step predicate is jaxq.spec.learned_step; this name is the layer's.
is_learned = learned_step


def is_observed(spec: QuantSpec | None) -> bool:
  """Whether an activation ``spec`` keeps its range in an observer
  (:mod:`jaxq.calibration`; "ema", "percentile", "mse" without a learned step)."""
  return (spec is not None and spec.scheme == "uniform" and not spec.dynamic
          and not is_learned(spec, act=True) and spec.calibration != "minmax")


def state_names(spec: QuantSpec, names: tuple[str, str, str]) -> dict[str, str]:
  """``{state key: variable name}`` of a learned quantizer (``names``: scale, zero
  point, alpha), in creation order."""
  scale, zp, alpha = names
  if spec.estimator == "pact":
    return {"alpha": alpha}
  if spec.symmetric:
    return {"scale": scale}
  return {"scale": scale, "zero_point": zp}


def act_stat_shape(spec: QuantSpec, k: int) -> tuple[int, ...]:
  """Shape of an activation quantizer's step / observer range for ``k`` input features."""
  return quantizer.stat_shape((1, k), spec, 1)


# --------------------------------------------------------------------------------------
# Quantizing the operand views
# --------------------------------------------------------------------------------------


def observer_view(v2: jax.Array, spec: QuantSpec, group_axis: int):
  """``(view, axes)`` an observer of the 2-D operand view ``v2`` reduces (no gradient)."""
  view = quantizer.quant_view(lax.stop_gradient(v2), spec, group_axis)
  return view, quantizer.quant_axes(2, spec, group_axis)


def weight_observer_qparams(spec: QuantSpec, w2: jax.Array) -> dict[str, jax.Array]:
  """``{"scale", "zero_point"}`` of a one-shot observer (``spec.calibration``) of the
  ``(K, N)`` kernel view ``w2``."""
  w = w2.astype(jnp.float32)
  st = calibration.observer_init(spec, quantizer.stat_shape(w.shape, spec, 0))
  view, axes = observer_view(w, spec, 0)
  st = calibration.observer_update(st, view, spec, axes)
  scale, zp = calibration.observer_qparams(st, spec)
  return {"scale": scale, "zero_point": zp}


def weight_qparams(spec: QuantSpec, w2: jax.Array,
                   learned: Callable[[], dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """:func:`jaxq.quantizer.fake_quantize` kwargs of the kernel view ``w2 (K, N)``:
  ``learned()`` (the layer's learned step) for LSQ/PACT, a one-shot observer range for
  "percentile" / "mse", and ``{}`` (min-max of ``w2``) otherwise."""
  if is_learned(spec, act=False):
    return learned()
  if spec.calibration in _ONE_SHOT_CALIBRATIONS:
    return weight_observer_qparams(spec, w2)
  return {}


def fake_quantized_compute(op: Contraction, wspec: QuantSpec | None,
                           aspec: QuantSpec | None,
                           weight_kwargs: Callable[[jax.Array], dict[str, jax.Array]],
                           act_kwargs: Callable[[jax.Array], dict[str, jax.Array]],
                           rng: Callable[[], jax.Array | None]) -> jax.Array:
  """``op.compute(Q_a(lhs), Q_w(rhs))``: the operands quantize-dequantized on their views.

  ``wspec`` / ``aspec`` (None: that operand stays in float) are the view specs
  (:func:`weight_view_spec`, :func:`act_view_spec`); the kernel view ``w2 (K, N)`` is
  quantized with ``group_axis=0`` and ``**weight_kwargs(w2)``, the activation view
  ``x2 (M, K)`` with ``group_axis=1`` and ``**act_kwargs(x2)``
  (:func:`jaxq.quantizer.fake_quantize`). ``rng()`` (a key, or None: round to nearest)
  is called once when a spec rounds stochastically; its two halves go to the weight
  and the activation.
  """
  lhs, rhs = op.lhs, op.rhs
  needs_key = any(s is not None and s.rounding == "stochastic" for s in (wspec, aspec))
  key = rng() if needs_key else None
  kw_key, ka_key = (None, None) if key is None else tuple(jax.random.split(key))
  if wspec is not None:
    w2, w_unview = op.rhs_matrix()
    rhs = w_unview(quantizer.fake_quantize(w2, wspec, group_axis=0, key=kw_key,
                                           require_key=False, **weight_kwargs(w2)))
  if aspec is not None:
    x2, x_unview = op.lhs_matrix()
    lhs = x_unview(quantizer.fake_quantize(x2, aspec, group_axis=1, key=ka_key,
                                           require_key=False, **act_kwargs(x2)))
  return op.compute(lhs, rhs)
