"""The arguments of a method call made into a function of its arrays, for the Flax glue of
:mod:`jaxq.act` (:mod:`jaxq.act.nnx`; the same split :mod:`jaxq.act.linen` does): arrays
are the region's arguments (floating-point positional ones are the activation inputs,
saved compressed), everything else is static.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["split_arrays", "resolve_method"]


def split_arrays(args: Sequence[Any], kwargs: Mapping[str, Any]):
  """Splits a call's arguments into its arrays and the rest (static).

  Returns ``(arrays, act_positions, rebuild)``: the array leaves of ``(args, kwargs)``
  in order, the indices (into ``arrays``) of the floating-point arrays among the
  positional arguments (the activation inputs), and ``rebuild(arrays) -> (args,
  kwargs)``, which puts (new) arrays back in place of the old ones.
  """
  leaves, treedef = jax.tree_util.tree_flatten((tuple(args), dict(kwargs)))
  dyn = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))]
  n_pos = len(jax.tree_util.tree_leaves(tuple(args)))
  act = [j for j, i in enumerate(dyn)
         if i < n_pos and jnp.issubdtype(leaves[i].dtype, jnp.floating)]

  def rebuild(arrays):
    full = list(leaves)
    for i, v in zip(dyn, arrays):
      full[i] = v
    return jax.tree_util.tree_unflatten(treedef, full)

  return [leaves[i] for i in dyn], act, rebuild


def resolve_method(module: Any, method: str | Callable[..., Any]) -> Callable[..., Any]:
  """The unbound function a compressed call runs: ``type(module).<method>`` for a name,
  else the function itself (a bound method's ``__func__``)."""
  if isinstance(method, str):
    fn = getattr(type(module), method, None)
    if fn is None or not callable(fn):
      raise ValueError(f"method={method!r} is not a method of {type(module).__name__}")
    return fn
  if not callable(method):
    raise TypeError(f"method must be a method name or an unbound function, got {method!r}")
  return getattr(method, "__func__", method)
