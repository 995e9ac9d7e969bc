"""Optimizers for quantized training (optax transformations).

* :mod:`jaxq.optim.quant_params` -- quantizer parameters (LSQ steps, PACT clips) in their
  own optimizer group without weight decay: :func:`quant_aware`, :func:`decay_mask`.
* :mod:`jaxq.optim.lowbit_adam` -- :func:`adamw` with 8-bit / 4-bit block-wise quantized
  moments (codes in :mod:`jaxq.optim.codes`, blocks in :mod:`jaxq.optim.blockwise`).
"""

from jaxq.optim import blockwise, codes
from jaxq.optim.lowbit_adam import (DEFAULT_CODES, MIN_QUANTIZED_SIZE,
                                    ScaleByLowBitAdamState, adamw, scale_by_lowbit_adam)
from jaxq.optim.quant_params import (FLOAT_LABEL, QSTATE_KEY, QUANT_LABEL,
                                     RESERVED_PREFIX, decay_mask, is_quant_param,
                                     quant_aware, split_quant_params)

__all__ = [
    "QUANT_LABEL", "FLOAT_LABEL", "RESERVED_PREFIX", "QSTATE_KEY", "is_quant_param",
    "split_quant_params", "decay_mask", "quant_aware", "adamw", "scale_by_lowbit_adam",
    "ScaleByLowBitAdamState", "DEFAULT_CODES", "MIN_QUANTIZED_SIZE", "codes", "blockwise",
]
