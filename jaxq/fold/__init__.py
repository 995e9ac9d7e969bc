"""BatchNorm folding and cross-layer equalization: float-exact rewrites that ease quantization.

Both act on parameter trees (nested dicts: Linen ``variables["params"]``, or the pure dict
of an NNX state, ``nnx.state(model, nnx.Param).to_pure_dict()``) whose layers are named by
"/"-joined paths (:mod:`jaxq.fold.tree`).

* **BatchNorm folding** (:mod:`jaxq.fold.batchnorm`): :func:`fold_batchnorm` merges each
  inference-mode BatchNorm into the Conv/Dense before it, :func:`find_conv_bn_pairs` finds
  the pairs of a Linen model, :class:`FoldedBatchNorm` runs the unchanged model definition
  on the folded trees.
* **Cross-layer equalization** (:mod:`jaxq.fold.cle`, Nagel et al. 2019): :func:`equalize`
  rescales the channels between consecutive layers (including grouped/depthwise second
  layers and conv -> depthwise -> conv chains) so that per-tensor weight quantization loses
  less, without changing the float function; :func:`find_equalization_pairs`
  (:mod:`jaxq.fold.trace`) finds the pairs on any function of the params tree and proves
  that rescaling them keeps it, or says which layers and why not (e.g. ReLU6).

Typical use (Linen; for NNX pass a function that merges the state)::

  bn_pairs = fold.find_conv_bn_pairs(model, x, train=False)
  params, stats = fold.fold_batchnorm(params, stats, bn_pairs)
  folded = fold.FoldedBatchNorm(model, tuple(bn for _, bn in bn_pairs))
  apply = lambda p, x: folded.apply({"params": p, "batch_stats": stats}, x, train=False)
  params = fold.equalize(params, fold.find_equalization_pairs(apply, params, x))
"""

from jaxq.fold.batchnorm import (
    BN_EPSILON,
    FoldedBatchNorm,
    find_conv_bn_pairs,
    fold_batchnorm,
    fold_conv_bn,
    frozen_batchnorm,
)
from jaxq.fold.cle import EqualizationPair, equalization_scales, equalize
from jaxq.fold.trace import find_equalization_pairs

__all__ = [
    "BN_EPSILON", "EqualizationPair", "FoldedBatchNorm", "equalization_scales", "equalize",
    "find_conv_bn_pairs", "find_equalization_pairs", "fold_batchnorm", "fold_conv_bn",
    "frozen_batchnorm",
]
