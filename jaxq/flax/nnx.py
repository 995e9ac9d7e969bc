"""Quantization-aware training for Flax NNX models, without rewriting them.

:func:`quantize_model` returns a copy of an NNX model (``nnx.clone``: new Python objects,
the same immutable arrays) in which the modules whose attribute path (``"/"``-joined,
e.g. ``"blocks/0/attn/query"``) a rule matches (``re.fullmatch``, first match wins,
:func:`jaxq.spec.match_rule`) are turned into subclasses of their own class; each keeps
all of its attributes, so ``nnx.state`` has the float model's paths and shapes plus only
reserved ``jaxq_*`` variables, and a float checkpoint restores into it.
``inplace=True`` converts the given model itself instead. What a rule does to a module:

* ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.Einsum`` with ``weight`` /
  ``act`` specs (``QuantizedLinear``, ...): the layer's own ``__call__`` (padding, dtype
  promotion, bias, masks) runs with its contraction op (``dot_general`` /
  ``conv_general_dilated`` / ``einsum_op``) handed to the mode handler of the layer's
  ``jaxq_mode`` (:data:`MODES`; "qat": :func:`jaxq.layer.qat.qat_contraction`, the one
  implementation the Linen adapter calls too): the kernel quantized with
  ``rule.weight``, the input activation with ``rule.act``, on the 2-D operand views of
  :mod:`jaxq.layer.views` (as :mod:`jaxq.flax.linen`). Its quantizer state (learned
  steps as ``nnx.Param``, observers as :class:`QuantStats`) is described in
  :mod:`jaxq.flax.nnx_state`.
* ``nnx.Embed`` with a ``weight`` spec: its table fake-quantized for the lookup and
  ``attend`` (the ``act`` spec applies to attend's query; :mod:`jaxq.flax.nnx_embed`).
* ``nnx.LayerNorm`` with ``act.scheme="ptf"`` and ``nnx.MultiHeadAttention`` with
  ``act.scheme="log2"``: FQ-ViT's quantizers (:mod:`jaxq.flax.nnx_fqvit`).
* any module with ``act_compress``: its whole computation runs with compressed
  activations (:mod:`jaxq.flax.nnx_compress`, :func:`jaxq.act.nnx.compressed_call`); the
  outermost matched module is compressed, quantization applies inside it.

Training and evaluation mode follow ``nnx.BatchNorm``: the attribute
``use_running_average`` (set by ``model.train()`` / ``model.eval()`` and ``nnx.view``).
In training mode (the default) observers are updated with the current batch and then
read, and learned activation steps are initialised on first use; in evaluation mode
nothing is written: observers are read, and reading one that was never updated raises
a ValueError naming the layer (:mod:`jaxq.layer.observers`).

Stochastic rounding (``rounding="stochastic"``, and the residuals of ``act_compress``)
draws keys from the ``"jaxq"`` stream of an ``nnx.Rngs``: the one passed as ``rngs=``,
else the first ``nnx.Rngs`` in the model that has a ``"jaxq"`` stream; without one it
rounds to nearest.

Integer arithmetic (``int8=``, as in :func:`jaxq.quantize_model`): with 8-bit symmetric
signed STE specs for both operands, the forward matmul of ``nnx.Linear`` /
``nnx.LinearGeneral`` runs on int8 operands (:mod:`jaxq.layer.int8`); ``int8="all"``
runs the backward matmuls in int8 too; ``int8="off"`` simulates everything in float.

LoRA (``Rule(lora=jaxq.LoRA(rank, alpha, dropout))``, Contract 8): a matched layer gets
``lora_a`` (random) / ``lora_b`` (zeros) ``nnx.Param``s and its kernel becomes a
:class:`LoRABase` variable (frozen: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains
the adapters); it computes ``base(x) + (alpha / rank) dropout(x) A B``
(:func:`jaxq.layer.qat.lora_qat_contraction`), the rule's weight and activation specs
on the base path, dropout from the ``"dropout"`` stream of the layer's ``nnx.Rngs`` in
training mode. ``jaxq.nnx.lora_freeze`` / ``lora_merge`` (:mod:`jaxq.flax.nnx_lora_freeze`)
make the base a QArray / fold the adapters into a float layer.

Works with ``nnx.jit``, ``nnx.grad`` / ``nnx.value_and_grad``, ``nnx.Optimizer`` and any
optax transformation (the float master weights and the learned steps are ``nnx.Param``).
Stacked layers (created by ``nnx.vmap``, run by ``nnx.scan``): a kernel with more axes
than its layer contracts has that many leading stacking axes, and every jaxq variable of
the layer gets them too, initialised per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxq import calibration
from jaxq.flax.nnx_compress import ACT_COMPRESS, compress_module
from jaxq.flax.nnx_fqvit import PTF_STATS, fqvit_kind, quantize_fqvit_layer
from jaxq.flax.nnx_classes import node_subclass, set_class
from jaxq.flax.nnx_lora import LoRABase, add_lora, frozen_stand_in, lora_call
from jaxq.flax.nnx_layout import kernel_rank, layer_kind, layer_layout
from jaxq.flax.nnx_state import (ACT_INITIALIZED, ACT_UNOBSERVED, RNGS, QuantStats,
                                 act_kwargs, mode_methods, next_key, note_mode,
                                 weight_kwargs)
from jaxq.layer.int8 import INT8_MODES
from jaxq.layer.operands import (ACT_NAMES, ACT_STATS, RNG_STREAM, WEIGHT_NAMES,
                                 act_stat_shape, act_view_spec, is_learned, is_observed,
                                 state_names, weight_view_spec)
from jaxq.layer import lora as lora_layer
from jaxq.layer.qat import qat_contraction
from jaxq.layer.smooth_ptq import CALIB, SMOOTH, qat_operands
from jaxq.layer.views import (Contraction, conv_hook, dot_general_hook,
                              einsum_hook, kernel_matrix, patched, resolve_op)
from jaxq.params import check_rule_fields, check_rules, init_weight_state
from jaxq.spec import QuantSpec, Rule, changes_contraction, rule_index, warn_unused_rules

__all__ = [
    "QuantStats", "quantize_model", "quantized_layers", "LayerConfig", "Contraction",
    "LAYER_TYPES", "RESERVED_NAMES",
    "RNG_STREAM", "QuantizedLinear", "QuantizedLinearGeneral", "QuantizedConv",
    "QuantizedEinsum", "LoRABase", "MODES", "register_mode", "qat_handler", "kernel_layout",
    "RULES",
]

CONFIG, MODE = "jaxq_config", "jaxq_mode"
#: Attribute of the model ``quantize_model`` returns: its rules (read by ``jaxq.nnx.report``).
RULES = "jaxq_rules"
#: Attribute names jaxq adds to a quantized layer (besides ``use_running_average``).
RESERVED_NAMES = WEIGHT_NAMES + ACT_NAMES + (ACT_STATS, ACT_INITIALIZED, ACT_UNOBSERVED, CONFIG,
                                          RNGS, MODE, ACT_COMPRESS, PTF_STATS,
                                          lora_layer.LORA_A, lora_layer.LORA_B, CALIB,
                                          SMOOTH)
LAYER_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum)
LORA_LAYERS = "nnx.Linear, nnx.LinearGeneral, nnx.Conv and nnx.Einsum"


@dataclasses.dataclass(frozen=True)
class LayerConfig:
  """Static description of one quantized layer (a hashable attribute of the layer).

  Attributes:
    path: the layer's "/"-joined attribute path in the model it was quantized in.
    rule: the matching rule.
    kind: "dot_general" (Linear, LinearGeneral), "conv" or "einsum".
    weight: the weight spec on the ``(K, N)`` kernel view, or None.
    act: the activation spec on the ``(M, K)`` input view, or None.
    int8: the ``int8`` mode of :func:`quantize_model`.
  """

  path: str
  rule: Rule
  kind: str
  weight: QuantSpec | None
  act: QuantSpec | None
  int8: str = "forward"


# ---------------------------------------------------------------------------------------
# The quantized call
# ---------------------------------------------------------------------------------------


def qat_handler(layer, op: Contraction) -> jax.Array:
  """QAT (mode "qat"): :func:`jaxq.layer.qat.qat_contraction` with the layer's state; with
  ``rule.lora``, :func:`jaxq.layer.qat.lora_qat_contraction` over the frozen kernel."""
  cfg: LayerConfig = getattr(layer, CONFIG)
  wkw = functools.partial(weight_kwargs, layer)
  akw = functools.partial(act_kwargs, layer, cfg.path, training=not layer.use_running_average)
  key = lambda: next_key(layer)  # noqa: E731
  if cfg.rule.smooth is not None:  # quant(x / s) @ quant(s W), s recorded by calibrate
    s = getattr(layer, SMOOTH, None)
    op = qat_operands(op, cfg.rule, None if s is None else s.get_value(), cfg.path)
  if cfg.rule.lora is None:
    return qat_contraction(op, cfg.path, cfg.rule.weight, cfg.rule.act, wkw, akw, key,
                           cfg.int8)
  return lora_call(layer, op, cfg.path, cfg.rule, cfg.int8, getattr(layer, RNGS),
                   not layer.use_running_average, wkw, akw, key)


#: ``{mode: handler(layer, op) -> result}``: what a quantized layer's contraction does,
#: selected by the layer's ``jaxq_mode`` attribute.
MODES: dict[str, Callable[[nnx.Module, Contraction], jax.Array]] = {"qat": qat_handler}


def register_mode(name: str, handler: Callable[[nnx.Module, Contraction], jax.Array]) -> None:
  """Adds (or replaces) a mode: ``handler(layer, op)`` computes a quantized layer's
  contraction ``op`` (:class:`jaxq.layer.views.Contraction`)."""
  if not isinstance(name, str) or not callable(handler):
    raise TypeError("register_mode(name: str, handler: callable)")
  MODES[name] = handler


def _hooks(layer, calls: list) -> dict[str, Callable]:
  """Replacement contraction ops for the duration of one call of ``layer``."""
  cfg: LayerConfig = getattr(layer, CONFIG)
  handler = MODES[getattr(layer, MODE)]

  def run(op: Contraction):
    calls.append(op.kind)
    return handler(layer, op)

  if cfg.kind == "dot_general":
    cls = getattr(layer, "dot_general_cls", None)
    base = resolve_op(cls, layer.dot_general, lax.dot_general)
    hooks = {"dot_general": dot_general_hook(base, cfg.path, run)}
    if hasattr(layer, "dot_general_cls"):
      hooks["dot_general_cls"] = None
    return hooks
  if cfg.kind == "conv":
    return {"conv_general_dilated": conv_hook(layer.conv_general_dilated, run)}
  return {"einsum_op": einsum_hook(layer.einsum_op, cfg.path, run)}


def _quantized_call(layer, base_call, args, kwargs):
  calls: list[str] = []
  hooks = _hooks(layer, calls)
  with patched(layer, **hooks, **frozen_stand_in(layer)):
    out = base_call(layer, *args, **kwargs)
  if not calls:
    cfg: LayerConfig = getattr(layer, CONFIG)
    raise RuntimeError(
        f"layer '{cfg.path}' ({type(layer).__mro__[1].__name__}) did not call its "
        f"contraction op ({', '.join(hooks)}), so jaxq could not quantize it; this flax "
        "version is not supported")
  return out


def _quantized_class(base: type) -> type:
  """The quantized subclass of a layer class (one per class, so graphdefs are stable)."""

  def make_call(base_call):
    def __call__(self, *args, **kwargs):  # pylint: disable=invalid-name
      return _quantized_call(self, base_call, args, kwargs)
    return __call__

  return node_subclass(
      base, "Quantized", make_call, module=__name__, extra=mode_methods(base),
      doc=(f"A quantized ``{base.__module__}.{base.__qualname__}`` made by "
           "``jaxq.nnx.quantize_model`` (same attributes, plus jaxq state)."))


QuantizedLinear = _quantized_class(nnx.Linear)
QuantizedLinearGeneral = _quantized_class(nnx.LinearGeneral)
QuantizedConv = _quantized_class(nnx.Conv)
QuantizedEinsum = _quantized_class(nnx.Einsum)


# ---------------------------------------------------------------------------------------
# quantize_model
# ---------------------------------------------------------------------------------------


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


def kernel_layout(layer, path: str | None = None) -> tuple[int, tuple[int, ...], int]:
  """``(stack, rhs_contract, K)`` of a supported layer's stored kernel: its leading
  stacking axes, the axes one layer's kernel contracts, and the activation's feature count.

  A layer stacked by ``nnx.vmap`` (run under ``nnx.scan``) has leading stacking axes: its
  jaxq state gets them too, one quantizer per layer of the stack. ``path`` names the layer
  in errors (default: the quantized layer's own path).
  """
  if path is None:
    path = getattr(layer, CONFIG).path
  shape = tuple(layer.kernel.get_value().shape)
  stack = len(shape) - kernel_rank(layer)
  if stack < 0:
    raise ValueError(f"layer '{path}': kernel of shape {shape} has fewer axes "
                     f"than its layer contracts ({kernel_rank(layer)})")
  rhs_contract, k = layer_layout(layer, path, shape[stack:])
  return stack, rhs_contract, k


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_kernel_state(kernel: jax.Array, spec: QuantSpec, rhs_contract: tuple[int, ...]):
  """Learned-step initialisation from the ``(K, N)`` view of a kernel (one compilation)."""
  w2, _ = kernel_matrix(kernel, rhs_contract)
  return init_weight_state(w2, spec, 0)


def _quantize_layer(layer, path: str, rule: Rule, rngs, int8: str) -> None:
  if any(name in vars(layer) for name in RESERVED_NAMES):
    raise ValueError(f"layer '{path}' is already quantized (or uses a reserved jaxq_* "
                     "attribute name)")
  kernel = layer.kernel.get_value()
  stack, rhs_contract, k = kernel_layout(layer, path)
  lead, kernel_shape = tuple(kernel.shape[:stack]), tuple(kernel.shape[stack:])
  wspec = None if rule.weight is None else weight_view_spec(rule.weight, path,
                                                            kernel_shape, rhs_contract)
  aspec = None if rule.act is None else act_view_spec(rule.act, path, k)
  cfg = LayerConfig(path, rule, layer_kind(layer), wspec, aspec, int8)

  if is_learned(wspec, act=False):
    init = lambda w: _init_kernel_state(w, wspec, rhs_contract)  # noqa: E731
    for _ in range(stack):
      init = jax.vmap(init)
    state = init(kernel)
    for key, name in state_names(wspec, WEIGHT_NAMES).items():
      setattr(layer, name, nnx.Param(state[key]))
  if is_learned(aspec, act=True):
    # Placeholders, replaced from the first activation seen in training mode.
    shape = lead + act_stat_shape(aspec, k)
    for key, name in state_names(aspec, ACT_NAMES).items():
      fill = 0.0 if key == "zero_point" else 1.0
      setattr(layer, name, nnx.Param(jnp.full(shape, fill, jnp.float32)))
    setattr(layer, ACT_INITIALIZED, QuantStats(jnp.zeros(lead, jnp.bool_)))
  if is_observed(aspec):
    observer = calibration.observer_init(aspec, act_stat_shape(aspec, k))
    setattr(layer, ACT_STATS, QuantStats(jax.tree_util.tree_map(
        lambda a: jnp.broadcast_to(a, lead + a.shape), observer)))
    setattr(layer, ACT_UNOBSERVED, False)
  if rule.lora is not None:
    add_lora(layer, path, rule.lora, kernel.dtype, lead, k, math.prod(kernel_shape) // k)
  setattr(layer, CONFIG, cfg)
  setattr(layer, RNGS, rngs)
  setattr(layer, MODE, "qat")
  if not hasattr(layer, "use_running_average"):
    layer.use_running_average = False
  set_class(layer, _quantized_class(type(layer)))
  note_mode(layer, layer.use_running_average)


def quantize_model(model: nnx.Module, rules: Rule | Sequence[Rule], *,
                   int8: str = "forward", rngs: nnx.Rngs | None = None,
                   inplace: bool = False) -> nnx.Module:
  """Quantizes the layers of an NNX ``model`` that ``rules`` match (see module docstring).

  Args:
    model: any ``flax.nnx.Module``.
    rules: a :class:`~jaxq.Rule` or a sequence of them, matched against each layer's
      "/"-joined attribute path (list entries by index: ``"blocks/0/mlp/fc1"``); the
      first match wins; unmatched layers stay in float.
    int8: "forward" (default): W8A8 Linear/LinearGeneral forward matmuls on int8
      operands (:mod:`jaxq.layer.int8`); "all": the backward matmuls in int8 too;
      "off": fake quantization only. As ``jaxq.quantize_model``'s.
    rngs: an ``nnx.Rngs`` with a ``"jaxq"`` stream for stochastic rounding (default: the
      first such ``nnx.Rngs`` in the model; none: round to nearest).
    inplace: convert ``model`` itself instead of a copy.

  Returns:
    The quantized model (a copy sharing the float arrays, or ``model`` with
    ``inplace=True``). Its quantized layers start in training mode.

  Raises:
    ValueError: for a rule that matches only layers jaxq cannot quantize (e.g.
      ``nnx.ConvTranspose``, a custom module with its own kernel), for a
      matched layer it cannot quantize as configured (LinearGeneral with ``batch_axis``,
      an Einsum without a constructor ``einsum_str``, a group size that does not divide
      the contracted axis, log2 attention with a custom ``attention_fn``), or an
      already quantized layer.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be a flax.nnx.Module; got {type(model).__name__}")
  rules = check_rules(rules)
  check_rule_fields(rules, "jaxq.nnx.quantize_model", lora=True, smooth=True, gptq=True)
  if int8 not in INT8_MODES:
    raise ValueError(f"int8 must be one of {INT8_MODES}; got {int8!r}")
  if rngs is not None and (not isinstance(rngs, nnx.Rngs) or RNG_STREAM not in rngs):
    raise ValueError(f"rngs must be an nnx.Rngs with a {RNG_STREAM!r} stream, e.g. "
                     f"nnx.Rngs({RNG_STREAM}=0); got {rngs!r}")
  if not inplace:
    model = nnx.clone(model)
  if rngs is None:
    rngs = _find_rngs(model)

  used: set[int] = set()
  matched: set[int] = set()  # rules that matched any module (the others warn)
  unsupported: dict[int, list[str]] = {}
  adapted: set[int] = set()  # rules that matched a layer jaxq quantizes or adapts
  unadaptable: dict[int, list[str]] = {}  # modules with parameters but no kernel
  todo, fq, compress = [], [], {}
  for path_t, module in nnx.iter_modules(model):
    path = "/".join(str(p) for p in path_t)
    i = rule_index(rules, path)
    if i is None:
      continue
    rule = rules[i]
    matched.add(i)
    if rule.act_compress is not None:
      used.add(i)
      compress[tuple(str(p) for p in path_t)] = (module, path, rule)
    kind = fqvit_kind(module, rule)
    if kind is not None:
      used.add(i)
      fq.append((module, path, rule, kind))
    elif isinstance(module, LAYER_TYPES + (nnx.Embed,)):
      used.add(i)
      if changes_contraction(rule):
        todo.append((module, path, rule))
      adapted.add(i)
    elif _has_own_kernel(module):
      if rule.lora is not None:
        raise ValueError(f"rule {rule.path!r} gives layer '{path}' ({type(module).__name__})"
                         f" a LoRA adapter; jaxq adapts {LORA_LAYERS} only")
      unsupported.setdefault(i, []).append(f"'{path}' ({type(module).__name__})")
    elif any(isinstance(v, nnx.Param) for v in vars(module).values()):
      unadaptable.setdefault(i, []).append(f"'{path}' ({type(module).__name__})")
  for i, layers in unsupported.items():
    if i not in used:
      raise ValueError(
          f"rule {rules[i].path!r} matches only layers jaxq cannot quantize: "
          f"{', '.join(layers)}; supported layers are nnx.Linear, nnx.LinearGeneral, "
          "nnx.Conv, nnx.Einsum and nnx.Embed (and their subclasses)")
  warn_unused_rules(rules, matched, type(model).__name__)
  lora_layer.check_lora_matches(rules, adapted, unadaptable, LORA_LAYERS)
  for module, path, rule in todo:
    if isinstance(module, nnx.Embed):
      from jaxq.flax.nnx_embed import quantize_embed  # pylint: disable=import-outside-toplevel
      quantize_embed(module, path, rule, rngs, int8)
    else:
      _quantize_layer(module, path, rule, rngs, int8)
  for module, path, rule, kind in fq:
    quantize_fqvit_layer(module, path, rule, kind)
  # The outermost matched module is compressed; act_compress rules inside it are ignored.
  for path_t, (module, path, rule) in compress.items():
    if not any(path_t[:n] in compress for n in range(len(path_t))):
      compress_module(module, path, rule, rngs)
  setattr(model, RULES, rules)
  return model


def quantized_layers(model: nnx.Module) -> dict[str, LayerConfig]:
  """``{path: LayerConfig}`` of the quantized layers of ``model`` (paths as now nested)."""
  out = {}
  for path_t, module in nnx.iter_modules(model):
    cfg = getattr(module, CONFIG, None) if isinstance(module, LAYER_TYPES) else None
    if isinstance(cfg, LayerConfig):
      out["/".join(str(p) for p in path_t)] = cfg
  return out
