"""Quantization-aware training for Flax Linen models, without rewriting them.

:func:`quantize_model` wraps an existing Linen model in a :class:`QuantizedModel` whose
parameter tree is the model's own (:func:`flax.linen.share_scope`: the wrapper adds no
scope level), and runs the model under a method interceptor
(:func:`flax.linen.intercept_methods`). For every ``nn.Dense``, ``nn.DenseGeneral``,
``nn.Conv`` and ``nn.Einsum`` whose path inside the ORIGINAL model (``"/"``-joined, e.g.
``"Encoder_0/Dense_1"``) a rule matches (``re.fullmatch``, first match wins), the
interceptor replaces the layer's contraction (its ``dot_general`` / ``conv_general_dilated``
field; Einsum's ``jnp.einsum``) by one whose operands are quantized: the kernel with
``rule.weight`` and the input activation with ``rule.act``. Everything else (the layer's
parameters, bias, dtype promotion, padding) is the layer's own code. Unmatched layers
and a rule set that matches nothing leave the model bitwise unchanged.

Operand views. Quantization works on 2-D views of the two operands of the contraction:
the activation as ``(M, K)`` (its contracted axes last and flattened; for Conv the input
channels) and the kernel as ``(K, N)`` (contracted axes first; ``N`` = every output
feature). Hence, for weights, ``granularity="channel"`` is one scale per output feature
(all non-contracted kernel axes; ``spec.axis`` must name one of them, else ValueError),
``"group"`` groups
``group_size`` consecutive elements of the innermost contracted axis (the input axis of
a Dense kernel, the input-channel axis of a Conv kernel), which it must divide: what
:func:`jaxq.quantize_params` does to the same kernel, bit for bit. For
activations: "tensor" is one scale, "channel" one per contracted feature, "group" one
per group of features (shared by all rows); ``dynamic=True`` computes the range per row
(token) at run time ("tensor" -> per row, "group" -> per row and group).

State, in QAT (mode "qat"):

* activation ``calibration="minmax"`` (and ``dynamic``): range of the current tensor,
  no state, so ``qmodel.apply({"params": p}, x)`` works as for the float model;
* activation "ema" / "percentile" / "mse": an observer (:mod:`jaxq.calibration`) in the
  collection ``"quant_stats"``, variable ``"jaxq_act"`` in the layer's scope; updated
  when the collection is mutable (``apply(..., mutable=["quant_stats"])``), read
  otherwise; ``init`` creates and fills it; reading one that has seen no data raises a
  ValueError naming the layer (under ``jit``, where the count is traced: NaN outputs;
  :mod:`jaxq.layer.observers`);
* weights: range of the current weight (minmax; "percentile"/"mse" give a one-shot
  observer range of the current weight); no state;
* learned steps, in ``"params"`` under reserved names in the layer's own scope:
  ``jaxq_weight_scale`` (+ ``jaxq_weight_zero_point`` for LSQ+) / ``jaxq_weight_alpha``
  (PACT), ``jaxq_act_scale`` (+ ``jaxq_act_zero_point``) / ``jaxq_act_alpha``, initialised
  from the first tensor seen (LSQ: ``2 mean|x| / sqrt(qmax)``; LSQ+: min-max; PACT:
  the max). The model's own parameter paths and shapes are unchanged: a float
  checkpoint loads as it is, and :func:`init_quant_params` adds the missing quantizer
  parameters to it from one batch.

Stochastic rounding (``rounding="stochastic"``) draws its keys from the rng stream
``"jaxq"`` when one is given (``apply(..., rngs={"jaxq": key})``) and rounds to nearest
otherwise. ``Rule(act_compress=bits)`` runs the whole computation of each matched module
(any module) through :func:`jaxq.act.linen.compressed_call` with keys from the same
stream; inside a compressed module, nested ``act_compress`` rules are ignored (the
outermost matched module is compressed) while weight/activation quantization applies.

Embeddings: a matched ``nn.Embed`` (a rule with a weight spec) looks up, and ``attend``s
over, its fake-quantized table; a rule's ``act`` spec applies to attend's query
(:mod:`jaxq.flax.embed_linen`, :mod:`jaxq.layer.embed`).

LoRA (``Rule(lora=jaxq.LoRA(rank, alpha, dropout))``, Contract 8): a matched layer gets
``lora_a`` (random, from the "params" rng) / ``lora_b`` (zeros) in its "params" and
computes ``base(x) + (alpha / rank) dropout(x) A B`` with the base kernel frozen
(:func:`jaxq.layer.qat.lora_qat_contraction`): fake-quantized with the rule's weight spec,
or the QArray of :func:`jaxq.lora.freeze`; dropout from the rng stream "dropout" when
given. Train the adapters with ``optax.multi_transform`` over :func:`jaxq.lora.trainable`.

Integer arithmetic (``int8=``): with 8-bit symmetric signed STE specs for both operands
(weight per-tensor or per-channel; activation per-tensor or dynamic per-row), the
forward matmul of ``nn.Dense`` / ``nn.DenseGeneral`` runs on int8 operands through
:func:`jaxq.kernels.int8_matmul` (int32 accumulation, dequantizing epilogue), equal to the
fake-quant result up to float rounding, inside a ``custom_vjp`` whose backward is the
fake-quant straight-through backward (as AQT and Qwix do). ``int8="all"`` also runs the
two backward matmuls in int8 (the gradient quantized per row / per column to int8, with
stochastic rounding when a "jaxq" rng is given; AQT's dlhs/drhs); ``int8="off"``
simulates everything in float.

Modes and hooks (for PTQ, :mod:`jaxq.flax.ptq`). ``QuantizedModel.mode`` selects the
handler that each matched layer call is given to, from :data:`MODES`:

* ``"qat"``: as above;
* ``"calibrate"``: float forward; the activation observer ``quant_stats/jaxq_act`` of
  every matched layer with a (non-dynamic) activation spec is updated, whatever its
  calibration (a "minmax" spec gets a min-max observer), when "quant_stats" is mutable.

:func:`register_mode` adds a mode. A handler is ``handler(call: LayerCall, op:
Contraction) -> Array``; it is invoked inside the layer's ``__call__`` (so it may create
and read variables in the layer's scope through ``call.module``) and returns the result
of the contraction, typically ``op.compute(new_lhs, new_rhs)`` or a result assembled from
``op.lhs_matrix()`` / ``op.rhs_matrix()`` via ``op.out_from_matrix``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxq.flax import fqvit
from jaxq.flax.linen_layer import (QUANT_STATS, LayerCall, act_kwargs, act_observer,
                                   layer_param, run_layer, weight_kwargs)
from jaxq.flax.paths import module_path
from jaxq.flax.qarray_params import qarray_param_interceptor
from jaxq.layer import lora as lora_layer
from jaxq.layer.int8 import INT8_MODES
from jaxq.layer.operands import ACT_NAMES, ACT_STATS, RNG_STREAM, WEIGHT_NAMES, act_view_spec
from jaxq.layer.qat import lora_qat_contraction, qat_contraction
from jaxq.layer.smooth_ptq import SMOOTH, qat_operands
from jaxq.layer.views import Contraction
from jaxq.params import check_rule_fields, check_rules
from jaxq.qarray import QArray
from jaxq.spec import Rule, changes_contraction, rule_index, warn_unused_rules

__all__ = [
    "QuantizedModel", "quantize_model", "init_quant_params", "register_mode", "MODES",
    "INT8_MODES", "LayerCall", "Contraction", "QUANT_STATS", "RNG_STREAM",
    "RESERVED_NAMES", "layer_paths", "call_path",
]

#: Names jaxq may add to a layer's "params" (learned steps) or "quant_stats" collection.
RESERVED_NAMES = WEIGHT_NAMES + ACT_NAMES + (ACT_STATS,)
LAYER_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)
LORA_LAYERS = "nn.Dense, nn.DenseGeneral, nn.Conv and nn.Einsum"


# --------------------------------------------------------------------------------------
# Mode handlers
# --------------------------------------------------------------------------------------


def _frozen_kernel(module) -> QArray | None:
  """The layer's kernel when it is a QArray (a LoRA base frozen by jaxq.lora.freeze)."""
  if module.has_variable("params", "kernel"):
    kernel = module.get_variable("params", "kernel")
    if isinstance(kernel, QArray):
      return kernel
  return None


