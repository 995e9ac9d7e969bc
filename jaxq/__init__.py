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
* submodules, all imported with ``jaxq``: :mod:`jaxq.act` (activation compression),
  :mod:`jaxq.kernels`, :mod:`jaxq.layer` (the quantized contraction that the Linen and
  NNX adapters share), :mod:`jaxq.flax` / :mod:`jaxq.nnx` (the adapters),
  :mod:`jaxq.optim`, :mod:`jaxq.fold`, :mod:`jaxq.analysis`, :mod:`jaxq.export`,
  :mod:`jaxq.checkpoint`, :mod:`jaxq.sharding` / :mod:`jaxq.mesh`, the op-level PTQ
  algorithms :mod:`jaxq.gptq`, :mod:`jaxq.smoothing`, :mod:`jaxq.nf4`, and the lower
  tier (:mod:`jaxq.numerics`, :mod:`jaxq.estimators`, :mod:`jaxq.spec`,
  :mod:`jaxq.qarray`, :mod:`jaxq.quantizer`, :mod:`jaxq.calibration`,
  :mod:`jaxq.params`, ...).
"""

# Every submodule, so that ``import jaxq`` is enough for ``jaxq.X`` (the README's tour).
from jaxq import (act, allocation, analysis, bitpack, calibration, checkpoint, estimators,
                  export, flax, fold, gptq, kernels, layer, lora, mesh, nf4, nnx, numerics,
                  optim, param_tree, params, qarray, qarray_layout, quantizer, sample_bits,
                  sharding, smoothing, spec)
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
    "LoRA", "QArray", "QuantReport", "QuantSpec", "Rule", "act", "allocation", "analysis",
    "bitpack", "calibrate", "calibration", "checkpoint", "convert", "dequantize",
    "estimators", "export", "fake_quant", "flax", "fold", "gptq", "init_qstate", "kernels",
    "layer", "log2_fake_quant", "log2_quantize", "lora", "lsq_fake_quant", "mesh", "nf4",
    "nnx", "numerics", "optim", "pact_fake_quant", "param_tree", "params", "ptf_calibrate",
    "ptf_fake_quant", "qarray", "qarray_layout", "quantize", "quantize_model",
    "quantize_params", "quantizer", "report", "sample_bits", "sharding", "smoothing", "spec",
]
