"""Flax NNX entry points: ``jaxq.nnx.quantize_model(model, rules)``, ``calibrate``,
``convert``, ``report``, ``lora_freeze``, ``lora_merge``.

The implementation lives in :mod:`jaxq.flax.nnx` (QAT), :mod:`jaxq.flax.nnx_ptq`
(calibration), :mod:`jaxq.flax.nnx_serve` (serving), :mod:`jaxq.flax.nnx_lora_freeze`
(LoRA freeze / merge) and :mod:`jaxq.flax.report`; this module is their public name.
"""

from jaxq.flax.nnx import *  # noqa: F401,F403
from jaxq.flax.nnx import __all__ as _qat_names
from jaxq.flax.nnx_embed import QuantizedEmbed
from jaxq.flax.nnx_lora_freeze import lora_freeze, lora_merge
from jaxq.flax.nnx_ptq import calibrate
from jaxq.flax.nnx_serve import convert
from jaxq.flax.report import nnx_report as report

__all__ = list(_qat_names) + ["QuantizedEmbed", "calibrate", "convert", "report",
                              "lora_freeze", "lora_merge"]
