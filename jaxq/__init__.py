"""jaxq: quantized training, PTQ/int8 serving and activation-compressed training for JAX.

The public API of ``DESIGN.md``'s contract:

* numerics: :func:`fake_quant`, :func:`lsq_fake_quant`, :func:`pact_fake_quant`, the
  FQ-ViT log2 and power-of-two-factor quantizers;
* specs and arrays: :class:`QuantSpec`, :class:`Rule`, :func:`quantize`,
  :func:`dequantize`, :class:`QArray`;
* training: :func:`quantize_params`, :func:`init_qstate`, :func:`quantize_model`
  (Linen), :func:`jaxq.nnx.quantize_model`;
* PTQ and serving: :func:`calibrate`, :func:`convert`;
* LoRA / QLoRA: :class:`LoRA` (``Rule(lora=...)``), :mod:`jaxq.lora` (``trainable``,
  ``freeze``, ``merge``);
* what a rule set quantized: :func:`report` (Linen), :func:`jaxq.nnx.report`
  (:class:`QuantReport`);
* submodules :mod:`jaxq.act` (activation compression), :mod:`jaxq.kernels`,
  :mod:`jaxq.layer` (the quantized contraction that the Linen and NNX adapters share),
  and the op-level PTQ algorithms :mod:`jaxq.gptq`, :mod:`jaxq.smoothing`,
  :mod:`jaxq.nf4`.
"""

from jaxq import act
from jaxq import gptq
from jaxq import kernels
from jaxq import layer
from jaxq import lora
from jaxq import nf4
from jaxq import nnx
from jaxq import smoothing
from jaxq.estimators import (
    fake_quant,
    log2_fake_quant,
    log2_quantize,
    lsq_fake_quant,
    pact_fake_quant,
    ptf_calibrate,
    ptf_fake_quant,
)
from jaxq.flax.linen import quantize_model
from jaxq.flax.ptq import calibrate, convert
from jaxq.flax.report import QuantReport, report
from jaxq.params import init_qstate, quantize_params
from jaxq.qarray import QArray, dequantize, quantize
from jaxq.spec import LoRA, QuantSpec, Rule

__version__ = "0.1.0"

__all__ = [
    "LoRA", "QArray", "QuantReport", "QuantSpec", "Rule", "act", "calibrate", "convert",
    "dequantize", "fake_quant", "gptq", "init_qstate", "kernels", "layer",
    "log2_fake_quant", "log2_quantize", "lora", "lsq_fake_quant", "nf4", "nnx",
    "pact_fake_quant", "ptf_calibrate", "ptf_fake_quant", "quantize", "quantize_model",
    "quantize_params", "report", "smoothing",
]
