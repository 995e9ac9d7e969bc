"""A converted model's serving function, serialized with ``jax.export``.

:func:`export_serving` traces ``serving_model.apply`` with :func:`jax.export.export` for
given example arguments; the result's ``serialize()`` bytes reload with
:func:`load_serving` (``jax.export.deserialize``) and run with
``exported.call(serving_variables, *args, **kwargs)``, giving identical outputs. (QArray
is registered for ``jax.export`` pytree serialization by :mod:`jaxq.qarray`; int8
checkpoints of the serving variables are :mod:`jaxq.checkpoint`'s.)

Flax NNX: ``export_serving(serving_model, nnx.state(serving_model), *args)`` exports a
call of the NNX serving model (:func:`jaxq.nnx.convert`) whose state is an argument; the
exported function takes that state as :func:`serving_state` gives it (nested dicts of its
values with string keys, which ``jax.export`` can serialize):
``exported.call(serving_state(serving_model), *args, **kwargs)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from jaxq import qarray  # noqa: F401  (registers QArray with jax.export)
from jaxq.flax.batches import split_static_kwargs

__all__ = ["export_serving", "load_serving", "serving_state"]


# --------------------------------------------------------------------------------------
# Serving function
# --------------------------------------------------------------------------------------


def export_serving(serving_model, serving_variables, *args,
                   platforms: Sequence[str] | None = None, **kwargs) -> jax.export.Exported:
  """``jax.export`` of ``serving_model.apply`` for these example arguments.

  ``serving_model`` is a Linen serving model (:func:`jaxq.flax.ptq.convert`) with its
  variables, or an NNX one with its ``nnx.State`` (see the module docstring).

  The exported function takes ``(serving_variables, *args, **kwargs)`` with the shapes
  and dtypes of the examples (``jax.ShapeDtypeStruct``s, symbolic shapes included, may
  stand for arrays). Keyword arguments that are Python scalars, strings or None (e.g.
  ``train=False``) are static: fixed in the exported function, not passed to ``call``.
  ``platforms`` (e.g. ``("cpu", "cuda")``) defaults to the current backend. Serialize
  with ``.serialize()``; reload with :func:`load_serving`.
  """
  static, arrays = split_static_kwargs(kwargs)
  if isinstance(serving_model, nnx.Module):
    graphdef, template = nnx.split(serving_model)
    template = nnx.to_pure_dict(template)
    serving_variables = serving_state(serving_variables)
    fn = jax.jit(lambda v, *a, **k: nnx.merge(graphdef, _keyed_like(template, v))(
        *a, **k, **dict(static)))
  else:
    fn = jax.jit(lambda v, *a, **k: serving_model.apply(v, *a, **k, **dict(static)))
  return jax.export.export(fn, platforms=platforms)(serving_variables, *args, **arrays)


def serving_state(state) -> dict:
  """The state of an NNX serving model (an ``nnx.State``, or the model) as the function
  exported by :func:`export_serving` takes it: nested dicts of its values, keys as
  strings (``nnx.List`` indices too)."""
  if isinstance(state, nnx.Module):
    state = nnx.state(state)
  if isinstance(state, nnx.State):
    state = nnx.to_pure_dict(state)
  if isinstance(state, dict):
    return {str(k): serving_state(v) for k, v in state.items()}
  return state


def _keyed_like(template, values):
  """``values`` (string keys) with the keys of ``template`` (e.g. list indices)."""
  if isinstance(template, dict):
    return {k: _keyed_like(t, values[str(k)]) for k, t in template.items()}
  return values


def load_serving(data: bytes | bytearray) -> jax.export.Exported:
  """``jax.export.deserialize`` of :func:`export_serving`'s serialized bytes; run it with
  ``exported.call(serving_variables, *args, **kwargs)``."""
  return jax.export.deserialize(bytearray(data))
