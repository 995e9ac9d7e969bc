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
same rules drive both APIs. ``rules=None`` means :data:`DEFAULT_RULES`: int8, symmetric,
per output channel.

Roles. A matched rule's ``weight`` spec applies to its module's leaves by name
(:func:`leaf_role`), not by rank alone, so stacked biases ``(L, out)`` and norm scales
``(L, D)`` stay float: ``"kernel"`` (Flax layout ``(..., in, out)``) and ``"embedding"``
(``(vocab, dim)``) are always quantized (rank < 2 raises ValueError naming the leaf);
``"bias"``, ``"scale"`` and jaxq's own ``jaxq_*`` never; any other name (Haiku ``"w"``,
Equinox ``"weight"``) when its rank is >= 2, with ``spec`` applied to the leaf as it is.

Kernels: one semantics with :func:`jaxq.flax.quantize_model` (Linen and NNX), bit for
bit. A kernel's output axes are its last axis, or its last ``bias.ndim`` axes when its
module's ``"bias"`` is the kernel's trailing shape (``DenseGeneral(features=(H, D))``);
the axes before them are contracted. On the view ``(K, N)`` (contracted axes flattened
into rows, output axes into columns) "channel" keeps one scale per output feature and
"group" one per output feature and ``group_size`` consecutive elements of the innermost
input axis (axis -2 of a Dense/Conv kernel, which it must divide; for a Conv kernel
``(kh, kw, in, out)`` a group is ``group_size`` input channels at one ``(kh, kw)``).
``spec.axis`` must name an output axis (default -1): a contracted axis raises ValueError
in both APIs. (A bias-free kernel with several output axes is taken to have one here,
while the Flax wrappers, which see the contraction, keep them all.) Other leaves keep
``spec.axis``; "group" groups axis -1 of an embedding (contracted by ``Embed.attend``;
``QuantSpec(granularity="group", axis=0, ...)`` for one scale per row and group) and axis
-2 of any other leaf.

Stacked layers (``nn.scan`` / ``nn.vmap`` / ``nnx.vmap``: ``kernel (L, in, out)``,
``bias (L, out)``). ``stacked=``, a regex (``re.fullmatch`` on the module path, as
``Rule.path``), names the modules whose leaves have a leading stacking axis: each layer is
quantized on its own (per-layer scales, as its call inside the scan does) and its qstate
has the stacking axis too. A kernel that looks stacked (a bias ``(L, out)`` it starts with
but does not end in) without ``stacked=`` gives a UserWarning.