def _lora_params(call: LayerCall, op: Contraction):
  """The layer's adapters ``(A, B)`` (``lora_a`` / ``lora_b`` in its "params"), created
  from the "params" rng when "params" is mutable (``init``, ``init_quant_params``)."""
  m = call.module
  (k, r), (_, n) = lora_layer.lora_shapes(op, call.rule.lora)

  @functools.lru_cache(maxsize=None)
  def init():
    if not m.has_rng("params"):
      raise ValueError(f"layer '{call.path}': creating its LoRA adapters needs the "
                       "'params' rng (init, or init_quant_params(..., rngs={'params': key}))")
    return lora_layer.init_lora(m.make_rng("params"), k, n, r,
                                getattr(m, "param_dtype", jnp.float32))

  return (layer_param(m, lora_layer.LORA_A, lambda: init()[0]),
          layer_param(m, lora_layer.LORA_B, lambda: init()[1]))


def qat_handler(call: LayerCall, op: Contraction) -> jax.Array:
  """QAT: quantize-dequantize both operands (or run W8A8 on int8 operands); with
  ``rule.lora``, over the frozen base plus the adapter (:mod:`jaxq.layer.lora`)."""
  wkw = functools.partial(weight_kwargs, call)
  akw = functools.partial(act_kwargs, call)
  rule = call.rule
  if rule.smooth is not None:  # quant(x / s) @ quant(s W), s recorded by jaxq.calibrate
    m = call.module
    s = (m.get_variable(QUANT_STATS, SMOOTH) if m.has_variable(QUANT_STATS, SMOOTH)
         else None)
    op = qat_operands(op, rule, s, call.path)
  if rule.lora is None:
    return qat_contraction(op, call.path, rule.weight, rule.act, wkw, akw, call.rng,
                           call.int8)
  m = call.module
  kernel = _frozen_kernel(m)
  a, b = _lora_params(call, op)
  dropout_key = (m.make_rng(lora_layer.DROPOUT_STREAM)
                 if rule.lora.dropout > 0 and m.has_rng(lora_layer.DROPOUT_STREAM) else None)
  return lora_qat_contraction(op, call.path, rule, op.rhs if kernel is None else kernel,
                              a, b, wkw, akw, call.rng, call.int8, dropout_key)


