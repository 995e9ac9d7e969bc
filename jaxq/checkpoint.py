"""Checkpoints of quantized training and serving state: params (with ``jaxq_*`` steps),
quant_stats, optax state, step counters, int8/int4 serving variables (QArrays) -- any
pytree of arrays and scalars.

The state is serialized with :mod:`flax.serialization` (msgpack), which stores every
array's dtype, shape and bytes, so :func:`restore` gives back bitwise-identical arrays.
With a ``target`` of the same structure (e.g. the freshly initialised state),
``restore`` checks the structure, shapes and dtypes against it; without one it returns
nested dicts with QArrays rebuilt (they are self-describing, :mod:`jaxq.qarray`). Every
QArray's metadata is checked against its arrays. Errors name the key path and what was
expected.
Writes are atomic (a temporary file renamed into place).

Flax NNX: an ``nnx.State`` or an ``nnx.Module`` (anywhere in ``state``, e.g. the serving
model of :func:`jaxq.nnx.convert`) is stored as its values (``nnx.to_pure_dict``: nested
dicts, QArrays kept, RNG keys as their raw data). Restoring into a ``target``
``nnx.State`` gives an ``nnx.State``; into an ``nnx.Module``, a new module (the target's
graph, the stored values, RNG keys rewrapped); the target itself is not modified.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import numpy as np
from flax import nnx
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


def _is_nnx(x) -> bool:
  return isinstance(x, (nnx.State, nnx.Module))


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _nnx_values(x) -> PyTree:
  """Nested dicts of the values of an NNX state or module (``nnx.to_pure_dict``)."""
  return nnx.to_pure_dict(nnx.state(x) if isinstance(x, nnx.Module) else x)


def _pure(x):
  """The stored form of an NNX state or module: its values, the raw data of its RNG
  keys (``nnx.Rngs``, Dropout streams)."""
  if not _is_nnx(x):
    return x
  return jax.tree_util.tree_map(lambda v: jax.random.key_data(v) if _is_key(v) else v,
                                _nnx_values(x))


def _as_target(target, values):
  """``values`` (the stored form of ``target``) in ``target``'s NNX type."""
  if not _is_nnx(target):
    return values
  values = jax.tree_util.tree_map(
      lambda t, v: jax.random.wrap_key_data(v, impl=jax.random.key_impl(t))
      if _is_key(t) else v, _nnx_values(target), values)
  if isinstance(target, nnx.Module):
    graphdef, _ = nnx.split(target)
    return nnx.merge(graphdef, values)
  state = jax.tree_util.tree_map(lambda v: v, target)
  nnx.replace_by_pure_dict(state, values)
  return state


def save(path: str | os.PathLike, state: PyTree) -> None:
  """Writes ``state`` to ``path`` (a file; parent directories are created)."""
  state = jax.tree_util.tree_map(_pure, state, is_leaf=_is_nnx)
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


def _key(path: tuple) -> str:
  return "/".join(map(str, path)) or "<root>"


def _rebuild(tree, path=()):
  if isinstance(tree, dict):
    if tree.get(qarray.STATE_MARK):
      try:
        return qarray.qarray_from_state(tree)
      except ValueError as e:
        raise ValueError(f"checkpoint entry '{_key(path)}': {e}") from None
    return {k: _rebuild(v, path + (k,)) for k, v in tree.items()}
  return tree


def _entries(tree, path=()):
  """``{key path: leaf or serialized QArray}`` of a state dict (empty dicts vanish)."""
  if isinstance(tree, dict) and not tree.get(qarray.STATE_MARK):
    out = {}
    for k, v in tree.items():
      out.update(_entries(v, path + (str(k),)))
    return out
  return {path: tree}


def _describe(node) -> str:
  if isinstance(node, dict):
    return f"a QArray of shape {tuple(node['meta']['shape'])}"
  return f"shape {np.shape(node)} and dtype {np.asarray(node).dtype}"


def _compare(stored, want) -> None:
  """ValueError naming the first key path where ``stored`` does not match ``want``."""
  have, need = _entries(stored), _entries(want)
  for p in need:
    if p not in have:
      raise ValueError(f"the target has '{_key(p)}' ({_describe(need[p])}), which the "
                       "checkpoint lacks")
  for p in have:
    if p not in need:
      raise ValueError(f"the checkpoint has '{_key(p)}', which the target lacks")
  for p, t in need.items():
    r = have[p]
    t_q, r_q = isinstance(t, dict), isinstance(r, dict)
    if t_q != r_q:
      raise ValueError(
          f"checkpoint entry '{_key(p)}' holds {'a QArray' if r_q else 'a plain array'}; "
          f"the target expects {'a QArray' if t_q else 'a plain array'}")
    if t_q:
      if r["meta"] != t["meta"]:
        raise ValueError(f"checkpoint entry '{_key(p)}': stored QArray metadata "
                         f"{r['meta']} differs from the target's {t['meta']}")
      pairs = [(f"{_key(p)}/{k}", r[k], t[k]) for k in ("values", "scale", "zero_point")]
    else:
      pairs = [(_key(p), r, t)]
    for key, rv, tv in pairs:
      rs, ts = np.shape(rv), np.shape(tv)
      rd, td = np.asarray(rv).dtype, np.asarray(tv).dtype
      if rs != ts or rd != td:
        raise ValueError(f"checkpoint entry '{key}' has shape {rs} and dtype {rd}; the "
                         f"target expects shape {ts} and dtype {td}")


def _read(path: str):
  with open(path, "rb") as f:
    data = f.read()
  try:
    raw = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises ExtraData, FormatError, ValueError, ...
    raise ValueError(f"{path}: not a jaxq checkpoint (msgpack cannot decode it: "
                     f"{type(e).__name__}: {e})") from None
  if not isinstance(raw, (dict, np.ndarray)):
    raise ValueError(f"{path}: not a jaxq checkpoint (it decodes to a "
                     f"{type(raw).__name__}, not a state dict)")
  return raw


def restore(path: str | os.PathLike, target: PyTree = None) -> PyTree:
  """Reads the state saved at ``path``, into the structure of ``target`` if given.

  Raises ValueError, naming the key path (e.g. ``params/Dense_0/kernel``) and what was
  expected, when the stored tree does not match ``target``'s structure, an array's
  shape or dtype differs, a QArray's metadata does not describe its arrays
  (:func:`jaxq.qarray.check_arrays`) or differs from the target's; and naming the file
  when it is not a checkpoint at all. Without ``target``: nested dicts, QArrays rebuilt.
  An ``nnx.State`` / ``nnx.Module`` target gives an ``nnx.State`` / a new module.
  """
  path = os.fspath(path)
  raw = _read(path)
  rebuilt = _rebuild(raw)  # checks every QArray's metadata against its arrays
  if target is None:
    return rebuilt
  pure = jax.tree_util.tree_map(_pure, target, is_leaf=_is_nnx)
  _compare(raw, serialization.to_state_dict(pure))
  restored = serialization.from_state_dict(pure, raw)
  restored = jax.tree_util.tree_map(
      lambda t, r: jax.numpy.asarray(r) if isinstance(t, jax.Array) else r, pure, restored)
  return jax.tree_util.tree_map(_as_target, target, restored, is_leaf=_is_nnx)