Learnable state. ``estimator="lsq"`` (LSQ, Esser et al. 2020; LSQ+ when asymmetric,
Bhalgat et al. 2020) and ``estimator="pact"`` (Choi et al. 2018) need ``qstate``, made by
:func:`init_qstate`: a nested dict mirroring the matched leaves, e.g.
``qstate["Dense_0"]["kernel"] == {"scale": f32[1, out]}`` (LSQ; plus ``"zero_point"``
for LSQ+) or ``{"alpha": ...}`` (PACT), in the keepdims layout of the leaf (a grouped
kernel: ``(..., in // group_size, 1, out)``). It is an ordinary pytree: optimise it with optax
alongside (or together with) the params, e.g. ``optax.adam`` on ``(params, qstate)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxq import estimators
from jaxq import quantizer
from jaxq.param_tree import (FLOAT_NAMES, WeightLeaf, key_name, leaf_group_axis, leaf_role,
                             looks_stacked, matched_leaves, output_axes, per_layer, tree_get)
from jaxq.spec import QuantSpec, Rule, learned_step

PyTree = Any

#: int8, symmetric, per output channel for every weight leaf (module docstring).
DEFAULT_RULES: tuple[Rule, ...] = (Rule(path=".*", weight=QuantSpec()),)

__all__ = ["DEFAULT_RULES", "quantize_params", "init_qstate", "leaf_group_axis",
           "leaf_role", "check_weight_axis", "init_weight_state", "fake_quantize_weight",
           "key_name", "check_rules", "per_layer", "output_axes", "looks_stacked",
           "FLOAT_NAMES", "params_rules", "tree_get"]


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


def check_rule_fields(rules: Sequence[Rule], where: str, *, lora: bool, smooth: bool,
                      gptq: bool) -> None:
  """ValueError for a rule using a field that ``where`` (an API name) does not carry out.

  ``lora`` / ``smooth`` / ``gptq``: whether ``where`` accepts ``Rule.lora``,
  ``Rule.smooth`` and ``QuantSpec(rounding="gptq")`` weights. A rule with an unsupported
  field fails here, by name, instead of being silently ignored.
  """
  for i, r in enumerate(rules):
    if r.lora is not None and not lora:
      raise ValueError(
          f"rules[{i}] (path {r.path!r}) has Rule.lora, which {where} does not take: "
          "LoRA layers train with jaxq.quantize_model / jaxq.nnx.quantize_model; to "
          "serve them, fold the adapters with jaxq.lora.merge (jaxq.nnx.lora_merge) and "
          "quantize the merged model with rules without lora")
    if r.smooth is not None and not smooth:
      raise ValueError(
          f"rules[{i}] (path {r.path!r}) has Rule.smooth={r.smooth!r}, which {where} "
          "does not carry out (the scaling is chosen from calibration statistics: use "
          "jaxq.quantize_model / jaxq.nnx.quantize_model, then calibrate and convert); "
          "use smooth=None")
    if r.weight is not None and r.weight.rounding == "gptq" and not gptq:
      raise ValueError(
          f"rules[{i}] (path {r.path!r}): Rule.weight has rounding='gptq', which {where} "
          "does not carry out (GPTQ needs the calibration Hessian: use "
          "jaxq.quantize_model / jaxq.nnx.quantize_model, then calibrate and convert); "
          "use rounding='nearest'")


def params_rules(rules) -> tuple[Rule, ...]:
  """:func:`check_rules`, with None meaning :data:`DEFAULT_RULES`, for the params-tree API
  (no layers to adapt, no calibration: neither ``lora`` nor ``smooth``)."""
  rules = DEFAULT_RULES if rules is None else check_rules(rules)
  check_rule_fields(rules, "jaxq.quantize_params", lora=False, smooth=False, gptq=True)
  return rules


def check_weight_axis(spec: QuantSpec, path: str, kernel_shape: Sequence[int],
                      contract: Sequence[int]) -> None:
  """``spec.axis`` of a layer's weight spec must name an output (non-contracted) axis of
  its kernel: a layer keeps its scales per output feature, in every API.

  Raises ValueError naming the layer ``path``, the axis and the axes it may name.
  """
  if spec.granularity == "tensor":
    return
  nd = len(kernel_shape)
  contracted = {a % nd for a in contract}
  outputs = [a for a in range(nd) if a not in contracted]
  if -nd <= spec.axis < nd and spec.axis % nd in outputs:
    return
  raise ValueError(
      f"layer '{path}': Rule weight QuantSpec.axis={spec.axis} is not an output axis of "
      f"its kernel of shape {tuple(kernel_shape)} (contracted axes "
      f"{tuple(sorted(contracted))}); a layer keeps one scale per output feature, so "
      f"axis must be one of {outputs + [a - nd for a in outputs]} (default -1)")


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


def _check_group(spec: QuantSpec, lf: WeightLeaf, ga: int) -> int:
  shape = lf.layer_shape
  if spec.granularity == "group" and shape[ga] % spec.group_size:
    raise ValueError(
        f"weight '{lf.where}' of shape {tuple(jnp.shape(lf.leaf))}: group_size="
        f"{spec.group_size} does not divide its contraction axis {ga + lf.stack} (length "
        f"{shape[ga]})")
  return ga


def _kernel_quantizer(lf: WeightLeaf):
  """``(fake_quant(w, state, key), init(w))`` of one layer's kernel on its ``(K, N)`` view
  (the view and spec the Flax wrappers use), state in the kernel's keepdims layout."""
  shape, n_out, spec = lf.layer_shape, lf.n_out, lf.spec
  contract = tuple(range(len(shape) - n_out))
  check_weight_axis(spec, lf.module_path, shape, contract)
  _check_group(spec, lf, len(contract) - 1)
  # A params-tree kernel contracts its leading axes, so its (K, N) view is a reshape
  # (jaxq.layer.views.kernel_matrix transposes, for any contraction a layer declares).
  view = (math.prod(shape[:-n_out]), math.prod(shape[-n_out:]))
  vspec = spec if spec.granularity == "tensor" else spec.replace(axis=-1)
  vstat = quantizer.stat_shape(view, vspec, 0)
  if spec.granularity == "tensor":
    layout = (1,) * len(shape)
  elif spec.granularity == "channel":
    layout = (1,) * len(contract) + shape[len(contract):]
  else:
    ga = len(contract) - 1
    layout = shape[:ga] + (shape[ga] // spec.group_size, 1) + shape[ga + 1:]

  def fq(w, state, key):
    st = None if state is None else {n: jnp.reshape(v, vstat) for n, v in state.items()}
    return fake_quantize_weight(w.reshape(view), vspec, 0, st, key).reshape(shape)

  def init(w):
    return {n: v.reshape(layout)
            for n, v in init_weight_state(w.reshape(view), vspec, 0).items()}

  return fq, init


def _quantizer(lf: WeightLeaf):
  """``(fake_quant(w, state, key), init(w))`` of one layer's leaf (unstacked)."""
  if lf.n_out:
    return _kernel_quantizer(lf)
  ga = _check_group(lf.spec, lf, leaf_group_axis(lf.name, len(lf.layer_shape)))
  return (lambda w, state, key: fake_quantize_weight(w, lf.spec, ga, state, key),
          lambda w: init_weight_state(w, lf.spec, ga))


def init_qstate(params: PyTree, rules: Rule | Sequence[Rule] | None = None, *,
                stacked: str | None = None) -> dict:
  """Learnable quantizer state for the weights that ``rules`` quantize with LSQ or PACT.

  Returns a nested dict mirroring the params tree down to each such leaf, whose value is
  ``{"scale": ...}`` (LSQ), ``{"scale": ..., "zero_point": ...}`` (LSQ+, asymmetric) or
  ``{"alpha": ...}`` (PACT); see :func:`init_weight_state`. Empty when no rule learns.
  ``stacked``: as in :func:`quantize_params` (the state then has the stacking axis).
  """
  rules = params_rules(rules)
  _, _, matched = matched_leaves(params, rules, stacked)
  qstate: dict = {}
  for lf in matched:
    if not learned_step(lf.spec):
      continue
    _, init = _quantizer(lf)
    node = qstate
    for k in lf.keys[:-1]:
      node = node.setdefault(k, {})
    node[lf.keys[-1]] = per_layer(init, lf.stack)(lf.leaf)
  return qstate


def _checked_state(lf: WeightLeaf, qstate, init) -> dict[str, jax.Array]:
  """The learned state of ``lf`` in ``qstate``, checked against what init_qstate makes."""
  spec = lf.spec
  state = tree_get(qstate, lf.keys) if qstate is not None else None
  if state is None:
    raise ValueError(
        f"weight '{lf.where}' uses estimator={spec.estimator!r}, whose step is "
        "learned: pass qstate=jaxq.init_qstate(params, rules)")
  want = jax.eval_shape(per_layer(init, lf.stack), lf.leaf)
  if not isinstance(state, Mapping) or set(state) != set(want):
    got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
    raise ValueError(
        f"qstate entry '{lf.where}' must be a dict with keys {sorted(want)} (estimator="
        f"{spec.estimator!r}, symmetric={spec.symmetric}), as jaxq.init_qstate(params, "
        f"rules) makes it; got {got}")
  for n, w in want.items():
    if tuple(jnp.shape(state[n])) != tuple(w.shape):
      raise ValueError(
          f"qstate entry '{lf.where}/{n}' has shape {tuple(jnp.shape(state[n]))}; the "
          f"weight of shape {tuple(jnp.shape(lf.leaf))} needs {tuple(w.shape)} (as "
          "jaxq.init_qstate(params, rules) makes it)")
  return dict(state)


def quantize_params(params: PyTree, rules: Rule | Sequence[Rule] | None = None,
                    qstate: dict | None = None, *, key: jax.Array | None = None,
                    stacked: str | None = None) -> PyTree:
  """Fake-quantizes the weight leaves of ``params`` that ``rules`` match.

  Args:
    params: any pytree of arrays (typically Flax ``params``).
    rules: a :class:`~jaxq.Rule` or sequence of them (first match on the module path
      wins); None means :data:`DEFAULT_RULES`.
    qstate: learnable state from :func:`init_qstate`, required when a matched rule uses
      ``estimator="lsq"`` or ``"pact"``.
    key: PRNG key for ``rounding="stochastic"`` specs (folded with the leaf index, split
      over the layers of a stack), required when a matched rule's weight spec rounds
      stochastically.
    stacked: regex of the module paths (``re.fullmatch``) whose leaves have a leading
      stacking axis (``nn.scan`` / ``nnx.vmap`` layer stacks): quantized layer by layer.

  Returns:
    A tree of the same structure; matched leaves are ``x_hat`` of the same shape and
    dtype, differentiable w.r.t. ``params`` (straight-through) and ``qstate`` (LSQ/PACT).
    Pure: works under ``jit``, ``grad``, ``vmap`` and with any optax optimizer updating the
    float ``params``.

  Raises:
    ValueError naming the leaf: a kernel/embedding of rank < 2, a kernel spec whose
    ``axis`` is an input axis, a group size that does not divide the grouped axis, a
    missing qstate or one of the wrong kind or shape.
  """
  rules = params_rules(rules)
  flat, treedef, matched = matched_leaves(params, rules, stacked)
  leaves = [leaf for _, leaf in flat]
  for lf in matched:
    fq, init = _quantizer(lf)
    state = _checked_state(lf, qstate, init) if learned_step(lf.spec) else None
    k = None
    if lf.spec.rounding == "stochastic":
      if key is None:
        raise ValueError(
            f"weight '{'/'.join(lf.keys)}': QuantSpec.rounding='stochastic' needs a PRNG "
            "key: quantize_params(..., key=jax.random.key(...))")
      k = jax.random.fold_in(key, lf.index)
      if lf.stack:
        k = jax.random.split(k, jnp.shape(lf.leaf)[0])
    leaves[lf.index] = per_layer(fq, lf.stack)(lf.leaf, state, k)
  return jax.tree_util.tree_unflatten(treedef, leaves)
