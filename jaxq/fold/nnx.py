"""BatchNorm folding for Flax NNX models: thin adapters over :mod:`jaxq.fold.batchnorm`.

* :func:`find_conv_bn_pairs_nnx` traces one call of the model (``jax.eval_shape`` on a
  copy: nothing is computed, the model is not touched) and pairs each ``nnx.BatchNorm``
  with the ``nnx.Conv`` / ``nnx.Linear`` whose output array it receives, as
  :func:`jaxq.fold.find_conv_bn_pairs` does for Linen. Layers run by ``nnx.scan`` /
  ``nnx.vmap`` (stacked) are followed into the loop body.
* :func:`fold_batchnorm_nnx` folds the pairs with :func:`jaxq.fold.fold_batchnorm` on the
  pure dicts of ``nnx.state(model, nnx.Param)`` and ``nnx.state(model, nnx.BatchStat)``,
  writes the folded kernel and bias into the layer (a layer built with
  ``use_bias=False`` gets a bias) and puts a :class:`FoldedIdentity` where each
  BatchNorm was. This is static folding (Nagel et al. 2021, sec. 4.2): the folded
  BatchNorm is the identity in training as in evaluation mode, so QAT
  (:func:`jaxq.nnx.quantize_model`) trains the folded weights.

Cross-layer equalization needs no adapter: :func:`jaxq.fold.find_equalization_pairs` and
:func:`jaxq.fold.equalize` work on the params pure dict (example: :mod:`jaxq.fold`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, MutableMapping, MutableSequence, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxq.flax.nnx import quantized_layers
from jaxq.fold.batchnorm import abstract_call, fold_batchnorm
from jaxq.fold.tree import layer_at, mutable_copy, set_entry, split_path

__all__ = ["FoldedIdentity", "find_conv_bn_pairs_nnx", "fold_batchnorm_nnx"]

#: Layers a BatchNorm folds into: kernel ``(..., out)``, output channels last.
FOLDABLE = (nnx.Conv, nnx.Linear)
_PATH = "jaxq_fold_path"  # attribute naming a module's path on the traced copy


class FoldedIdentity(nnx.Module):
  """What :func:`fold_batchnorm_nnx` leaves where an ``nnx.BatchNorm`` was.

  Returns its input (training and evaluation mode alike: the BatchNorm's affine map now
  lives in the layer ``folded_into``), cast to the dtype the BatchNorm returned: its
  ``dtype``, else the promotion of the input's with its variables' ``stats_dtype``.
  """

  def __init__(self, folded_into: str, dtype: Any, stats_dtype: Any):
    self.folded_into = folded_into
    self.dtype = dtype
    self.stats_dtype = jnp.dtype(stats_dtype)

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    del use_running_average, mask  # a folded BatchNorm has no statistics left to use
    return jnp.asarray(x, self.dtype or jnp.result_type(x, self.stats_dtype))


# ---------------------------------------------------------------------------------------
# Finding the pairs
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _Call:
  """One module call of the traced model (kept alive so that ``id`` stays unique)."""

  path: str
  kind: str  # the module's class name
  module: nnx.Module
  inputs: tuple
  output: Any


def _recording_class(base: type, calls: list[_Call]) -> type:
  """A subclass of ``base`` whose ``__call__`` records each call in ``calls``."""

  def __call__(self, *args, **kwargs):  # pylint: disable=invalid-name
    out = base.__call__(self, *args, **kwargs)
    calls.append(_Call(getattr(self, _PATH), base.__name__, self,
                       args + tuple(kwargs.values()), out))
    return out

  return type(f"Traced{base.__name__}", (base,),
              {"__call__": __call__, "__module__": base.__module__})


def _trace_calls(model: nnx.Module, *args, **kwargs) -> list[_Call]:
  """The module calls of ``model(*args, **kwargs)``, innermost first, traced abstractly.

  Runs on a merged copy of ``model`` inside ``jax.eval_shape`` (array arguments traced,
  others static), whose callable modules get a recording subclass and their path. The
  path and the class travel in the graph, so calls inside ``nnx.scan`` / ``nnx.vmap``
  bodies are recorded under the path of the (stacked) module.
  """
  graphdef, state = nnx.split(model)
  calls: list[_Call] = []

  def run(state, *a, **k):
    copy = nnx.merge(graphdef, state)
    classes: dict[type, type] = {}
    for path, module in nnx.iter_modules(copy):
      if callable(module):
        setattr(module, _PATH, "/".join(map(str, path)))
        base = type(module)
        if base not in classes:
          classes[base] = _recording_class(base, calls)
        # Class assignment on a private copy; nnx has no method interceptor.
        module.__class__ = classes[base]
    return copy(*a, **k)

  abstract_call(run, state, *args, **kwargs)
  return calls


def _contains(outer: str, inner: str) -> bool:
  """Whether module path ``inner`` lies inside module path ``outer`` (not equal)."""
  return outer != inner and (outer == "" or inner.startswith(outer + "/"))


def _problem(bn: _Call, producers: dict, consumers: dict, counts: dict) -> str | None:
  """Why the BatchNorm call ``bn`` cannot be folded, or None: see find_conv_bn_pairs_nnx."""
  x = bn.inputs[0]
  src = producers.get(id(x))
  if counts[bn.path] > 1:
    return f"it is called {counts[bn.path]} times"
  axes = bn.module.axis if isinstance(bn.module.axis, Sequence) else (bn.module.axis,)
  if tuple(a % jnp.ndim(x) for a in axes) != (jnp.ndim(x) - 1,):
    return f"it normalizes axis {bn.module.axis!r}, not the last (channel) axis"
  if src is None:
    return ("its input is not the output of a module (plain jax code made it, e.g. an "
            "activation or a residual sum, or it is the model's input)")
  if not isinstance(src.module, FOLDABLE):
    return (f"its input is the output of {src.path!r} ({src.kind}), not of an nnx.Conv "
            "or nnx.Linear")
  if counts[src.path] > 1:
    return f"its input layer {src.path!r} is called {counts[src.path]} times"
  users = consumers[id(x)]
  # A container that hands the array on to its children (nnx.Sequential) is no user.
  others = sorted({u.path for u in users if u is not bn and
                   not any(_contains(u.path, v.path) for v in users)})
  if others:
    return f"the output of {src.path!r} also feeds {', '.join(map(repr, others))}"
  return None


def find_conv_bn_pairs_nnx(model: nnx.Module, *args, unfoldable: str = "raise",
                           **kwargs) -> list[tuple[str, str]]:
  """The ``(layer_path, bn_path)`` pairs of an NNX model, found by tracing one call.

  ``model(*args, **kwargs)`` runs abstractly on a copy (arrays or
  ``jax.ShapeDtypeStruct`` traced, other arguments static; the model and its mode are
  untouched). A pair is an ``nnx.Conv`` or ``nnx.Linear`` whose output array is passed
  *directly* to an ``nnx.BatchNorm`` normalizing the last axis, and to no other module
  (containers such as ``nnx.Sequential`` that only hand it on do not count), each called
  once. Paths are "/"-joined attribute paths, as in the pure dicts of ``nnx.state``
  (list entries by index: ``"layers/0"``). An output also consumed by plain jnp code
  (e.g. a residual sum) cannot be seen here; do not fold such a pair.

  Args:
    model: a ``flax.nnx.Module``.
    *args: the model's arguments.
    unfoldable: "raise" (default): a ValueError naming every called BatchNorm that is not
      part of a pair, and why (its input comes from an activation, a sum or another kind
      of layer, the layer's output also feeds another module, a layer or BatchNorm
      called several times, a feature axis that is not the last); "skip": leave them out.
    **kwargs: the model's keyword arguments.

  Returns:
    The pairs, in the order the BatchNorms are called.
  """
  if unfoldable not in ("raise", "skip"):
    raise ValueError(f"unfoldable must be 'raise' or 'skip'; got {unfoldable!r}")
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be a flax.nnx.Module; got {type(model).__name__}")
  calls = _trace_calls(model, *args, **kwargs)
  producers: dict[int, _Call] = {}
  consumers: dict[int, list[_Call]] = {}
  counts: dict[str, int] = {}
  for call in calls:  # innermost first: a layer is the producer, not its container
    producers.setdefault(id(call.output), call)
    counts[call.path] = counts.get(call.path, 0) + 1
    for a in call.inputs:
      consumers.setdefault(id(a), []).append(call)
  pairs, problems, seen = [], [], set()
  for call in calls:
    if not isinstance(call.module, nnx.BatchNorm) or call.path in seen:
      continue
    seen.add(call.path)
    problem = _problem(call, producers, consumers, counts)
    if problem is None:
      pairs.append((producers[id(call.inputs[0])].path, call.path))
    else:
      problems.append(f"{call.path!r}: {problem}")
  if problems and unfoldable == "raise":
    raise ValueError("cannot fold these nnx.BatchNorm layers into the layer before them "
                     "(pass unfoldable='skip' to leave them unfolded):\n  "
                     + "\n  ".join(problems))
  return pairs


# ---------------------------------------------------------------------------------------
# Folding
# ---------------------------------------------------------------------------------------


def _child(node, key: str):
  return node[int(key)] if isinstance(node, Sequence) else (
      node[key] if isinstance(node, Mapping) else getattr(node, key))


def _module_at(model: nnx.Module, path: str, types: tuple[type, ...], what: str):
  node = model
  try:
    for key in split_path(path):
      node = _child(node, key)
  except (AttributeError, KeyError, IndexError, TypeError, ValueError):
    raise ValueError(f"the model has no module at {path!r}") from None
  if not isinstance(node, types):
    raise ValueError(f"{path!r} is a {type(node).__name__}, not an {what}")
  return node


def _replace(model: nnx.Module, path: str, new: nnx.Module) -> None:
  *parent_keys, key = split_path(path)
  parent = model
  for k in parent_keys:
    parent = _child(parent, k)
  if isinstance(parent, MutableSequence):
    parent[int(key)] = new
  elif isinstance(parent, MutableMapping):
    parent[key] = new
  else:
    setattr(parent, key, new)


def fold_batchnorm_nnx(model: nnx.Module, pairs: Iterable[tuple[str, str]], *,
                       inplace: bool = False) -> nnx.Module:
  """Folds each ``nnx.BatchNorm`` into the ``nnx.Conv`` / ``nnx.Linear`` before it.

  Args:
    model: a ``flax.nnx.Module``.
    pairs: ``(layer_path, bn_path)`` pairs, e.g. from :func:`find_conv_bn_pairs_nnx`.
    inplace: fold ``model`` itself instead of a copy (``nnx.clone``).

  Returns:
    The model with each layer's kernel and bias folded (:func:`jaxq.fold.fold_conv_bn`
    with the BatchNorm's ``epsilon``; a layer without a bias gets one, ``use_bias=True``)
    and each BatchNorm replaced by a :class:`FoldedIdentity`: in evaluation mode it
    computes the original's function (to float32 rounding), in training mode too (no
    batch statistics). Stacked layers (leading axes on kernel and statistics) fold
    layer by layer.

  Raises:
    ValueError: naming the path, for a path with no module or a module of the wrong
      type, a layer already quantized by :func:`jaxq.nnx.quantize_model` (fold first),
      or a layer or BatchNorm in more than one pair; the model is then unchanged.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be a flax.nnx.Module; got {type(model).__name__}")
  pairs = [tuple(p) for p in pairs]
  for pair in pairs:
    if len(pair) != 2:
      raise ValueError(f"pairs must hold (layer_path, bn_path) tuples; got {pair!r}")
  if not inplace:
    model = nnx.clone(model)
  quantized = quantized_layers(model)
  for layer_path, _ in pairs:
    if layer_path in quantized:
      raise ValueError(f"{layer_path!r} is already quantized: fold before "
                       "jaxq.nnx.quantize_model (its quantizer state follows the kernel)")
  found = [(_module_at(model, lp, FOLDABLE, "nnx.Conv or nnx.Linear"),
            _module_at(model, bp, (nnx.BatchNorm,), "nnx.BatchNorm")) for lp, bp in pairs]
  params = mutable_copy(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  for (layer_path, _), (layer, bn) in zip(pairs, found):
    if layer.bias is None:  # the folded bias goes to the layer: give it a zero one
      set_entry(params, layer_path, "bias",
                jnp.zeros(jnp.shape(bn.mean.get_value()), layer.param_dtype))
  params, _ = fold_batchnorm(params, stats, pairs,
                             eps={bp: bn.epsilon for (_, bp), (_, bn) in zip(pairs, found)})
  for (layer_path, bn_path), (layer, bn) in zip(pairs, found):
    folded = layer_at(params, layer_path, "params")
    layer.kernel.set_value(folded["kernel"])
    if layer.bias is None:
      layer.bias = nnx.Param(folded["bias"])
      layer.use_bias = True
    else:
      layer.bias.set_value(folded["bias"])
    bn_vars = jax.tree.leaves(nnx.state(bn))
    _replace(model, bn_path, FoldedIdentity(layer_path, bn.dtype, jnp.result_type(*bn_vars)))
  return model
