"""Flax NNX entry points: ``jaxq.nnx.quantize_model(model, rules)``, ``jaxq.nnx.report``.

The implementation lives in :mod:`jaxq.flax.nnx` (and the report in
:mod:`jaxq.flax.report`); this module is its public name.
"""

from jaxq.flax.nnx import *  # noqa: F401,F403
from jaxq.flax.nnx import __all__ as _impl_all
from jaxq.flax.report import nnx_report as report

__all__ = [*_impl_all, "report"]
