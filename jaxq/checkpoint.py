"""Checkpoints of quantized training and serving state: params (with ``jaxq_*`` steps),
quant_stats, optax state, step counters, int8/int4 serving variables (QArrays) -- any
pytree of arrays and scalars.

The state is serialized with :mod:`flax.serialization` (msgpack), which stores every
array's dtype, shape and bytes, so :func:`restore` gives back bitwise-identical arrays.
With a ``target`` of the same structure (e.g. the freshly initialised state),
``restore`` checks the structure, shapes and dtypes against it; without one it returns
nested dicts with QArrays rebuilt (they are self-describing, :mod:`jaxq.qarray`).
Writes are atomic (a temporary file renamed into place).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import numpy as np
from flax import serialization

from jaxq import qarray

PyTree = Any

__all__ = ["save", "restore"]


def _check_keys(state: PyTree) -> None:
  for leaf in jax.tree_util.tree_leaves(state):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype,
                                                             jax.dtypes.prng_key):
      raise TypeError("typed PRNG keys cannot be serialized; store "
                      "jax.random.key_data(key) instead")


def save(path: str | os.PathLike, state: PyTree) -> None:
  """Writes ``state`` to ``path`` (a file; parent directories are created)."""
  _check_keys(state)
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  data = serialization.to_bytes(jax.device_get(state))
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".jaxq-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _rebuild(tree):
  if isinstance(tree, dict):
    if tree.get(qarray.STATE_MARK):
      return qarray.qarray_from_state(tree)
    return {k: _rebuild(v) for k, v in tree.items()}
  return tree


def restore(path: str | os.PathLike, target: PyTree = None) -> PyTree:
  """Reads the state saved at ``path``, into the structure of ``target`` if given.

  Raises ValueError when the stored tree does not match ``target``'s structure, or an
  array's shape or dtype differs. Without ``target``: nested dicts, QArrays rebuilt.
  """
  with open(os.fspath(path), "rb") as f:
    data = f.read()
  raw = serialization.msgpack_restore(data)
  if target is None:
    return _rebuild(raw)
  want = serialization.to_state_dict(target)
  r_def = jax.tree_util.tree_structure(raw)
  t_def = jax.tree_util.tree_structure(want)
  if r_def != t_def:
    raise ValueError(f"checkpoint structure {r_def} does not match target {t_def}")
  restored = serialization.from_state_dict(target, raw)
  t_leaves = jax.tree_util.tree_leaves(target)
  r_leaves = jax.tree_util.tree_leaves(restored)
  for i, (t, r) in enumerate(zip(t_leaves, r_leaves)):
    td, rd = np.asarray(t).dtype, np.asarray(r).dtype
    if np.shape(t) != np.shape(r) or td != rd:
      raise ValueError(f"checkpoint leaf {i}: shape/dtype {np.shape(r)}/{rd} does not match "
                       f"target {np.shape(t)}/{td}")
  return jax.tree_util.tree_map(
      lambda t, r: jax.numpy.asarray(r) if isinstance(t, jax.Array) else r, target, restored)
