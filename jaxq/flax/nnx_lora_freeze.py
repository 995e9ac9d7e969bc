"""Freezing and merging the base kernels of NNX LoRA layers: ``jaxq.nnx.lora_freeze`` /
``jaxq.nnx.lora_merge`` (Contract 8), the NNX twins of :func:`jaxq.lora.freeze` /
:func:`jaxq.lora.merge`, built from the same per-layer pieces
(:func:`jaxq.lora.freeze_kernel`, :func:`jaxq.layer.lora.merge_kernel`).

* :func:`lora_freeze` (in place): the :class:`~jaxq.flax.nnx_lora.LoRABase` kernel of
  each LoRA layer whose rule has a weight spec becomes that spec's
  :class:`~jaxq.QArray` (NF4: codes packed two a byte plus one float32 absmax per group
  of the innermost contracted axis; uniform: :func:`jaxq.nnx.convert`'s kernel QArray),
  so the model holds no float copy of the base. It dequantizes to exactly the weights the
  QAT forward fake-quantized the float base to: outputs do not change, and training
  continues with the same model and ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` (the
  base was never an ``nnx.Param``). Learned weight steps (``jaxq_weight_*``, LSQ) are
  dropped once used, as Linen's freeze drops them (make the optimizer after freezing
  then). A rule without a weight spec keeps a float (frozen, non-Param) base.
* :func:`lora_merge` (in place): each LoRA layer's kernel becomes the float
  ``nnx.Param`` ``W + (alpha / r) A B`` (``W`` dequantized when frozen, the float base
  otherwise, as Linen's merge), and the layer is its float class again (``nnx.Linear``
  ...) with no jaxq state: adapters, quantizer state and config are removed, so the
  model can be exported, or quantized anew with :func:`jaxq.nnx.quantize_model` and
  served with :func:`jaxq.nnx.convert`. When no quantized module is left, the model is
  the float model again (its rules attribute removed too).
"""

from __future__ import annotations

from flax import nnx

from jaxq.flax.nnx import CONFIG, LAYER_TYPES, RESERVED_NAMES, RULES, LayerConfig
from jaxq.flax.nnx_classes import set_class
from jaxq.flax.nnx_layout import layer_layout
from jaxq.flax.nnx_lora import LoRABase
from jaxq.layer.lora import LORA_A, LORA_B, merge_kernel
from jaxq.layer.operands import WEIGHT_NAMES
from jaxq.lora import freeze_kernel
from jaxq.params import per_layer
from jaxq.qarray import QArray

__all__ = ["lora_freeze", "lora_merge"]


def _lora_layers(qmodel, where: str) -> list[tuple[str, nnx.Module, LayerConfig]]:
  """``(path, layer, config)`` of every LoRA layer of ``qmodel``; ValueError when none."""
  if not isinstance(qmodel, nnx.Module):
    raise TypeError(f"{where}: qmodel must be a flax.nnx.Module; got {type(qmodel).__name__}")
  layers = []
  for path_t, module in nnx.iter_modules(qmodel):
    cfg = getattr(module, CONFIG, None) if isinstance(module, LAYER_TYPES) else None
    if isinstance(cfg, LayerConfig) and cfg.rule.lora is not None:
      layers.append(("/".join(str(p) for p in path_t), module, cfg))
  if not layers:
    rules = getattr(qmodel, RULES, None)
    if rules is None:
      why = "it is not quantized (or its LoRA layers were merged already)"
    elif not any(r.lora is not None for r in rules):
      why = "no rule has lora=jaxq.LoRA(...)"
    else:
      why = "its LoRA layers were merged already"
    raise ValueError(f"{where}: qmodel has no LoRA layer: {why}; LoRA layers come from "
                     "jaxq.nnx.quantize_model(model, [jaxq.Rule(..., lora=jaxq.LoRA(rank))])")
  return layers


def _layout(layer, path: str) -> tuple[int, tuple[int, ...]]:
  """``(stack, rhs_contract)`` of a LoRA layer, its kernel float or frozen (a QArray's
  shape is one layer's; its leaves carry the stacking axes, as the adapters do)."""
  kernel = layer.kernel.get_value()
  stack = getattr(layer, LORA_A).get_value().ndim - 2
  shape = kernel.shape if isinstance(kernel, QArray) else kernel.shape[stack:]
  contract, _ = layer_layout(layer, path, tuple(shape))
  return stack, contract


def lora_freeze(qmodel: nnx.Module, *, compact_scales: bool = False) -> nnx.Module:
  """Each LoRA layer's base kernel as the QArray of its rule's weight spec, in place
  (module docstring); returns ``qmodel``.

  Args:
    qmodel: a model quantized by :func:`jaxq.nnx.quantize_model` with LoRA rules.
    compact_scales: double-quantized NF4 absmaxes / float16-float8 uniform scales, as
      :func:`jaxq.lora.freeze`'s (fewer bytes; the outputs then change slightly).

  Raises:
    ValueError: a model without LoRA layers; a kernel the weight spec does not fit
      (naming the layer).
  """
  for path, layer, cfg in _lora_layers(qmodel, "jaxq.nnx.lora_freeze"):
    rule = cfg.rule
    kernel = layer.kernel.get_value()
    if rule.weight is None or isinstance(kernel, QArray):
      continue
    stack, contract = _layout(layer, path)
    learned = {n: getattr(layer, n).get_value() for n in WEIGHT_NAMES if n in vars(layer)}
    bias = getattr(layer, "bias", None)
    bias = None if bias is None else bias.get_value()
    q = freeze_kernel(path, rule, kernel, bias, contract, stack, learned,
                      compact_scales=compact_scales)
    layer.kernel = LoRABase(q)
    for n in learned:
      delattr(layer, n)
  return qmodel


def lora_merge(qmodel: nnx.Module) -> nnx.Module:
  """Each LoRA layer as its float layer with the kernel ``W + (alpha / r) A B``, in
  place (module docstring); returns ``qmodel``.

  Raises:
    ValueError: a model without LoRA layers (or merged already).
  """
  for path, layer, cfg in _lora_layers(qmodel, "jaxq.nnx.lora_merge"):
    stack, contract = _layout(layer, path)
    a, b = getattr(layer, LORA_A).get_value(), getattr(layer, LORA_B).get_value()
    merged = per_layer(lambda w, a, b, lora=cfg.rule.lora: merge_kernel(
        w, a, b, lora, contract), stack)(layer.kernel.get_value(), a, b)
    # The class jaxq.nnx.quantize_model subclassed (under any other jaxq subclass, e.g.
    # act_compress's): the first one not made by jaxq.flax.nnx_classes.node_subclass.
    float_class = next(c for c in type(layer).__mro__ if not c.__module__.startswith("jaxq."))
    for name in RESERVED_NAMES:
      if name in vars(layer):
        delattr(layer, name)
    if float_class in LAYER_TYPES:  # quantize_model set it; these classes have none
      del layer.use_running_average
    layer.kernel = nnx.Param(merged)
    set_class(layer, float_class)
  if RULES in vars(qmodel) and not any(
      any(n in vars(m) for n in RESERVED_NAMES) for _, m in nnx.iter_modules(qmodel)):
    delattr(qmodel, RULES)
  return qmodel
