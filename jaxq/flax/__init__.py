"""Flax integration: Linen QAT wrapper (:mod:`jaxq.flax.linen`).

The NNX wrapper lives in :mod:`jaxq.flax.nnx` and PTQ (``calibrate`` / ``convert``) in
:mod:`jaxq.flax.ptq` (NNX: :mod:`jaxq.flax.nnx_ptq`, :mod:`jaxq.flax.nnx_serve`, public as
``jaxq.nnx.calibrate`` / ``jaxq.nnx.convert``); import them from there.
"""

from jaxq.flax.linen import (
    QuantizedModel,
    init_quant_params,
    layer_paths,
    quantize_model,
    register_mode,
)

__all__ = ["QuantizedModel", "init_quant_params", "layer_paths", "quantize_model",
           "register_mode"]
