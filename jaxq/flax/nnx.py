"""Quantization-aware training for Flax NNX models, without rewriting them.

:func:`quantize_model` returns a copy of an NNX model (``nnx.clone``: new Python objects,
the same immutable arrays) in which every ``nnx.Linear``, ``nnx.LinearGeneral``,
``nnx.Conv`` and ``nnx.Einsum`` whose attribute path (``"/"``-joined, e.g.
``"blocks/0/attn/query"``) a rule matches (``re.fullmatch``, first match wins,
:func:`jaxq.spec.match_rule`) is turned into its quantized subclass (``QuantizedLinear``,
...). The layer object keeps all of its attributes, so ``nnx.state`` has the float
model's paths and shapes, plus only the reserved ``jaxq_*`` variables below; a float
checkpoint restores into it. ``inplace=True`` converts the given model itself instead.

A quantized layer runs the layer's own ``__call__`` (its padding, dtype promotion, bias,
masks) with its contraction op (``dot_general`` / ``conv_general_dilated`` /
``einsum_op``) replaced for the duration of the call by one whose operands are
fake-quantized (:func:`jaxq.quantizer.fake_quantize`): the kernel with ``rule.weight``,
the input activation with ``rule.act``. As in :mod:`jaxq.flax.linen`, quantization works
on 2-D views: the activation as ``(M, K)`` (its contracted axes, for Conv its channels,
last) and the kernel as ``(K, N)``; weight "channel" means one scale per output feature
(``spec.axis`` is ignored), weight "group" groups ``group_size`` consecutive elements of
the innermost contracted kernel axis; activation "tensor" is one scale, "channel" one per
input feature, "group" one per group of features, and ``dynamic=True`` ranges per row.

State (all of it in the layer, under reserved names):

* learned steps, ``nnx.Param`` (so ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains
  them with the weights): ``jaxq_weight_scale`` (+ ``jaxq_weight_zero_point`` for LSQ+)
  or ``jaxq_weight_alpha`` (PACT), initialised from the kernel when the model is
  quantized (:func:`jaxq.params.init_weight_state`: LSQ ``2 mean|w| / sqrt(qmax)``,
  LSQ+ min-max, PACT the max); ``jaxq_act_scale`` (+ ``jaxq_act_zero_point``) or
  ``jaxq_act_alpha``, initialised the same way from the first activation seen in
  training mode (the flag ``jaxq_act_initialized``, a :class:`QuantStats`, records it);
* activation observers (calibration "ema", "percentile", "mse"; :mod:`jaxq.calibration`):
  ``jaxq_act``, a :class:`QuantStats` variable (the NNX analogue of the Linen
  "quant_stats" collection) holding the observer state dict;
* "minmax" activations and weights without a learned step take the range of the current
  tensor and keep no state ("percentile"/"mse" weights: a one-shot observer of the
  current kernel).

Training and evaluation mode follow ``nnx.BatchNorm``: the attribute
``use_running_average`` (set by ``model.train()`` / ``model.eval()`` and ``nnx.view``).
In training mode (the default, ``use_running_average=False``) observers are updated with
the current batch and then read, and learned activation steps are initialised on first
use; in evaluation mode nothing is written: observers are read (a never-updated observer
falls back to the current tensor's min-max range) and uninitialised activation steps use
the first-batch initialisation of the current tensor.

Stochastic rounding (``rounding="stochastic"``) draws keys from the ``"jaxq"`` stream of
an ``nnx.Rngs``: the one passed as ``rngs=``, else the first ``nnx.Rngs`` in the model
that has a ``"jaxq"`` stream; without one it rounds to nearest.

Works with ``nnx.jit``, ``nnx.grad`` / ``nnx.value_and_grad``, ``nnx.Optimizer`` and any
optax transformation (the float master weights and the learned steps are ``nnx.Param``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxq import calibration
from jaxq import numerics
from jaxq import quantizer
from jaxq.params import init_weight_state
from jaxq.spec import QuantSpec, Rule

__all__ = [
    "QuantStats", "quantize_model", "quantized_layers", "LayerConfig", "Contraction",
    "LAYER_TYPES", "RESERVED_NAMES",
    "RNG_STREAM", "QuantizedLinear", "QuantizedLinearGeneral", "QuantizedConv",
    "QuantizedEinsum",
]

RNG_STREAM = "jaxq"
WEIGHT_SCALE, WEIGHT_ZERO_POINT, WEIGHT_ALPHA = (
    "jaxq_weight_scale", "jaxq_weight_zero_point", "jaxq_weight_alpha")
ACT_SCALE, ACT_ZERO_POINT, ACT_ALPHA = ("jaxq_act_scale", "jaxq_act_zero_point",
                                        "jaxq_act_alpha")
ACT_STATS, ACT_INITIALIZED = "jaxq_act", "jaxq_act_initialized"
CONFIG, RNGS = "jaxq_config", "jaxq_rngs"
#: Attribute names jaxq adds to a quantized layer (besides ``use_running_average``).
RESERVED_NAMES = (WEIGHT_SCALE, WEIGHT_ZERO_POINT, WEIGHT_ALPHA, ACT_SCALE, ACT_ZERO_POINT,
                  ACT_ALPHA, ACT_STATS, ACT_INITIALIZED, CONFIG, RNGS)
LAYER_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum)
_WEIGHT_NAMES = (WEIGHT_SCALE, WEIGHT_ZERO_POINT, WEIGHT_ALPHA)
_ACT_NAMES = (ACT_SCALE, ACT_ZERO_POINT, ACT_ALPHA)


class QuantStats(nnx.Variable):
  """Activation-quantizer statistics of a quantized NNX layer (not trained by optax).

  ``jaxq_act`` holds the observer state (``{"lo", "hi", "n"}``, :mod:`jaxq.calibration`),
  ``jaxq_act_initialized`` whether the learned activation step has been initialised.
  Updated in training mode, read in evaluation mode. Select them with
  ``nnx.state(model, QuantStats)``.
  """


@dataclasses.dataclass(frozen=True)
class LayerConfig:
  """Static description of one quantized layer (a hashable attribute of the layer).

  Attributes:
    path: the layer's "/"-joined attribute path in the model it was quantized in.
    rule: the matching rule.
    kind: "dot_general" (Linear, LinearGeneral), "conv" or "einsum".
    weight: the weight spec on the ``(K, N)`` kernel view, or None.
    act: the activation spec on the ``(M, K)`` input view, or None.
  """

  path: str
  rule: Rule
  kind: str
  weight: QuantSpec | None
  act: QuantSpec | None


# ---------------------------------------------------------------------------------------
# One contraction and its 2-D operand views (the layout of jaxq.flax.linen.Contraction)
# ---------------------------------------------------------------------------------------


def _perm_view(x: jax.Array, front: Sequence[int], back: Sequence[int]):
  """``x`` transposed to ``front + back`` and reshaped to ``(prod(front), prod(back))``."""
  perm = tuple(front) + tuple(back)
  xt = x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)
  m = int(np.prod([x.shape[a] for a in front], dtype=np.int64))
  return xt.reshape(m, -1), perm, xt.shape


def _perm_unview(x2: jax.Array, perm, tshape) -> jax.Array:
  xt = x2.reshape(tshape)
  if perm == tuple(range(len(perm))):
    return xt
  return jnp.transpose(xt, np.argsort(perm))


@dataclasses.dataclass
class Contraction:
  """One contraction ``compute(lhs, rhs)`` of a quantized layer call.

  ``lhs`` is the activation (after the layer's dtype promotion and padding), ``rhs`` the
  kernel; ``lhs_contract`` / ``rhs_contract`` are their contracted axes (for conv: the
  input's channel axis / every kernel axis but the last); ``compute`` is the layer's own
  op applied to new operands.
  """

  kind: str
  lhs: jax.Array | None
  rhs: jax.Array
  lhs_contract: tuple[int, ...]
  rhs_contract: tuple[int, ...]
  compute: Callable[[jax.Array, jax.Array], jax.Array] | None

  def lhs_matrix(self):
    """``(x2 f[M, K], unview)``: the activation as rows, and the inverse map."""
    free = [a for a in range(self.lhs.ndim) if a not in self.lhs_contract]
    x2, perm, tshape = _perm_view(self.lhs, free, self.lhs_contract)
    return x2, functools.partial(_perm_unview, perm=perm, tshape=tshape)

  def rhs_matrix(self):
    """``(w2 f[K, N], unview)``: the kernel as contracted rows x output columns."""
    free = [a for a in range(self.rhs.ndim) if a not in self.rhs_contract]
    w2t, perm, tshape = _perm_view(self.rhs, free, self.rhs_contract)
    return w2t.T, lambda w2: _perm_unview(w2.T, perm, tshape)


# ---------------------------------------------------------------------------------------
# Contraction layout of each supported layer
# ---------------------------------------------------------------------------------------


def _kind(layer) -> str:
  if isinstance(layer, (nnx.Linear, nnx.LinearGeneral)):
    return "dot_general"
  if isinstance(layer, nnx.Conv):
    return "conv"
  return "einsum"


def _einsum_axes(einsum_str: str, lhs_ndim: int | None, path: str):
  """``(lhs_contract, rhs_contract, rhs_letters, contracted_letters)`` of an explicit
  two-operand einsum (``lhs_contract`` is None when ``lhs_ndim`` is unknown)."""
  s = einsum_str.replace(" ", "")
  if "->" not in s or s.count(",") != 1:
    raise ValueError(f"layer '{path}': einsum_str must be explicit with exactly two "
                     f"operands; got {einsum_str!r}")
  ins, out_s = s.split("->")
  lhs_s, rhs_s = ins.split(",")
  if "." in rhs_s:
    raise ValueError(f"layer '{path}': the kernel subscripts of {einsum_str!r} may not use "
                     "an ellipsis")
  if "." in lhs_s:
    if not lhs_s.startswith("..."):
      raise ValueError(f"layer '{path}': jaxq supports an ellipsis only at the start of "
                       f"the input subscripts; got {einsum_str!r}")
    letters = lhs_s[3:]
    offset = None if lhs_ndim is None else lhs_ndim - len(letters)
  else:
    letters, offset = lhs_s, 0
  contracted = [c for c in letters if c in rhs_s and c not in out_s]
  if not contracted:
    raise ValueError(f"layer '{path}': {einsum_str!r} contracts no axis")
  lc = None if offset is None else tuple(offset + letters.index(c) for c in contracted)
  rc = tuple(i for i, c in enumerate(rhs_s) if c not in out_s)
  return lc, rc, rhs_s, contracted


def _layout(layer, path: str) -> tuple[tuple[int, ...], int]:
  """``(rhs_contract, K)``: the kernel's contracted axes and the activation's feature count."""
  kernel_shape = tuple(layer.kernel.get_value().shape)
  if isinstance(layer, nnx.LinearGeneral):
    if layer.batch_axis:
      raise ValueError(
          f"jaxq cannot quantize layer '{path}': LinearGeneral with batch_axis is not "
          "supported (exclude it with a Rule(path=..., weight=None, act=None))")
    n_in = len(layer.in_features)
    return tuple(range(n_in)), math.prod(layer.in_features)
  if isinstance(layer, nnx.Linear):
    return (0,), int(layer.in_features)
  if isinstance(layer, nnx.Conv):
    return tuple(range(len(kernel_shape) - 1)), int(layer.in_features)
  if layer.einsum_str is None:
    raise ValueError(f"jaxq cannot quantize layer '{path}': an nnx.Einsum given its "
                     "einsum_str only at call time is not supported; set it in the "
                     "constructor")
  _, rc, rhs_s, contracted = _einsum_axes(layer.einsum_str, None, path)
  k = math.prod(kernel_shape[rhs_s.index(c)] for c in contracted)
  return rc, k


# ---------------------------------------------------------------------------------------
# Specs on the operand views (same conventions as jaxq.flax.linen)
# ---------------------------------------------------------------------------------------


def _weight_view_spec(spec: QuantSpec, path: str, kernel_shape, rhs_contract) -> QuantSpec:
  if spec.scheme != "uniform":
    raise ValueError(f"layer '{path}': weight QuantSpec.scheme must be 'uniform'; got "
                     f"{spec.scheme!r} (log2/ptf are activation schemes)")
  if spec.granularity == "group":
    inner = kernel_shape[rhs_contract[-1]]
    if inner % spec.group_size:
      raise ValueError(
          f"layer '{path}': weight group_size={spec.group_size} does not divide the "
          f"kernel's input axis (length {inner}, kernel shape {tuple(kernel_shape)})")
  return spec if spec.granularity == "tensor" else spec.replace(axis=-1)


def _act_view_spec(spec: QuantSpec, path: str, k: int) -> QuantSpec:
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


def _learned(spec: QuantSpec | None) -> bool:
  return (spec is not None and spec.scheme == "uniform" and not spec.dynamic
          and spec.estimator in ("lsq", "pact"))


def _observed(spec: QuantSpec | None) -> bool:
  return (spec is not None and spec.scheme == "uniform" and not spec.dynamic
          and not _learned(spec) and spec.calibration != "minmax")


def _state_names(spec: QuantSpec, names) -> dict[str, str]:
  """``{state key: attribute name}`` of a learned quantizer."""
  scale, zp, alpha = names
  if spec.estimator == "pact":
    return {"alpha": alpha}
  if spec.symmetric:
    return {"scale": scale}
  return {"scale": scale, "zero_point": zp}


# ---------------------------------------------------------------------------------------
# The quantized call
# ---------------------------------------------------------------------------------------


def _next_key(layer) -> jax.Array | None:
  rngs = getattr(layer, RNGS)
  if rngs is None:
    return None
  return rngs[RNG_STREAM]()


def _weight_kwargs(layer, spec: QuantSpec, w2: jax.Array) -> dict[str, jax.Array]:
  if _learned(spec):
    return {k: getattr(layer, n).get_value()
            for k, n in _state_names(spec, _WEIGHT_NAMES).items()}
  if spec.calibration in ("percentile", "mse"):
    w = lax.stop_gradient(w2.astype(jnp.float32))
    st = calibration.observer_init(spec, quantizer.stat_shape(w.shape, spec, 0))
    st = calibration.observer_update(st, quantizer.quant_view(w, spec, 0), spec,
                                     quantizer.quant_axes(2, spec, 0))
    scale, zp = calibration.observer_qparams(st, spec)
    return {"scale": scale, "zero_point": zp}
  return {}


def _act_kwargs(layer, spec: QuantSpec, x2: jax.Array, training: bool
                ) -> dict[str, jax.Array]:
  if _learned(spec):
    names = _state_names(spec, _ACT_NAMES)
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
  if _observed(spec):
    var = getattr(layer, ACT_STATS)
    state = var.get_value()
    xs = lax.stop_gradient(x2)
    view = quantizer.quant_view(xs, spec, 1)
    axes = quantizer.quant_axes(2, spec, 1)
    if training:
      state = calibration.observer_update(state, view, spec, axes)
      var.set_value(state)
    lo, hi = calibration.observer_range(state, spec)
    cur_lo, cur_hi = numerics.minmax(view, axes)
    seen = state["n"] > 0
    lo = jnp.where(seen, lo, cur_lo.reshape(lo.shape))
    hi = jnp.where(seen, hi, cur_hi.reshape(hi.shape))
    scale, zp = quantizer.qparams_from_range(lo, hi, spec)
    return {"scale": scale, "zero_point": zp}
  return {}


def _quantized_contraction(layer, op: Contraction) -> jax.Array:
  cfg: LayerConfig = getattr(layer, CONFIG)
  lhs, rhs = op.lhs, op.rhs
  needs_key = any(s is not None and s.rounding == "stochastic"
                  for s in (cfg.weight, cfg.act))
  key = _next_key(layer) if needs_key else None
  kw_key, ka_key = (None, None) if key is None else tuple(jax.random.split(key))
  if cfg.weight is not None:
    w2, w_unview = op.rhs_matrix()
    wkw = _weight_kwargs(layer, cfg.weight, w2)
    rhs = w_unview(quantizer.fake_quantize(w2, cfg.weight, group_axis=0, key=kw_key,
                                           require_key=False, **wkw))
  if cfg.act is not None:
    x2, x_unview = op.lhs_matrix()
    akw = _act_kwargs(layer, cfg.act, x2, not layer.use_running_average)
    lhs = x_unview(quantizer.fake_quantize(x2, cfg.act, group_axis=1, key=ka_key,
                                           require_key=False, **akw))
  return op.compute(lhs, rhs)


def _hooks(layer, calls: list) -> dict[str, Callable]:
  """Replacement contraction ops for the duration of one call of ``layer``."""
  cfg: LayerConfig = getattr(layer, CONFIG)

  def run(op: Contraction):
    calls.append(op.kind)
    return _quantized_contraction(layer, op)

  if cfg.kind == "dot_general":
    cls = getattr(layer, "dot_general_cls", None)
    base = cls() if cls is not None else (layer.dot_general or lax.dot_general)

    def qdot(lhs, rhs, dimension_numbers, *args, **kwargs):
      (lc, rc), (lb, rb) = dimension_numbers
      if lb or rb:
        raise ValueError(f"jaxq cannot quantize layer '{cfg.path}': a contraction with "
                         "batch dimensions is not supported")
      lc = tuple(a % lhs.ndim for a in lc)
      rc = tuple(a % rhs.ndim for a in rc)
      return run(Contraction(
          "dot_general", lhs, rhs, lc, rc,
          lambda l, r: base(l, r, dimension_numbers, *args, **kwargs)))

    hooks = {"dot_general": qdot}
    if hasattr(layer, "dot_general_cls"):
      hooks["dot_general_cls"] = None
    return hooks
  if cfg.kind == "conv":
    base = layer.conv_general_dilated

    def qconv(lhs, rhs, *args, **kwargs):
      # NNX's Conv is channels-last for inputs and kernels (..., in, out).
      return run(Contraction("conv", lhs, rhs, (lhs.ndim - 1,), tuple(range(rhs.ndim - 1)),
                             lambda l, r: base(l, r, *args, **kwargs)))

    return {"conv_general_dilated": qconv}
  base = layer.einsum_op

  def qeinsum(einsum_str, lhs, rhs, *args, **kwargs):
    lc, rc, *_ = _einsum_axes(einsum_str, lhs.ndim, cfg.path)
    return run(Contraction("einsum", lhs, rhs, lc, rc,
                           lambda l, r: base(einsum_str, l, r, *args, **kwargs)))

  return {"einsum_op": qeinsum}


def _quantized_call(layer, base_call, args, kwargs):
  calls: list[str] = []
  hooks = _hooks(layer, calls)
  old = {name: layer.__dict__[name] for name in hooks}
  try:
    for name, fn in hooks.items():
      object.__setattr__(layer, name, fn)
    out = base_call(layer, *args, **kwargs)
  finally:
    for name, fn in old.items():
      object.__setattr__(layer, name, fn)
  if not calls:
    cfg: LayerConfig = getattr(layer, CONFIG)
    raise RuntimeError(
        f"layer '{cfg.path}' ({type(layer).__mro__[1].__name__}) did not call its "
        f"contraction op ({', '.join(hooks)}), so jaxq could not quantize it; this flax "
        "version is not supported")
  return out


_QUANTIZED_CLASSES: dict[type, type] = {}


def _quantized_class(base: type) -> type:
  """The quantized subclass of a layer class (one per class, so graphdefs are stable)."""
  cls = _QUANTIZED_CLASSES.get(base)
  if cls is not None:
    return cls
  base_call = base.__call__
  base_set_view = getattr(base, "set_view", None)

  def __call__(self, *args, **kwargs):  # pylint: disable=invalid-name
    return _quantized_call(self, base_call, args, kwargs)

  def set_view(self, use_running_average: bool | None = None, **kwargs):
    """``nnx.view`` hook: ``use_running_average`` selects the activation-stats mode."""
    if use_running_average is not None:
      self.use_running_average = use_running_average
    if base_set_view is not None:
      return base_set_view(self, **kwargs)
    return kwargs

  name = f"Quantized{base.__name__}"
  cls = type(name, (base,), {
      "__call__": __call__,
      "set_view": set_view,
      "__module__": __name__,
      "__qualname__": name,
      "__doc__": (f"A quantized ``{base.__module__}.{base.__qualname__}`` made by "
                  "``jaxq.nnx.quantize_model`` (same attributes, plus jaxq state)."),
  })
  _QUANTIZED_CLASSES[base] = cls
  return cls


QuantizedLinear = _quantized_class(nnx.Linear)
QuantizedLinearGeneral = _quantized_class(nnx.LinearGeneral)
QuantizedConv = _quantized_class(nnx.Conv)
QuantizedEinsum = _quantized_class(nnx.Einsum)


# ---------------------------------------------------------------------------------------
# quantize_model
# ---------------------------------------------------------------------------------------


def _check_rules(rules) -> tuple[Rule, ...]:
  if isinstance(rules, Rule):
    return (rules,)
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise TypeError(f"rules must be a jaxq.Rule or a sequence of them; got {rules!r}")
  rules = tuple(rules)
  for i, r in enumerate(rules):
    if not isinstance(r, Rule):
      raise TypeError(f"rules[{i}] must be a jaxq.Rule; got {type(r).__name__}")
  return rules


def _find_rngs(model) -> nnx.Rngs | None:
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Rngs) and RNG_STREAM in node:
      return node
  return None


def _has_own_kernel(module) -> bool:
  """Whether ``module`` holds a Param of rank >= 2 itself (a layer with weights)."""
  for value in vars(module).values():
    if isinstance(value, nnx.Param) and jnp.ndim(value.get_value()) >= 2:
      return True
  return False


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_kernel_state(kernel: jax.Array, spec: QuantSpec, rhs_contract: tuple[int, ...]):
  """Learned-step initialisation from the ``(K, N)`` view of a kernel (one compilation)."""
  w2, _ = Contraction("init", None, kernel, (), rhs_contract, None).rhs_matrix()
  return init_weight_state(w2, spec, 0)


def _quantize_layer(layer, path: str, rule: Rule, rngs) -> None:
  if any(name in vars(layer) for name in RESERVED_NAMES):
    raise ValueError(f"layer '{path}' is already quantized (or uses a reserved jaxq_* "
                     "attribute name)")
  if rule.act_compress is not None:
    raise ValueError(
        f"rule {rule.path!r} matched layer '{path}' with act_compress="
        f"{rule.act_compress}: activation-compressed training is not supported by "
        "jaxq.nnx.quantize_model; use jaxq.act.compressed_vjp on the function instead")
  kernel = layer.kernel.get_value()
  rhs_contract, k = _layout(layer, path)
  wspec = None if rule.weight is None else _weight_view_spec(rule.weight, path,
                                                             kernel.shape, rhs_contract)
  aspec = None if rule.act is None else _act_view_spec(rule.act, path, k)
  cfg = LayerConfig(path, rule, _kind(layer), wspec, aspec)

  if _learned(wspec):
    state = _init_kernel_state(kernel, wspec, rhs_contract)
    for key, name in _state_names(wspec, _WEIGHT_NAMES).items():
      setattr(layer, name, nnx.Param(state[key]))
  if _learned(aspec):
    # Placeholders, replaced from the first activation seen in training mode.
    shape = quantizer.stat_shape((1, k), aspec, 1)
    for key, name in _state_names(aspec, _ACT_NAMES).items():
      fill = 0.0 if key == "zero_point" else 1.0
      setattr(layer, name, nnx.Param(jnp.full(shape, fill, jnp.float32)))
    setattr(layer, ACT_INITIALIZED, QuantStats(jnp.zeros((), jnp.bool_)))
  if _observed(aspec):
    shape = quantizer.stat_shape((1, k), aspec, 1)
    setattr(layer, ACT_STATS, QuantStats(calibration.observer_init(aspec, shape)))
  setattr(layer, CONFIG, cfg)
  setattr(layer, RNGS, rngs)
  if not hasattr(layer, "use_running_average"):
    layer.use_running_average = False
  object.__setattr__(layer, "__class__", _quantized_class(type(layer)))


def quantize_model(model: nnx.Module, rules: Rule | Sequence[Rule], *,
                   rngs: nnx.Rngs | None = None, inplace: bool = False) -> nnx.Module:
  """Quantizes the layers of an NNX ``model`` that ``rules`` match (see module docstring).

  Args:
    model: any ``flax.nnx.Module``.
    rules: a :class:`~jaxq.Rule` or a sequence of them, matched against each layer's
      "/"-joined attribute path (list entries by index: ``"blocks/0/mlp/fc1"``); the
      first match wins; unmatched layers stay in float.
    rngs: an ``nnx.Rngs`` with a ``"jaxq"`` stream for stochastic rounding (default: the
      first such ``nnx.Rngs`` in the model; none: round to nearest).
    inplace: convert ``model`` itself instead of a copy.

  Returns:
    The quantized model (a copy sharing the float arrays, or ``model`` with
    ``inplace=True``). Its quantized layers start in training mode.

  Raises:
    ValueError: for a rule that matches only layers jaxq cannot quantize (e.g.
      ``nnx.Embed``, ``nnx.ConvTranspose``, a custom module with its own kernel), for a
      matched layer it cannot quantize as configured (LinearGeneral with ``batch_axis``,
      an Einsum without a constructor ``einsum_str``, a group size that does not divide
      the contracted axis, ``act_compress``), or an already quantized layer.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be a flax.nnx.Module; got {type(model).__name__}")
  rules = _check_rules(rules)
  if rngs is not None and (not isinstance(rngs, nnx.Rngs) or RNG_STREAM not in rngs):
    raise ValueError(f"rngs must be an nnx.Rngs with a {RNG_STREAM!r} stream, e.g. "
                     f"nnx.Rngs({RNG_STREAM}=0); got {rngs!r}")
  if not inplace:
    model = nnx.clone(model)
  if rngs is None:
    rngs = _find_rngs(model)

  used: set[int] = set()
  unsupported: dict[int, list[str]] = {}
  todo = []
  for path_t, module in nnx.iter_modules(model):
    path = "/".join(str(p) for p in path_t)
    # First match wins, as jaxq.spec.match_rule; the index tells rules apart.
    index_rule = next(((i, r) for i, r in enumerate(rules) if r.matches(path)), None)
    if index_rule is None:
      continue
    i, rule = index_rule
    if isinstance(module, LAYER_TYPES):
      used.add(i)
      if rule.weight is not None or rule.act is not None or rule.act_compress is not None:
        todo.append((module, path, rule))
    elif _has_own_kernel(module):
      unsupported.setdefault(i, []).append(f"'{path}' ({type(module).__name__})")
  for i, layers in unsupported.items():
    if i not in used:
      raise ValueError(
          f"rule {rules[i].path!r} matches only layers jaxq cannot quantize: "
          f"{', '.join(layers)}; supported layers are nnx.Linear, nnx.LinearGeneral, "
          "nnx.Conv and nnx.Einsum (and their subclasses)")
  for module, path, rule in todo:
    _quantize_layer(module, path, rule, rngs)
  return model


def quantized_layers(model: nnx.Module) -> dict[str, LayerConfig]:
  """``{path: LayerConfig}`` of the quantized layers of ``model`` (paths as now nested)."""
  out = {}
  for path_t, module in nnx.iter_modules(model):
    cfg = getattr(module, CONFIG, None) if isinstance(module, LAYER_TYPES) else None
    if isinstance(cfg, LayerConfig):
      out["/".join(str(p) for p in path_t)] = cfg
  return out
