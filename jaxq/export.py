"""Shipping a converted model: int8 checkpoints and a serialized serving function.

* Checkpoints. :func:`to_bytes` / :func:`from_bytes` (and :func:`save` / :func:`load` for
  files) serialize a variables tree holding :class:`~jaxq.qarray.QArray` leaves with
  :mod:`flax.serialization` (msgpack). A QArray is stored as its integer values, scales
  and zero points (dtypes and bytes as they are: bit-exact) plus its static metadata
  (spec, logical shape, dtype, group axis), so a checkpoint is self-describing:
  :func:`from_bytes` needs no target tree. Importing this module also registers QArray
  with ``flax.serialization``, so ``flax.serialization.to_bytes`` / ``from_bytes(target,
  ...)`` (and :mod:`jaxq.checkpoint`) handle QArrays.
* Serving function. :func:`export_serving` traces ``serving_model.apply`` with
  :func:`jax.export.export` for given example arguments; the result's ``serialize()``
  bytes reload with :func:`load_serving` (``jax.export.deserialize``) and run with
  ``exported.call(serving_variables, *args, **kwargs)``, giving identical outputs. QArray
  is registered for ``jax.export`` pytree serialization under the name "jaxq.QArray".
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import serialization

from jaxq.qarray import QArray
from jaxq.spec import QuantSpec

__all__ = ["to_bytes", "from_bytes", "save", "load", "export_serving", "load_serving",
           "qarray_to_state", "qarray_from_state"]

_MARK = "__jaxq_qarray__"


def _meta(q: QArray) -> dict:
  return {"spec": dataclasses.asdict(q.spec), "shape": list(q.shape),
          "dtype": np.dtype(q.dtype).name, "group_axis": int(q.group_axis)}


def _from_meta(meta: Mapping) -> dict:
  spec = dict(meta["spec"])
  return {"spec": QuantSpec(**spec), "shape": tuple(int(d) for d in meta["shape"]),
          "dtype": np.dtype(meta["dtype"]), "group_axis": int(meta["group_axis"])}


def qarray_to_state(q: QArray) -> dict:
  """A QArray as a msgpack-able dict: arrays plus metadata."""
  return {_MARK: True, "values": q.values, "scale": q.scale, "zero_point": q.zero_point,
          "meta": _meta(q)}


def qarray_from_state(state: Mapping) -> QArray:
  """Inverse of :func:`qarray_to_state`."""
  missing = {"values", "scale", "zero_point", "meta"} - set(state)
  if missing:
    raise ValueError(f"not a serialized QArray: missing {sorted(missing)}")
  return QArray(state["values"], state["scale"], state["zero_point"],
                **_from_meta(state["meta"]))


def _flax_from_state(target: QArray, state: Mapping) -> QArray:
  del target  # the state is self-describing
  return qarray_from_state(state)


serialization.register_serialization_state(QArray, qarray_to_state, _flax_from_state,
                                           override=True)


def _aux_to_bytes(aux) -> bytes:
  spec, shape, dtype, group_axis = aux
  return json.dumps({"spec": dataclasses.asdict(spec), "shape": list(shape),
                     "dtype": np.dtype(dtype).name, "group_axis": int(group_axis)}).encode()


def _aux_from_bytes(data: bytes):
  m = _from_meta(json.loads(data.decode()))
  return (m["spec"], m["shape"], m["dtype"], m["group_axis"])


try:
  jax.export.register_pytree_node_serialization(
      QArray, serialized_name="jaxq.QArray", serialize_auxdata=_aux_to_bytes,
      deserialize_auxdata=_aux_from_bytes)
except ValueError:  # already registered (module reloaded)
  pass


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def _rebuild(tree):
  if isinstance(tree, Mapping):
    if tree.get(_MARK):
      return qarray_from_state(tree)
    return {k: _rebuild(v) for k, v in tree.items()}
  return tree


def to_bytes(tree: Any) -> bytes:
  """msgpack bytes of a variables tree (QArrays included, bit-exact)."""
  return serialization.to_bytes(jax.device_get(tree))


def from_bytes(data: bytes, target: Any = None) -> Any:
  """The tree stored by :func:`to_bytes`; with ``target``, restored into its structure
  (``flax.serialization.from_bytes``), else as nested dicts with QArrays rebuilt."""
  if target is not None:
    return serialization.from_bytes(target, data)
  return _rebuild(serialization.msgpack_restore(data))


def save(path: str | os.PathLike, tree: Any) -> None:
  """Writes :func:`to_bytes` of ``tree`` to ``path`` atomically."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".jaxq-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(to_bytes(tree))
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load(path: str | os.PathLike, target: Any = None) -> Any:
  """Reads a tree written by :func:`save` (see :func:`from_bytes`)."""
  with open(os.fspath(path), "rb") as f:
    return from_bytes(f.read(), target)


# --------------------------------------------------------------------------------------
# Serving function
# --------------------------------------------------------------------------------------


def export_serving(serving_model, serving_variables, *args,
                   platforms: Sequence[str] | None = None, **kwargs) -> jax.export.Exported:
  """``jax.export`` of ``serving_model.apply`` for these example arguments.

  The exported function takes ``(serving_variables, *args, **kwargs)`` with the shapes
  and dtypes of the examples (``jax.ShapeDtypeStruct``s, symbolic shapes included, may
  stand for arrays). ``platforms`` (e.g. ``("cpu", "cuda")``) defaults to the current
  backend. Serialize with ``.serialize()``; reload with :func:`load_serving`.
  """
  fn = jax.jit(lambda v, *a, **k: serving_model.apply(v, *a, **k))
  return jax.export.export(fn, platforms=platforms)(serving_variables, *args, **kwargs)


def load_serving(data: bytes | bytearray) -> jax.export.Exported:
  """``jax.export.deserialize`` of :func:`export_serving`'s serialized bytes; run it with
  ``exported.call(serving_variables, *args, **kwargs)``."""
  return jax.export.deserialize(bytearray(data))