def calibrate_handler(call: LayerCall, op: Contraction) -> jax.Array:
  """Calibration: float forward; activation observers updated (when mutable)."""
  aspec = call.rule.act
  if aspec is not None and not aspec.dynamic and call.module.is_mutable_collection(
      QUANT_STATS):
    x2, _ = op.lhs_matrix()
    act_observer(call, act_view_spec(aspec, call.path, x2.shape[1]), x2, always_update=True)
  return op.compute(op.lhs, op.rhs)


MODES: dict[str, Callable[[LayerCall, Contraction], jax.Array]] = {
    "qat": qat_handler,
    "calibrate": calibrate_handler,
}


def register_mode(name: str, handler: Callable[[LayerCall, Contraction], jax.Array]) -> None:
  """Adds (or replaces) a mode: ``handler(call, op)`` computes a matched layer's contraction."""
  if not isinstance(name, str) or not callable(handler):
    raise TypeError("register_mode(name: str, handler: callable)")
  MODES[name] = handler


# --------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------


def _own_params(module) -> list:
  """The parameters ``module`` holds itself (not those of its submodules)."""
  own = module.variables.get("params", {})
  return [v for v in own.values() if not isinstance(v, Mapping)]


def _owns_weights(module) -> bool:
  """Whether ``module`` holds a parameter of rank >= 2 itself (not in a submodule)."""
  return any(jnp.ndim(v) >= 2 for v in _own_params(module))


