"""Quantization-aware training of one contraction: the one implementation that the Linen
and NNX adapters call for every matched layer.

``qat_contraction`` fake-quantizes the layer's two operands on their 2-D views
(:func:`jaxq.layer.operands.fake_quantized_compute`), or, with ``int8="forward" | "all"``
and 8-bit STE specs on both operands, runs the matmul on int8 operands
(:mod:`jaxq.layer.int8`). The adapter supplies where the quantizer state lives: a
reader ``weight_kwargs(view_spec, w2)`` / ``act_kwargs(view_spec, x2)`` returning the
fake-quant kwargs of an operand view (learned step, observer range, or ``{}`` for the
current tensor's range) and ``key()`` for stochastic rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from jaxq.layer import lora as lora_layer
from jaxq.layer.int8 import INT8_MODES, int8_applies, int8_contraction
from jaxq.layer.operands import act_view_spec, fake_quantized_compute, weight_view_spec
from jaxq.layer.views import Contraction
from jaxq.qarray import QArray
from jaxq.spec import QuantSpec, Rule

__all__ = ["qat_contraction", "lora_qat_contraction", "QParamReader"]

#: ``reader(view_spec, v2) -> fake_quantize kwargs`` of one operand view.
QParamReader = Callable[[QuantSpec, jax.Array], dict]


def qat_contraction(op: Contraction, path: str, weight: QuantSpec | None,
                    act: QuantSpec | None, weight_kwargs: QParamReader,
                    act_kwargs: QParamReader, key: Callable[[], jax.Array | None],
                    int8: str) -> jax.Array:
  """The QAT result of ``op`` for the layer at ``path`` quantized with the rule's
  ``weight`` and ``act`` specs (None: that operand in float).

  Raises:
    ValueError: a spec that does not fit the layer (naming ``path``), or an unknown
      ``int8`` mode.
  """
  if int8 not in INT8_MODES:
    raise ValueError(f"layer '{path}': int8 must be one of {INT8_MODES}; got {int8!r}")
  if op.lhs.size == 0:  # an empty batch: nothing to quantize, an empty result
    return op.compute(op.lhs, op.rhs)
  wview = None if weight is None else weight_view_spec(weight, path, op.rhs.shape,
                                                        op.rhs_contract)
  aview = None if act is None else act_view_spec(act, path, op.lhs_contract_size())
  if int8 != "off" and int8_applies(op, weight, act):
    w2, _ = op.rhs_matrix()
    x2, _ = op.lhs_matrix()
    return int8_contraction(op, wview, aview, w2, x2, weight_kwargs(wview, w2),
                            act_kwargs(aview, x2), backward_int8=int8 == "all",
                            key=key() if int8 == "all" else None)
  return fake_quantized_compute(op, wview, aview, functools.partial(weight_kwargs, wview),
                                functools.partial(act_kwargs, aview), key)


def lora_qat_contraction(op: Contraction, path: str, rule: Rule, kernel: jax.Array | QArray,
                         a: jax.Array, b: jax.Array, weight_kwargs: QParamReader,
                         act_kwargs: QParamReader, key: Callable[[], jax.Array | None],
                         int8: str, dropout_key: jax.Array | None) -> jax.Array:
  """The QAT result of ``op`` for a layer whose ``rule`` has a LoRA adapter
  (:mod:`jaxq.layer.lora`): the base contraction on the frozen ``kernel`` (the float
  kernel, fake-quantized with ``rule.weight`` as in :func:`qat_contraction`, or the
  frozen QArray of :func:`jaxq.lora.freeze`, dequantized) with ``rule.act`` on its
  input, plus ``(alpha / r) dropout(x) A B``.

  Raises:
    ValueError: adapters of the wrong shape, a QArray of the wrong shape (naming
      ``path``).
  """
  lora_layer.check_lora_params(op, path, rule.lora, a, b)
  base_op = lora_layer.frozen_base(op, path, kernel)
  base = qat_contraction(base_op, path, lora_layer.base_weight_spec(rule.weight, kernel),
                         rule.act, weight_kwargs, act_kwargs, key, int8)
  return lora_layer.lora_contraction(op, base, a, b, rule.lora, dropout_key)
