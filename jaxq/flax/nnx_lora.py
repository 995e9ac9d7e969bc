"""LoRA state of an NNX layer (``Rule(lora=...)``, Contract 8): the adapters as
``nnx.Param``s and the frozen kernel as a :class:`LoRABase` variable. What the layer
computes is :func:`jaxq.layer.qat.lora_qat_contraction`.
"""

from __future__ import annotations

import functools
import math
import zlib

import jax
from flax import nnx

from jaxq.layer import lora as lora_layer
from jaxq.spec import LoRA

__all__ = ["LoRABase", "add_lora"]


class LoRABase(nnx.Variable):
  """The kernel of a LoRA layer (``Rule(lora=...)``): frozen, so not an ``nnx.Param``;
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains the adapters (and biases) only."""


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
