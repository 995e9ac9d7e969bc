"""A converted model's serving function, serialized with ``jax.export``.

:func:`export_serving` traces ``serving_model.apply`` with :func:`jax.export.export` for
given example arguments; the result's ``serialize()`` bytes reload with
:func:`load_serving` (``jax.export.deserialize``) and run with
``exported.call(serving_variables, *args, **kwargs)``, giving identical outputs. (QArray
is registered for ``jax.export`` pytree serialization by :mod:`jaxq.qarray`; int8
checkpoints of the serving variables are :mod:`jaxq.checkpoint`'s.)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from jaxq import qarray  # noqa: F401  (registers QArray with jax.export)
from jaxq.flax.ptq import split_static_kwargs

__all__ = ["export_serving", "load_serving"]


# --------------------------------------------------------------------------------------
# Serving function
# --------------------------------------------------------------------------------------


def export_serving(serving_model, serving_variables, *args,
                   platforms: Sequence[str] | None = None, **kwargs) -> jax.export.Exported:
  """``jax.export`` of ``serving_model.apply`` for these example arguments.

  The exported function takes ``(serving_variables, *args, **kwargs)`` with the shapes
  and dtypes of the examples (``jax.ShapeDtypeStruct``s, symbolic shapes included, may
  stand for arrays). Keyword arguments that are Python scalars, strings or None (e.g.
  ``train=False``) are static: fixed in the exported function, not passed to ``call``.
  ``platforms`` (e.g. ``("cpu", "cuda")``) defaults to the current backend. Serialize
  with ``.serialize()``; reload with :func:`load_serving`.
  """
  static, arrays = split_static_kwargs(kwargs)
  fn = jax.jit(lambda v, *a, **k: serving_model.apply(v, *a, **k, **dict(static)))
  return jax.export.export(fn, platforms=platforms)(serving_variables, *args, **arrays)


def load_serving(data: bytes | bytearray) -> jax.export.Exported:
  """``jax.export.deserialize`` of :func:`export_serving`'s serialized bytes; run it with
  ``exported.call(serving_variables, *args, **kwargs)``."""
  return jax.export.deserialize(bytearray(data))
