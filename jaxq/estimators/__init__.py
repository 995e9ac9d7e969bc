"""Fake-quantization ops with custom gradients: STE, LSQ/LSQ+, PACT, FQ-ViT log2 and PTF.

Modules: :mod:`~jaxq.estimators.affine` (STE, LSQ/LSQ+, PACT on a uniform grid) and
:mod:`~jaxq.estimators.fqvit` (FQ-ViT's log2 and power-of-two-factor quantizers).

Every op here is a :func:`jax.custom_vjp` whose forward pass is the quantize-dequantize
round trip ``x_hat = (clip(round(x / s) + z, qmin, qmax) - z) * s`` (or a variant of it)
and whose backward pass is a chosen gradient estimator:

* :func:`fake_quant` -- straight-through estimator (Bengio et al. 2013; Jacob et al. 2018):
  ``d x_hat / d x = 1`` where the rounded code lies in ``[qmin, qmax]``, else 0; no
  gradient to the scale or the zero point.
* :func:`lsq_fake_quant` -- learned step size (Esser et al. 2020, "Learned Step Size
  Quantization") and learned offset (Bhalgat et al. 2020, "LSQ+"): the derivative of the
  forward formula with ``round`` treated as the identity, scaled by ``grad_scale``.
* :func:`pact_fake_quant` -- learned clipping level (Choi et al. 2018, "PACT").
* :func:`log2_fake_quant`, :func:`log2_quantize`, :func:`log2_dequantize`,
  :func:`log2_matmul` -- FQ-ViT's log2 quantizer for attention probabilities (Lin et al.
  2022, "FQ-ViT: Post-Training Quantization for Fully Quantized Vision Transformer").
* :func:`ptf_fake_quant`, :func:`ptf_calibrate` -- FQ-ViT's power-of-two factors: one
  layer-wise scale times a per-channel power of two, for LayerNorm inputs.
* :func:`lsq_init_scale` -- the LSQ paper's step-size initialisation.

Conventions shared by all ops:

* The output has the shape and dtype of ``x`` (bfloat16, float16, float32 in, the same
  out); the arithmetic is done in float32 (float64 for float64 inputs).
* ``scale``, ``zero_point``, ``qmin`` and ``qmax`` broadcast against ``x``: scalars for
  per-tensor, e.g. ``(1, C)`` for per-channel or ``(G, 1)`` on a
  :func:`jaxq.numerics.to_groups` view for per-group quantization. They may not enlarge
  ``x``'s shape. Power-of-two scales (:func:`jaxq.numerics.pow2`) are ordinary scales.
* Values training can reach: a scale of magnitude below
  :data:`jaxq.numerics.SCALE_EPS` (0 included) is used as ``+-SCALE_EPS``
  (:func:`jaxq.numerics.floor_scale`); a negative scale, which LSQ can learn, is a
  mirrored grid, ``fq(x; -s) = -fq(-x; s)``. A PACT ``alpha`` below
  ``(2^b - 1) * SCALE_EPS`` (0, negative) is used as that floor. Gradients are passed
  to the raw parameter (so a learned step can recover); a NaN scale propagates.
  ``qmin > qmax`` anywhere raises ValueError when the ranges are concrete (ints or
  arrays), and gives NaN at those elements when they are traced.
* ``round`` is round-half-to-even; with a PRNG ``key`` it is unbiased stochastic rounding
  ``floor(v + u)``, ``u ~ U[0, 1)`` (:func:`jaxq.numerics.round_stochastic`).
* "Inside the range" is decided on the rounded code ``round(x / s) + z``, exactly as the
  forward pass clips it (so ``x / s = qmax + 0.5`` rounding up to ``qmax + 1`` is outside).
* ``qmin``, ``qmax``, ``key``, ``grad_scale``, ``bits`` and integer-valued arguments are
  not differentiated (zero cotangents).

Non-finite inputs (the policy of :mod:`jaxq.numerics`): NaN propagates to the output and
+-Inf saturates to the nearest end of the integer range. A NaN or +-Inf element gets
zero ``d/dx`` (it is not inside the range); +-Inf counts as below/above the range for the
LSQ/PACT parameter gradients; a NaN element contributes NaN to the LSQ scale gradient so
that the problem is visible rather than hidden.
"""

from jaxq.estimators.affine import fake_quant, lsq_fake_quant, lsq_init_scale, pact_fake_quant
from jaxq.estimators.fqvit import (log2_dequantize, log2_fake_quant, log2_matmul, log2_quantize,
                                   ptf_calibrate, ptf_fake_quant)

__all__ = [
    "fake_quant",
    "lsq_fake_quant",
    "pact_fake_quant",
    "lsq_init_scale",
    "log2_quantize",
    "log2_dequantize",
    "log2_fake_quant",
    "log2_matmul",
    "ptf_fake_quant",
    "ptf_calibrate",
]
