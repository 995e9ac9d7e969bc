"""What happens to one quantized contraction, written once and independent of Flax.

A quantizable layer (Dense/Linear, DenseGeneral/LinearGeneral, Conv, Einsum) computes one
contraction of its input activation and its kernel (:mod:`jaxq.layer.views`). This
package quantizes that contraction: operand view specs, learned steps and observers
(:mod:`jaxq.layer.operands`, :mod:`jaxq.layer.observers`), the W8A8 training matmul
(:mod:`jaxq.layer.int8`), QAT (:mod:`jaxq.layer.qat`), LoRA adapters
(:mod:`jaxq.layer.lora`), FQ-ViT's LayerNorm / attention quantizers
(:mod:`jaxq.layer.fqvit`), serving from QArray kernels (:mod:`jaxq.layer.serve`), and
Contract 7's per-layer calibration state (:mod:`jaxq.layer.calib`) and convert-time
smoothing / GPTQ (:mod:`jaxq.layer.smooth`). The Linen and NNX adapters (:mod:`jaxq.flax.linen`, :mod:`jaxq.flax.nnx`) route a matched
layer's contraction here and give it a place for its state.
"""
