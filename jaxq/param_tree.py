"""Which leaves of a parameter tree are weights, and how they are laid out.

The params-tree API (:func:`jaxq.quantize_params`), LoRA (:mod:`jaxq.lora`), the Flax
adapters and the mesh layouts (:mod:`jaxq.mesh`) read a params tree the same way:

* a leaf's *module path* is the "/"-joined path of the keys of the dict that holds it
  (:func:`key_name` turns one ``jax.tree_util`` path entry into a string);
* its *role* comes from its name (:func:`leaf_role`): ``"kernel"`` / ``"embedding"``
  always, ``"bias"`` / ``"scale"`` / ``jaxq_*`` never, other names at rank >= 2;
* a kernel's output axes are its bias' shape when it ends in it (:func:`output_axes`),
  and a kernel ``(L, ..., out)`` with a bias ``(L, out)`` looks stacked
  (:func:`looks_stacked`; ``nn.scan`` / ``nnx.vmap``), handled layer by layer with
  :func:`per_layer`.

:func:`matched_leaves` applies a rule set to a tree and returns the weights it quantizes.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxq.spec import QuantSpec, Rule, match_rule

PyTree = Any

__all__ = ["FLOAT_NAMES", "WeightLeaf", "key_name", "leaf_group_axis", "leaf_role",
           "looks_stacked", "matched_leaves", "output_axes", "per_layer", "tree_get"]


def key_name(k) -> str:
  """The string of one ``jax.tree_util`` path entry (dict key, attribute or index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def tree_get(tree, keys):
  """The node of a nested mapping at ``keys``, or None where the path is missing."""
  node = tree
  for k in keys:
    if not isinstance(node, Mapping) or k not in node:
      return None
    node = node[k]
  return node


def per_layer(fn, stack: int):
  """``fn`` mapped over ``stack`` leading stacking axes of all its arguments."""
  for _ in range(stack):
    fn = jax.vmap(fn)
  return fn


def leaf_group_axis(name: str, ndim: int) -> int:
  """The contraction axis of a weight leaf: ``-1`` for ``"embedding"``, else ``-2``."""
  return ndim - 1 if name == "embedding" else ndim - 2


#: Leaf names that are never quantized: biases and norm scales (jaxq's own ``jaxq_*``
#: entries neither).
FLOAT_NAMES = ("bias", "scale")


def leaf_role(name: str, ndim: int) -> str | None:
  """How :func:`quantize_params` treats a leaf of a matched module (module docstring).

  ``"kernel"`` and ``"embedding"`` by name (quantized whatever their rank), None (kept in
  float) for ``"bias"``, ``"scale"`` and ``jaxq_*``, and for any other name ``"other"``
  when ``ndim >= 2`` (``ndim`` without stacking axes), else None.
  """
  if name in FLOAT_NAMES or name.startswith("jaxq_"):
    return None
  if name in ("kernel", "embedding"):
    return name
  return "other" if ndim >= 2 else None


class WeightLeaf(NamedTuple):
  """A weight leaf that a rule quantizes."""

  index: int          # in the flattened tree
  keys: tuple[str, ...]
  module_path: str
  name: str
  leaf: jax.Array
  spec: QuantSpec
  stack: int          # leading stacking axes
  n_out: int          # output axes of a kernel (0 for other roles)

  @property
  def where(self) -> str:
    return "/".join(self.keys)

  @property
  def layer_shape(self) -> tuple[int, ...]:
    return tuple(jnp.shape(self.leaf))[self.stack:]


def output_axes(kernel_shape, bias_shape) -> int:
  """Output axes of a kernel: those of its bias when the kernel ends in its shape, else 1."""
  if bias_shape is not None and 1 <= len(bias_shape) < len(kernel_shape) and tuple(
      kernel_shape[len(kernel_shape) - len(bias_shape):]) == tuple(bias_shape):
    return len(bias_shape)
  return 1


def looks_stacked(kernel_shape, bias_shape) -> bool:
  """A bias ``(L, out)`` that the kernel ``(L, ..., out)`` starts with but does not end in."""
  return (bias_shape is not None and len(bias_shape) >= 2
          and output_axes(kernel_shape, bias_shape) == 1
          and kernel_shape[-1] == bias_shape[-1]
          and kernel_shape[:len(bias_shape) - 1] == tuple(bias_shape[:-1]))


def matched_leaves(params: PyTree, rules: tuple[Rule, ...], stacked: str | None = None):
  """``(flat, treedef, leaves)``: the flattened tree and every quantized :class:`WeightLeaf`."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
  named = []
  for path, leaf in flat:
    keys = tuple(key_name(k) for k in path)
    shapes[keys] = tuple(jnp.shape(leaf))
    named.append(keys)
  out = []
  for i, ((_, leaf), keys) in enumerate(zip(flat, named)):
    if not keys:
      continue
    module_path = "/".join(keys[:-1])
    rule = match_rule(rules, module_path)
    if rule is None or rule.weight is None:
      continue
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      continue
    stack = int(stacked is not None and re.fullmatch(stacked, module_path) is not None)
    ndim = jnp.ndim(leaf) - stack
    role = leaf_role(keys[-1], ndim)
    if role is None:
      continue
    where = "/".join(keys)
    if ndim < 2:
      raise ValueError(
          f"weight '{where}' of shape {tuple(jnp.shape(leaf))}: a {role!r} leaf "
          f"{'of a stacked module ' if stack else ''}is quantized and needs rank >= 2 "
          f"{'after its stacking axis ' if stack else ''}(a {role} has Flax layout "
          f"{'(..., in, out)' if role == 'kernel' else '(vocab, dim)'}); exclude module "
          f"'{module_path}' with Rule(path=..., weight=None) if it is not one")
    n_out = 0
    if role == "kernel":
      bias = shapes.get(keys[:-1] + ("bias",))
      n_out = output_axes(tuple(jnp.shape(leaf))[stack:],
                           None if bias is None else bias[stack:])
      if not stack and looks_stacked(tuple(jnp.shape(leaf)), bias):
        warnings.warn(
            f"weight '{where}' of shape {tuple(jnp.shape(leaf))} with a bias of shape "
            f"{bias} looks like a stacked layer (nn.scan / nnx.vmap): its leading axis is "
            f"pooled into its scales unless quantize_params gets stacked= matching "
            f"'{module_path}'", UserWarning, stacklevel=3)
    out.append(WeightLeaf(i, keys, module_path, keys[-1], leaf, rule.weight, stack, n_out))
  return flat, treedef, out
