"""Flax NNX entry points: ``jaxq.nnx.quantize_model(model, rules)``.

The implementation lives in :mod:`jaxq.flax.nnx`; this module is its public name.
"""

from jaxq.flax.nnx import *  # noqa: F401,F403
from jaxq.flax.nnx import __all__  # noqa: F401
