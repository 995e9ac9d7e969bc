"""Activation-compressed training (ActNN, Chen et al. 2021; GACT, Liu et al. 2022).

* :func:`compressed_vjp` -- any function with its saved activations (residuals)
  compressed to 1/2/4/8 bits, unbiased by stochastic rounding.
* :data:`policy` -- a ``jax.checkpoint`` policy keeping only the compressed residuals.
* :func:`calc_precision`, :class:`AdaptiveBits` -- per-layer bits from gradient
  sensitivity (probe-based, or measured: :func:`sensitivity_from_gradients`) under an
  average-bits budget.
* :class:`SampleBits` -- per-sample widths (``compressed_vjp(fn, bits=SampleBits(...))``):
  a static number of samples per width, assigned in the step by each sample's
  :func:`sample_sensitivity` times its gradient-norm estimate (``sample_weight``, e.g.
  :func:`output_grad_sqnorm`); a tuple ``bits`` gives per-residual widths
  (:func:`compressed_residuals` lists the residuals).
* :mod:`jaxq.act.linen` -- :func:`~jaxq.act.linen.compressed_call` for Flax Linen modules.
* :func:`compress` / :func:`decompress` -- the storage format of one tensor.
* :func:`residual_nbytes` -- bytes a function's VJP keeps for the backward pass.
* :mod:`jaxq.act.residuals` / :mod:`jaxq.act.flow` -- which residuals are activations: a
  data-flow analysis of the VJP's jaxpr through calls, ``scan``, ``while`` and ``cond``.
* :mod:`jaxq.act.fold` / :mod:`jaxq.act.recompute` -- fewer stored residuals: an
  activation's derivative factors folded into one tensor, residuals that are cheap affine
  functions of stored ones recomputed in the backward pass.
"""

from jaxq.act import flow, linen, residuals
from jaxq.act.adaptive import (AdaptiveBits, SampleBits, calc_precision,
                               sensitivity_from_gradients, sensitivity_from_probe)
from jaxq.act.pack import CompressedArray, compress, decompress
from jaxq.act.remat import policy
from jaxq.act.residuals import Residual
from jaxq.act.samples import (SampleCompressed, output_grad_sqnorm,
                               sample_sensitivity)
from jaxq.act.vjp import compressed_residuals, compressed_vjp, residual_nbytes

__all__ = [
    "AdaptiveBits", "CompressedArray", "SampleBits", "SampleCompressed", "calc_precision",
    "compress", "compressed_residuals", "compressed_vjp", "decompress", "flow", "linen",
    "output_grad_sqnorm", "policy",
    "Residual", "residual_nbytes", "residuals", "sample_sensitivity", "sensitivity_from_gradients",
    "sensitivity_from_probe",
]
