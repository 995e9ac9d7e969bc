"""The contraction layout of each NNX layer jaxq quantizes (``nnx.Linear``,
``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.Einsum``): its kind, the rank of the kernel one
call contracts, and which kernel axes are contracted (:mod:`jaxq.layer.views`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from flax import nnx

from jaxq.layer.views import einsum_axes

__all__ = ["layer_kind", "kernel_rank", "layer_layout"]


def layer_kind(layer) -> str:
  """"dot_general" (Linear, LinearGeneral), "conv" or "einsum"."""
  if isinstance(layer, (nnx.Linear, nnx.LinearGeneral)):
    return "dot_general"
  if isinstance(layer, nnx.Conv):
    return "conv"
  return "einsum"


def kernel_rank(layer) -> int:
  """The rank of the kernel that one call of ``layer`` contracts (without stacking axes)."""
  if isinstance(layer, nnx.LinearGeneral):
    return len(layer.in_features) + len(layer.out_features)
  if isinstance(layer, nnx.Linear):
    return 2
  if isinstance(layer, nnx.Conv):
    size = layer.kernel_size
    return (len(size) if isinstance(size, Sequence) else 1) + 2
  return len(layer.kernel_shape)


def layer_layout(layer, path: str, kernel_shape: tuple[int, ...]
                 ) -> tuple[tuple[int, ...], int]:
  """``(rhs_contract, K)``: the kernel's contracted axes and the activation's feature count."""
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
  _, rc, k_axes = einsum_axes(layer.einsum_str, path)
  return rc, math.prod(kernel_shape[a] for a in k_axes)