def call_path(root: tuple[str, ...], context) -> str | None:
  """The path that rules match of the module ``__call__`` an interceptor is given
  (relative to ``root``, the wrapper's path); None for other calls, the wrapper itself
  and modules outside it."""
  m = context.module
  # nn.Embed's attend is its second use of the table (jaxq.flax.embed_linen).
  method_ok = context.method_name == "__call__" or (
      context.method_name == "attend" and isinstance(m, nn.Embed))
  if not method_ok or m.scope is None or isinstance(m, QuantizedModel):
    return None
  path_t = module_path(m)
  if path_t[:len(root)] != root:
    return None
  return "/".join(path_t[len(root):])


class _Interceptor:
  """The method interceptor of one :class:`QuantizedModel` call."""

  def __init__(self, root: tuple[str, ...], rules, mode: str, int8: str):
    self.root, self.rules, self.mode, self.int8 = root, rules, mode, int8
    self.compressing: list[str] = []
    #: Indices of the rules that matched a module call (the others are reported unused).
    self.used: set[int] = set()
    #: LoRA rules that adapted a layer / matched modules with parameters they cannot adapt.
    self.adapted: set[int] = set()
    self.unadaptable: dict[int, list[str]] = {}
    self._match = functools.lru_cache(maxsize=None)(lambda p: rule_index(self.rules, p))

  def __call__(self, next_fun, args, kwargs, context):
    path = call_path(self.root, context)
    if path is None:
      return next_fun(*args, **kwargs)
    index = self._match(path)
    if index is None:
      return next_fun(*args, **kwargs)
    self.used.add(index)
    m, rule = context.module, self.rules[index]
    if isinstance(m, nn.Embed) and changes_contraction(rule):
      from jaxq.flax.embed_linen import run_embed  # pylint: disable=import-outside-toplevel
      call = LayerCall(m, path, rule, self.mode, self.int8)
      return run_embed(call, context.method_name, MODES[self.mode], next_fun, args, kwargs)
    if (rule.act_compress is not None and self.mode == "qat" and not self.compressing
        and context.method_name == "__call__"):
      from jaxq.act.linen import compressed_call  # pylint: disable=import-outside-toplevel
      key = m.make_rng(RNG_STREAM) if m.has_rng(RNG_STREAM) else None
      self.compressing.append(path)
      try:
        return compressed_call(m, "__call__", args, kwargs, bits=rule.act_compress, key=key)
      finally:
        self.compressing.pop()
    if isinstance(m, LAYER_TYPES) and changes_contraction(rule):
      if rule.lora is not None:
        self.adapted.add(index)
      call = LayerCall(m, path, rule, self.mode, self.int8)
      return run_layer(call, MODES[self.mode], next_fun, args, kwargs)
    out = next_fun(*args, **kwargs)
    if rule.lora is not None and _owns_weights(m):
      raise ValueError(
          f"rule {rule.path!r} gives layer '{path}' ({type(m).__name__}) a LoRA adapter; "
          f"jaxq adapts {LORA_LAYERS} only")
    if rule.lora is not None and _own_params(m):
      self.unadaptable.setdefault(index, []).append(f"'{path}' ({type(m).__name__})")
    return out


