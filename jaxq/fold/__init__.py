"""BatchNorm folding and cross-layer equalization: float-exact rewrites that ease quantization.

Both act on parameter trees (nested dicts: Linen ``variables["params"]``, or the pure dict
of an NNX state, ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``) whose layers are
named by "/"-joined paths (:mod:`jaxq.fold.tree`).

* **BatchNorm folding** (:mod:`jaxq.fold.batchnorm`): :func:`fold_batchnorm` merges each
  inference-mode BatchNorm into the Conv/Dense before it, :func:`find_conv_bn_pairs` finds
  the pairs of a Linen model, :class:`FoldedBatchNorm` runs the unchanged model definition
  on the folded trees.
* **NNX** (:mod:`jaxq.fold.nnx`): :func:`find_conv_bn_pairs_nnx` finds the
  ``nnx.Conv`` / ``nnx.Linear`` -> ``nnx.BatchNorm`` pairs by tracing a call,
  :func:`fold_batchnorm_nnx` folds them (through :func:`fold_batchnorm`) and leaves a
  :class:`FoldedIdentity` where each BatchNorm was.
* **Cross-layer equalization** (:mod:`jaxq.fold.cle`, Nagel et al. 2019): :func:`equalize`
  rescales the channels between consecutive layers (including grouped/depthwise second
  layers and conv -> depthwise -> conv chains) so that per-tensor weight quantization loses
  less, without changing the float function; :func:`find_equalization_pairs`
  (:mod:`jaxq.fold.trace`) finds the pairs on any function of the params tree and proves
  that rescaling them keeps it, or says which layers and why not (e.g. ReLU6).

Typical use, Linen::

  bn_pairs = fold.find_conv_bn_pairs(model, x, train=False)
  params, stats = fold.fold_batchnorm(params, stats, bn_pairs)
  folded = fold.FoldedBatchNorm(model, tuple(bn for _, bn in bn_pairs))
  apply = lambda p, x: folded.apply({"params": p, "batch_stats": stats}, x, train=False)
  params = fold.equalize(params, fold.find_equalization_pairs(apply, params, x))

NNX (equalization on the params pure dict, which ``nnx.merge`` takes as a state)::

  model = fold.fold_batchnorm_nnx(model, fold.find_conv_bn_pairs_nnx(model, x))
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  apply = lambda p, x: nnx.merge(graphdef, p, rest)(x)
  nnx.update(model, fold.equalize(params, fold.find_equalization_pairs(apply, params, x)))

Either model then quantizes as usual (``jaxq.quantize_model(folded, rules)``,
``jaxq.nnx.quantize_model(model, rules)``): QAT and PTQ see the folded weights.
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
from jaxq.fold.nnx import FoldedIdentity, find_conv_bn_pairs_nnx, fold_batchnorm_nnx
from jaxq.fold.trace import find_equalization_pairs

__all__ = [
    "BN_EPSILON", "EqualizationPair", "FoldedBatchNorm", "FoldedIdentity",
    "equalization_scales", "equalize", "find_conv_bn_pairs", "find_conv_bn_pairs_nnx",
    "find_equalization_pairs", "fold_batchnorm", "fold_batchnorm_nnx", "fold_conv_bn",
    "frozen_batchnorm",
]
