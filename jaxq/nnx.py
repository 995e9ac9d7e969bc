"""Flax NNX entry points: ``jaxq.nnx.quantize_model(model, rules)``, ``calibrate``,
``convert``.

The implementation lives in :mod:`jaxq.flax.nnx` (QAT), :mod:`jaxq.flax.nnx_ptq`
(calibration) and :mod:`jaxq.flax.nnx_serve` (serving); this module is their public name.
"""

from jaxq.flax.nnx import *  # noqa: F401,F403
from jaxq.flax.nnx import __all__ as _qat_names
from jaxq.flax.nnx_ptq import calibrate
from jaxq.flax.nnx_serve import convert

__all__ = list(_qat_names) + ["calibrate", "convert"]
