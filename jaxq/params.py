"""The params-tree API: fake-quantize the weights of any parameter pytree.

:func:`quantize_params` maps a parameter tree (Flax ``params``, a Haiku/Equinox-style
nested dict, anything whose path keys are dict keys, attributes or indices) to a tree of
the same structure in which the matched weight leaves are quantize-dequantized, with a
gradient estimator (STE, LSQ/LSQ+ or PACT) so that the float master weights keep
training::

  def loss_fn(params, qstate, x, y):
    qparams = jaxq.quantize_params(params, rules, qstate)
    return loss(model.apply({"params": qparams}, x), y)

  qstate = jaxq.init_qstate(params, rules)          # {} when no rule learns its step
  grads = jax.grad(loss_fn, argnums=(0, 1))(params, qstate, x, y)

Matching. A leaf's *module path* is the "/"-joined path of the keys of the module (the
dict) that holds it: ``params["encoder"]["layer_0"]["attention"]["query"]["kernel"]``
has module path ``"encoder/layer_0/attention/query"`` and leaf name ``"kernel"``; a leaf
at the top level has module path ``""``. Rules are matched (``re.fullmatch``, first
match wins, :func:`jaxq.spec.match_rule`) against the module path ONLY, never against
the leaf name, exactly as :func:`jaxq.flax.quantize_model` matches layer paths, so the
same rules drive both APIs. A matched rule's ``weight`` spec applies to every leaf of
rank >= 2 of that module (kernels, embeddings); leaves of rank < 2 (biases, norm scales)
are never quantized. ``rules=None`` means :data:`DEFAULT_RULES`: int8, symmetric, per
output channel (the last axis) for every leaf of rank >= 2.

Axes. ``granularity="channel"`` keeps ``spec.axis`` (default -1: the output channel of a
Dense kernel ``(in, out)`` and of a Conv kernel ``(kh, kw, in, out)``). With
``granularity="group"``, consecutive ``group_size`` elements along the contraction
(input) axis share a scale: axis ``-2`` of a kernel (Dense: 0; Conv: the input-channel
axis), and the feature axis ``-1`` of a leaf named ``"embedding"`` (``(vocab, dim)``,
contracted over ``dim`` by ``Embed.attend``); for an embedding use
``QuantSpec(granularity="group", axis=0, ...)`` to keep one scale per row and group.

Learnable state. ``estimator="lsq"`` (LSQ, Esser et al. 2020; LSQ+ when asymmetric,
Bhalgat et al. 2020) and ``estimator="pact"`` (Choi et al. 2018) need ``qstate``, made by
:func:`init_qstate`: a nested dict mirroring the matched leaves, e.g.
``qstate["Dense_0"]["kernel"] == {"scale": f32[1, out]}`` (LSQ; plus ``"zero_point"``
for LSQ+) or ``{"alpha": ...}`` (PACT). It is an ordinary pytree: optimise it with optax
alongside (or together with) the params, e.g. ``optax.adam`` on ``(params, qstate)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxq import estimators
from jaxq import quantizer
from jaxq.spec import QuantSpec, Rule, match_rule

PyTree = Any

#: int8, symmetric, per output channel (last axis) for every leaf of rank >= 2.
DEFAULT_RULES: tuple[Rule, ...] = (Rule(path=".*", weight=QuantSpec()),)

__all__ = ["DEFAULT_RULES", "quantize_params", "init_qstate", "leaf_group_axis",
           "init_weight_state", "fake_quantize_weight", "key_name", "check_rules"]


def key_name(k) -> str:
  """The string of one ``jax.tree_util`` path entry (dict key, attribute or index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def check_rules(rules: Rule | Sequence[Rule]) -> tuple[Rule, ...]:
  """``rules`` (a :class:`~jaxq.Rule` or a sequence of them, in match order) as a tuple.

  Raises TypeError for anything else: a string, an unordered collection (first match
  wins needs an order), a non-Rule entry.
  """
  if isinstance(rules, Rule):
    return (rules,)
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise TypeError(f"rules must be a jaxq.Rule or a sequence of them; got {rules!r}")
  rules = tuple(rules)
  for i, r in enumerate(rules):
    if not isinstance(r, Rule):
      raise TypeError(f"rules[{i}] must be a jaxq.Rule; got {type(r).__name__}")
  return rules


def _check_rules(rules) -> tuple[Rule, ...]:
  """:func:`check_rules`, with None meaning :data:`DEFAULT_RULES`."""
  return DEFAULT_RULES if rules is None else check_rules(rules)


def leaf_group_axis(name: str, ndim: int) -> int:
  """The contraction axis of a weight leaf: ``-1`` for ``"embedding"``, else ``-2``."""
  return ndim - 1 if name == "embedding" else ndim - 2


def _learnable(spec: QuantSpec | None) -> bool:
  return spec is not None and spec.scheme == "uniform" and spec.estimator in ("lsq", "pact")


def init_weight_state(w: jax.Array, spec: QuantSpec, group_axis: int) -> dict[str, jax.Array]:
  """Initial learnable state of one weight (or activation) quantizer, as plain arrays.

  LSQ, symmetric: ``scale = 2 mean|w| / sqrt(qmax)`` (Esser et al. 2020) over the
  elements that share a scale. LSQ+, asymmetric: ``scale`` and ``zero_point`` from the
  min-max range (Bhalgat et al. 2020 initialise the offset from the range). PACT:
  ``alpha`` = the maximum of ``w`` over the elements sharing it (nothing clipped at
  start), floored at the smallest scale. Shapes follow
  :func:`jaxq.quantizer.stat_shape`.
  """
  w = jax.lax.stop_gradient(jnp.asarray(w, jnp.float32))
  if spec.estimator == "pact":
    scale, _ = quantizer.compute_qparams(w, spec, group_axis=group_axis)
    return {"alpha": scale * spec.qmax}
  if spec.symmetric:
    view = quantizer.quant_view(w, spec, group_axis)
    axes = quantizer.quant_axes(w.ndim, spec, group_axis)
    return {"scale": estimators.lsq_init_scale(view, spec.qmax, axes)}
  scale, zero_point = quantizer.compute_qparams(w, spec, group_axis=group_axis)
  return {"scale": scale, "zero_point": zero_point}


def fake_quantize_weight(w: jax.Array, spec: QuantSpec, group_axis: int,
                         state: dict[str, jax.Array] | None = None,
                         key: jax.Array | None = None) -> jax.Array:
  """Quantize-dequantize one weight with ``spec`` (and its learnable ``state``)."""
  if spec.estimator == "pact":
    return quantizer.fake_quantize(w, spec, group_axis=group_axis, alpha=state["alpha"],
                                   key=key, require_key=False)
  if spec.estimator == "lsq":
    return quantizer.fake_quantize(w, spec, group_axis=group_axis, scale=state["scale"],
                                   zero_point=state.get("zero_point"), key=key,
                                   require_key=False)
  return quantizer.fake_quantize(w, spec, group_axis=group_axis, key=key,
                                 require_key=False)


def _matched_leaves(params: PyTree, rules: tuple[Rule, ...]):
  """Yields ``(index, keys, module_path, leaf_name, leaf, spec)`` of every quantized leaf."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for i, (path, leaf) in enumerate(flat):
    if jnp.ndim(leaf) < 2 or not path:
      continue
    keys = tuple(key_name(k) for k in path)
    module_path = "/".join(keys[:-1])
    rule = match_rule(rules, module_path)
    if rule is None or rule.weight is None:
      continue
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      continue
    out.append((i, keys, module_path, keys[-1], leaf, rule.weight))
  return flat, treedef, out


def _check_group(spec: QuantSpec, leaf, name: str, module_path: str) -> int:
  ga = leaf_group_axis(name, jnp.ndim(leaf))
  if spec.granularity == "group":
    n = jnp.shape(leaf)[ga]
    if n % spec.group_size:
      raise ValueError(
          f"weight '{module_path}/{name}' of shape {tuple(jnp.shape(leaf))}: group_size="
          f"{spec.group_size} does not divide its contraction axis {ga} (length {n})")
  return ga


def init_qstate(params: PyTree, rules: Rule | Sequence[Rule] | None = None) -> dict:
  """Learnable quantizer state for the weights that ``rules`` quantize with LSQ or PACT.

  Returns a nested dict mirroring the params tree down to each such leaf, whose value is
  ``{"scale": ...}`` (LSQ), ``{"scale": ..., "zero_point": ...}`` (LSQ+, asymmetric) or
  ``{"alpha": ...}`` (PACT); see :func:`init_weight_state`. Empty when no rule learns.
  """
  rules = _check_rules(rules)
  _, _, matched = _matched_leaves(params, rules)
  qstate: dict = {}
  for _, keys, module_path, name, leaf, spec in matched:
    if not _learnable(spec):
      continue
    ga = _check_group(spec, leaf, name, module_path)
    node = qstate
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = init_weight_state(leaf, spec, ga)
  return qstate


def tree_get(tree, keys):
  """The node of a nested mapping at ``keys``, or None where the path is missing."""
  node = tree
  for k in keys:
    if not isinstance(node, Mapping) or k not in node:
      return None
    node = node[k]
  return node


def quantize_params(params: PyTree, rules: Rule | Sequence[Rule] | None = None,
                    qstate: dict | None = None, *, key: jax.Array | None = None) -> PyTree:
  """Fake-quantizes the weight leaves of ``params`` that ``rules`` match.

  Args:
    params: any pytree of arrays (typically Flax ``params``).
    rules: a :class:`~jaxq.Rule` or sequence of them (first match on the module path
      wins); None means :data:`DEFAULT_RULES`.
    qstate: learnable state from :func:`init_qstate`, required when a matched rule uses
      ``estimator="lsq"`` or ``"pact"``.
    key: PRNG key for ``rounding="stochastic"`` specs (folded with the leaf index),
      required when a matched rule's weight spec rounds stochastically.

  Returns:
    A tree of the same structure; matched leaves are ``x_hat`` of the same shape and
    dtype, differentiable w.r.t. ``params`` (straight-through) and ``qstate`` (LSQ/PACT).
    Pure: works under ``jit``, ``grad``, ``vmap`` and with any optax optimizer updating the
    float ``params``.
  """
  rules = _check_rules(rules)
  flat, treedef, matched = _matched_leaves(params, rules)
  leaves = [leaf for _, leaf in flat]
  for i, keys, module_path, name, leaf, spec in matched:
    ga = _check_group(spec, leaf, name, module_path)
    state = None
    if _learnable(spec):
      state = tree_get(qstate, keys) if qstate is not None else None
      if state is None:
        raise ValueError(
            f"weight '{'/'.join(keys)}' uses estimator={spec.estimator!r}, whose step is "
            "learned: pass qstate=jaxq.init_qstate(params, rules)")
    k = None
    if spec.rounding == "stochastic":
      if key is None:
        raise ValueError(
            f"weight '{'/'.join(keys)}': QuantSpec.rounding='stochastic' needs a PRNG key:"
            " quantize_params(..., key=jax.random.key(...))")
      k = jax.random.fold_in(key, i)
    leaves[i] = fake_quantize_weight(leaf, spec, ga, state, k)
  return jax.tree_util.tree_unflatten(treedef, leaves)
