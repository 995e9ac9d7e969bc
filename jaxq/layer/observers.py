"""Reading a layer's activation observer: its quantization parameters, refused when the
observer was never updated.

An observer (:mod:`jaxq.calibration`; activation calibration "ema", "percentile",
"mse") that has seen no data (count ``n == 0``) gives the range ``[0, 0]``: a scale that
means nothing. Reading it is an error (Contract 6), raised as a ValueError naming the
layer whenever it can be decided: when the count is concrete (eager calls, or state
read outside ``jit``), or when the adapter knows from a concrete moment that the
observer is unobserved (``known_unobserved``, e.g. the NNX flag set by ``model.eval()``).
Under ``jit`` with no such knowledge the count is a traced value; the scale of every
never-observed slice is then NaN, so the layer's output is NaN rather than silently
quantized with a meaningless scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import calibration
from jaxq.spec import QuantSpec

__all__ = ["observed_qparams", "never_observed", "unobserved_error"]


def never_observed(state: dict) -> bool | None:
  """Whether some slice of the observer ``state`` has seen no data (``n == 0``); None
  when the count is a traced value."""
  n = state["n"]
  if isinstance(n, jax.core.Tracer):
    return None
  return bool(np.any(np.asarray(n) == 0))


def unobserved_error(path: str, spec: QuantSpec, hint: str = "") -> ValueError:
  """The ValueError for reading the never-updated observer of the layer at ``path``."""
  return ValueError(
      f"layer '{path}': its activation observer (calibration={spec.calibration!r}) was "
      "never updated, so it has no range to quantize with; update it first (training "
      "mode / a mutable 'quant_stats' collection, or jaxq calibration)" + hint)


def observed_qparams(state: dict, spec: QuantSpec, path: str, *,
                     known_unobserved: bool = False, hint: str = ""):
  """``(scale, zero_point)`` of the observer ``state`` of the layer at ``path``
  (:func:`jaxq.calibration.observer_qparams`).

  Raises:
    ValueError: naming ``path``, when the observer was never updated: its count is
      concrete and zero somewhere, or ``known_unobserved`` (``hint`` is appended to the
      message). With a traced count and no such knowledge, never-observed slices get a
      NaN scale instead.
  """
  unobserved = never_observed(state)
  if unobserved or (unobserved is None and known_unobserved):
    raise unobserved_error(path, spec, hint)
  scale, zp = calibration.observer_qparams(state, spec)
  if unobserved is None:
    scale = jnp.where(state["n"] > 0, scale, jnp.nan)
  return scale, zp