class QuantizedModel(nn.Module):
  """``model`` with the layers that ``rules`` match quantized; see the module docstring.

  Attributes:
    model: the wrapped Linen model (its parameter tree is this module's).
    rules: the rules, first match wins.
    mode: a key of :data:`MODES` ("qat", "calibrate", or one added by
      :func:`register_mode`).
    int8: "forward" (default): W8A8 Dense/DenseGeneral forward matmuls on int8 operands;
      "all": backward matmuls in int8 too; "off": fake quantization only.
  """

  model: nn.Module
  rules: tuple[Rule, ...] = ()
  mode: str = "qat"
  int8: str = "forward"

  def setup(self):
    nn.share_scope(self, self.model)

  def _interceptor(self) -> _Interceptor:
    if self.mode not in MODES:
      raise ValueError(f"QuantizedModel.mode must be one of {sorted(MODES)}; got "
                       f"{self.mode!r}")
    if self.int8 not in INT8_MODES:
      raise ValueError(f"QuantizedModel.int8 must be one of {INT8_MODES}; got {self.int8!r}")
    return _Interceptor(module_path(self), check_rules(self.rules), self.mode, self.int8)

  @contextlib.contextmanager
  def _quantizing(self):
    """The layer interceptor, inside FQ-ViT's LayerNorm / attention interceptor."""
    root = module_path(self)
    fq = fqvit.interceptor(self.rules, self.mode, root=root)
    qparams = qarray_param_interceptor(root, self.rules, LAYER_TYPES + (nn.Embed,),
                                       QuantizedModel)
    icpt = self._interceptor()
    with nn.intercept_methods(qparams), nn.intercept_methods(fq), nn.intercept_methods(icpt):
      yield icpt

  def __call__(self, *args, **kwargs):
    with self._quantizing() as icpt:
      out = self.model(*args, **kwargs)
    # Every trace runs this: warned from one place, each distinct message shows once.
    warn_unused_rules(self.rules, icpt.used, type(self.model).__name__, stacklevel=0)
    lora_layer.check_lora_matches(self.rules, icpt.adapted, icpt.unadaptable, LORA_LAYERS)
    return out

  def call_method(self, method: str, *args, **kwargs):
    """Calls another method of the wrapped model under quantization:
    ``qmodel.apply(variables, "encode", x, method="call_method")``."""
    with self._quantizing():
      return getattr(self.model, method)(*args, **kwargs)


def quantize_model(model: nn.Module, rules: Rule | Sequence[Rule], *, int8: str = "forward",
                   mode: str = "qat") -> QuantizedModel:
  """Wraps a Linen ``model`` for quantization-aware training with ``rules``.

  Returns a :class:`QuantizedModel`: ``qmodel.init(key, *args)`` /
  ``qmodel.apply(variables, *args, **kwargs)`` take the model's own arguments; its
  "params" are the model's (plus reserved ``jaxq_*`` entries for learned steps).
  """
  if not isinstance(model, nn.Module):
    raise TypeError(f"model must be a flax.linen.Module; got {type(model).__name__}")
  if mode not in MODES:
    raise ValueError(f"mode must be one of {sorted(MODES)}; got {mode!r}")
  if int8 not in INT8_MODES:
    raise ValueError(f"int8 must be one of {INT8_MODES}; got {int8!r}")
  rules = check_rules(rules)
  check_rule_fields(rules, "jaxq.quantize_model", lora=True, smooth=True, gptq=True)
  return QuantizedModel(model, rules, mode=mode, int8=int8)


def init_quant_params(qmodel: QuantizedModel, variables: dict, *args, **kwargs) -> dict:
  """``variables`` (e.g. a float checkpoint) plus the quantizer state they lack.

  Runs ``qmodel`` once on ``args`` with "params" and "quant_stats" mutable: existing
  entries are kept as they are, missing ``jaxq_*`` parameters are initialised from this
  batch, activation observers are created (and fed this batch). Keyword arguments go to
  the model (e.g. ``train=False``); ``rngs=`` is passed to ``apply``.
  """
  rngs = kwargs.pop("rngs", None)
  variables = dict(variables)
  _, new = qmodel.apply(variables, *args, rngs=rngs, mutable=["params", QUANT_STATS],
                        **kwargs)
  variables.update(jax.tree_util.tree_map(lambda x: x, dict(new)))
  return variables


def layer_paths(model: nn.Module, *args, **kwargs) -> list[str]:
  """The "/"-joined paths of the Dense/DenseGeneral/Conv/Einsum layers ``model`` calls,
  in call order (what rules are matched against), found by an abstract ``init``."""
  found: list[str] = []

  def record(next_fun, a, kw, context):
    m = context.module
    if context.method_name == "__call__" and isinstance(m, LAYER_TYPES):
      p = "/".join(module_path(m))
      if p not in found:
        found.append(p)
    return next_fun(*a, **kw)

  def run():
    with nn.intercept_methods(record):
      return model.init(jax.random.key(0), *args, **kwargs)

  jax.eval_shape(run)
  return found

