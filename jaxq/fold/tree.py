"""Layers of a parameter tree named by "/"-joined paths.

A tree is nested dicts: Linen ``variables["params"]``, or the pure dict of an NNX state
(``nnx.to_pure_dict(nnx.state(model, nnx.Param))``, list entries keyed by int). A
layer is the dict at a path (e.g. ``"Conv_0"``, ``"block/conv"``, ``"layers/0"``) holding a
``"kernel"`` (Dense ``(in, out)``, Conv ``(*window, in / groups, out)``: output channels
on the last axis, input channels on the second to last) and optionally a ``"bias"``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def split_path(path: str) -> tuple[str, ...]:
  """``"a/b"`` -> ``("a", "b")``; a ValueError for anything but a non-empty string."""
  if not isinstance(path, str) or not path:
    raise ValueError(f"layer paths are non-empty '/'-joined strings; got {path!r}")
  return tuple(path.split("/"))


def _child(node, key: str, path: str, tree_name: str):
  if isinstance(node, Mapping):
    if key in node:
      return node[key]
    if key.isdigit() and int(key) in node:  # NNX pure dicts key list entries by int
      return node[int(key)]
  raise ValueError(f"{tree_name} has no entry {path!r} (missing {key!r})")


def layer_at(tree, path: str, tree_name: str) -> Mapping:
  """The dict of variables at ``path``; a ValueError naming ``tree_name`` and the path."""
  node = tree
  for key in split_path(path):
    node = _child(node, key, path, tree_name)
  if not isinstance(node, Mapping):
    raise ValueError(f"{tree_name}[{path!r}] is a leaf, not a layer's dict of variables")
  return node


def has_layer(tree, path: str) -> bool:
  try:
    layer_at(tree, path, "")
  except ValueError:
    return False
  return True


def mutable_copy(tree):
  """A mutable nested-dict copy of ``tree`` (FrozenDicts and Mappings become dicts)."""
  if isinstance(tree, Mapping):
    return {k: mutable_copy(v) for k, v in tree.items()}
  return tree


def set_entry(tree: dict, path: str, name: str, value) -> None:
  """``tree[path][name] = value`` in place (``tree`` from :func:`mutable_copy`)."""
  node = tree
  for key in split_path(path):
    if key not in node and key.isdigit() and int(key) in node:
      key = int(key)
    node = node[key]
  node[name] = value


def layer_kernel(layer: Mapping, path: str, tree_name: str) -> jax.Array:
  """The layer's ``"kernel"`` (rank >= 2), or a ValueError naming the path."""
  if "kernel" not in layer:
    raise ValueError(
        f"{tree_name}[{path!r}] has no 'kernel' (keys: {sorted(map(str, layer))}); "
        "only Dense/Conv-like layers (kernel with output channels last) are supported")
  kernel = jnp.asarray(layer["kernel"])
  if kernel.ndim < 2:
    raise ValueError(f"{tree_name}[{path!r}]['kernel'] must have rank >= 2; got shape "
                     f"{kernel.shape}")
  return kernel
