"""LoRA state of an NNX layer (``Rule(lora=...)``, Contract 8): the adapters as
``nnx.Param``s and the frozen kernel as a :class:`LoRABase` variable, and the layer's
LoRA call. What the layer computes is :func:`jaxq.layer.qat.lora_qat_contraction`.

The base kernel is a float array until :func:`jaxq.nnx.lora_freeze` makes it a
:class:`~jaxq.QArray` (:mod:`jaxq.flax.nnx_lora_freeze`). Then, for the duration of a
call, the layer's own code reads a zero placeholder of the kernel's shape (dead code
under ``jit``) that carries the QArray as Variable metadata (as a served layer,
:mod:`jaxq.flax.nnx_serve`), and the base contraction dequantizes the QArray
(:func:`jaxq.layer.lora.frozen_base`), as Linen's frozen layers do.
"""

from __future__ import annotations

import functools
import math
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from jaxq.layer import lora as lora_layer
from jaxq.layer.qat import QParamReader, lora_qat_contraction
from jaxq.layer.views import Contraction
from jaxq.qarray import QArray
from jaxq.spec import LoRA, Rule

__all__ = ["LoRABase", "add_lora", "frozen_stand_in", "lora_call"]

# Variable metadata key of the placeholder kernel of a frozen base: the QArray.
_FROZEN = "jaxq_frozen_qarray"


class LoRABase(nnx.Variable):
  """The kernel of a LoRA layer (``Rule(lora=...)``): frozen, so not an ``nnx.Param``;
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains the adapters (and biases) only.
  Its value is the float kernel, or its QArray once frozen (:func:`jaxq.nnx.lora_freeze`)."""


def add_lora(layer, path: str, lora: LoRA, dtype, lead: tuple[int, ...], k: int,
              n: int) -> None:
  """The adapters ``lora_a`` (random) / ``lora_b`` (zeros) as ``nnx.Param``s, one pair per
  layer of a stack, and the kernel frozen as a :class:`LoRABase`. ``A``'s key: the
  layer's path hashed into key 0 (deterministic; re-draw with ``nnx.update`` to vary)."""
  key = jax.random.fold_in(jax.random.key(0), zlib.crc32(path.encode()))
  keys = jax.random.split(key, math.prod(lead)).reshape(lead + key.shape) if lead else key
  init = functools.partial(lora_layer.init_lora, k=k, n=n, rank=lora.rank, dtype=dtype)
  for _ in lead:
    init = jax.vmap(init)
  a, b = init(keys)
  setattr(layer, lora_layer.LORA_A, nnx.Param(a))
  setattr(layer, lora_layer.LORA_B, nnx.Param(b))
  layer.kernel = LoRABase(layer.kernel.get_value())


def frozen_stand_in(layer) -> dict:
  """``{"kernel": placeholder}`` for one call of a layer whose base is a frozen QArray
  (module docstring), ``{}`` otherwise; for :func:`jaxq.layer.views.patched`."""
  var = getattr(layer, "kernel", None)
  q = var.get_value() if isinstance(var, LoRABase) else None
  if not isinstance(q, QArray):
    return {}
  return {"kernel": LoRABase(jnp.broadcast_to(jnp.zeros((), q.dtype), q.shape),
                             **{_FROZEN: q})}


def lora_call(layer, op: Contraction, path: str, rule: Rule, int8: str, rngs,
              training: bool, weight_kwargs: QParamReader, act_kwargs: QParamReader,
              key) -> jax.Array:
  """The contraction ``op`` of a LoRA layer: its base kernel (``op.rhs``, or the frozen
  QArray the placeholder carries) through :func:`jaxq.layer.qat.lora_qat_contraction`,
  with the adapter's dropout key drawn from ``rngs``' "dropout" stream in training."""
  lora = rule.lora
  dropout_key = None
  if (lora.dropout > 0 and training and rngs is not None
      and lora_layer.DROPOUT_STREAM in rngs):
    dropout_key = rngs[lora_layer.DROPOUT_STREAM]()
  frozen = layer.kernel.get_metadata().get(_FROZEN)
  return lora_qat_contraction(
      op, path, rule, op.rhs if frozen is None else frozen,
      getattr(layer, lora_layer.LORA_A).get_value(),
      getattr(layer, lora_layer.LORA_B).get_value(), weight_kwargs, act_kwargs, key, int8,
      dropout_key)
