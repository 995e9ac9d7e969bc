"""LoRA / QLoRA over a parameter tree: which leaves train, freezing and merging the base.

Contract 8 of DESIGN.md. A layer a ``Rule(..., lora=jaxq.LoRA(...))`` matches holds its
adapter next to its kernel: ``params[...]["lora_a"]`` ``(K, r)`` and ``["lora_b"]``
``(r, N)`` (:mod:`jaxq.layer.lora`; a leading stacking axis for ``nn.scan`` /
``nnx.vmap`` stacks).

* :func:`trainable` marks the adapter leaves, for ``optax.masked`` /
  ``optax.multi_transform`` (e.g. ``optax.multi_transform({True: optax.adamw(1e-3),
  False: optax.set_to_zero()}, jaxq.lora.trainable(params))``: every other leaf stays).
* :func:`split` / :func:`combine` separate the adapters from the rest (a frozen base's
  QArray holds integer leaves, which ``jax.grad`` cannot differentiate):
  ``grads = jax.grad(lambda ad: loss(combine(ad, rest)))(adapters)`` with
  ``adapters, rest = split(params)``, and an optax optimizer on ``adapters`` alone.
* :func:`freeze` replaces the float kernel of each LoRA layer whose rule has a weight
  spec by its :class:`~jaxq.QArray` (QLoRA: NF4 codes, two a byte, plus one float32
  absmax per group; or uniform int8 / int4), so training holds no float copy of the base.
  The QArray dequantizes to exactly the weights the rule's spec fake-quantizes the float
  base to, so the model's outputs do not change (``compact_scales=True`` trades that for
  fewer bytes: double-quantized NF4 absmaxes, float16 / float8 uniform scales; the
  frozen QArray is then what training and serving both use).
* :func:`merge` folds the adapters into a float kernel ``W + (alpha / r) A B`` (``W``
  dequantized when frozen) and drops them, for export or a new ``convert``.

The layer's kernel layout: its contracted axes are, as in :func:`jaxq.params
.quantize_params`, the kernel's leading axes before its output axes (those of its bias
when the kernel ends in the bias's shape, else the last), checked against the adapter's
``K`` and ``N`` (the unique leading split with those sizes otherwise). A kernel that
contracts other axes (an ``Einsum`` kernel whose contracted axes are not leading) needs
its axes in ``contract={"path/to/layer": axes}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax.core import meta

from jaxq.flax.kernel_qarray import check_axes, convert_kernel
from jaxq.layer.lora import LORA_A, LORA_B, merge_kernel
from jaxq.layer.operands import WEIGHT_NAMES
from jaxq.params import check_rules, key_name, output_axes, per_layer
from jaxq.qarray import QArray, quantize
from jaxq.spec import Rule, match_rule

__all__ = ["trainable", "split", "combine", "freeze", "merge", "freeze_kernel", "layer_contract",
           "ADAPTER_NAMES"]

#: Leaf names of a layer's adapter.
ADAPTER_NAMES = (LORA_A, LORA_B)
PyTree = Any


def trainable(params: PyTree) -> PyTree:
  """A mask of ``params``: True on adapter leaves (under a ``lora_a`` / ``lora_b`` key),
  False elsewhere; a :class:`~jaxq.QArray` (a frozen base) is one False leaf (a mask
  prefix, as optax accepts). Works on Linen params dicts, NNX pure dicts and states."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(key_name(k) in ADAPTER_NAMES for k in path), params,
      is_leaf=lambda x: isinstance(x, QArray))


def split(params: Mapping) -> tuple[dict, dict]:
  """``(adapters, rest)``: two nested dicts with the paths of ``params`` that hold the
  ``lora_a`` / ``lora_b`` entries and everything else (Linen params, NNX pure dicts)."""
  adapters, rest = {}, {}
  for k, v in params.items():
    if k in ADAPTER_NAMES:
      adapters[k] = v
    elif isinstance(v, Mapping):
      sub_a, sub_r = split(v)
      if sub_a:
        adapters[k] = sub_a
      if sub_r or not sub_a:
        rest[k] = sub_r
    else:
      rest[k] = v
  return adapters, rest


def combine(adapters: Mapping, rest: Mapping) -> dict:
  """Inverse of :func:`split`: the two nested dicts merged."""
  out = dict(rest)
  for k, v in adapters.items():
    out[k] = combine(v, out.get(k, {})) if isinstance(v, Mapping) else v
  return out


def _rules(qmodel) -> tuple[Rule, ...]:
  """The rules of a quantized model (anything with ``.rules``), or rules given directly."""
  return check_rules(getattr(qmodel, "rules", qmodel))


def layer_contract(path: str, kernel_shape: Sequence[int], bias_shape, k: int, n: int,
                   given: Sequence[int] | None = None) -> tuple[int, ...]:
  """The contracted axes of one layer's kernel (module docstring), checked against the
  adapter's ``(K, N)``; ValueError naming ``path`` when they do not fit or are
  ambiguous."""
  shape = tuple(kernel_shape)
  fits = lambda axes: (math.prod(shape[a] for a in axes) == k
                       and math.prod(d for a, d in enumerate(shape) if a not in axes) == n)
  if given is not None:
    axes = check_axes(shape, given)
    if not fits(axes):
      raise ValueError(f"layer '{path}': contract={tuple(given)} of a kernel of shape "
                       f"{shape} does not give its adapter's view K x N = {k} x {n}")
    return axes
  lead = len(shape) - output_axes(shape, bias_shape)
  if fits(tuple(range(lead))):
    return tuple(range(lead))
  splits = [p for p in range(1, len(shape)) if fits(tuple(range(p)))]
  if len(splits) != 1:
    raise ValueError(
        f"layer '{path}': cannot tell which axes of its kernel of shape {shape} its "
        f"adapter (K x N = {k} x {n}) contracts; pass contract={{{path!r}: axes}}")
  return tuple(range(splits[0]))


def freeze_kernel(path: str, rule: Rule, kernel, bias, contract: Sequence[int],
                  stack: int, learned: Mapping | None = None, *,
                  compact_scales: bool = False) -> QArray:
  """One LoRA layer's float kernel as the QArray of ``rule.weight`` (NF4: groups along
  the innermost contracted axis, per index of every other axis; uniform: as
  :func:`jaxq.convert`), each of ``stack`` leading stacking axes quantized per layer."""
  spec = rule.weight
  if spec.scheme == "nf4":
    ga = max(contract)
    try:
      return per_layer(lambda w: quantize(w, spec, group_axis=ga,
                                          double_quant=compact_scales), stack)(kernel)
    except ValueError as e:
      raise ValueError(f"layer '{path}' (kernel of shape {tuple(kernel.shape)}): {e}"
                       ) from e
  return convert_kernel(path, spec, kernel, bias, tuple(contract), dict(learned or {}),
                        stack, compact_scales)


def _layers(params: Mapping, rules, where: str):
  """``{keys: (node, rule)}`` of every params node holding an adapter; ValueError when
  there is none (``where`` names the caller)."""
  if not any(r.lora is not None for r in rules):
    raise ValueError(f"{where}: no rule has lora=jaxq.LoRA(...), so the model has no LoRA "
                     "layer to freeze or merge")
  flat = {}

  def walk(node, keys):
    if not isinstance(node, Mapping):
      return
    if any(n in node for n in ADAPTER_NAMES):
      path = "/".join(keys)
      missing = [n for n in ADAPTER_NAMES if n not in node]
      if missing or "kernel" not in node:
        raise ValueError(f"layer '{path}': a LoRA layer holds 'kernel', 'lora_a' and "
                         f"'lora_b'; missing {missing or ['kernel']}")
      rule = match_rule(rules, path)
      if rule is None or rule.lora is None:
        raise ValueError(f"layer '{path}' holds a LoRA adapter but no rule with lora= "
                         "matches its path")
      flat[keys] = (node, rule)
    for k, v in node.items():
      walk(v, keys + (str(k),))

  walk(params, ())
  if not flat:
    raise ValueError(f"{where}: the variables hold no LoRA adapter ('lora_a' / 'lora_b'); "
                     "initialise the quantized model first (or they were merged already)")
  return flat


def _layer_view(path: str, node: Mapping, rule: Rule, contract):
  """``(kernel, bias, contracted axes, stacking axes)`` of one LoRA layer's node."""
  kernel, bias = meta.unbox(node["kernel"]), meta.unbox(node.get("bias"))
  a, b = meta.unbox(node[LORA_A]), meta.unbox(node[LORA_B])
  stack = a.ndim - 2
  if stack < 0 or b.ndim != a.ndim or a.shape[-1] != rule.lora.rank or (
      b.shape[-2] != rule.lora.rank):
    raise ValueError(f"layer '{path}': lora_a {tuple(a.shape)} and lora_b "
                     f"{tuple(b.shape)} are not (K, {rule.lora.rank}) and "
                     f"({rule.lora.rank}, N) adapters of its rule's rank")
  # A QArray's shape is per layer (its leaves carry the stacking axes).
  shape = kernel.shape if isinstance(kernel, QArray) else tuple(kernel.shape[stack:])
  bias_shape = None if bias is None else tuple(bias.shape[stack:])
  axes = layer_contract(path, shape, bias_shape, a.shape[-2], b.shape[-1],
                        None if contract is None else contract.get(path))
  return kernel, bias, axes, stack


def _with_params(variables: Mapping, fn) -> dict:
  """``variables`` with ``fn`` applied to its "params" (or to itself when it has none:
  an NNX pure dict of parameters)."""
  variables = dict(variables)
  if "params" in variables:
    return {**variables, "params": fn(variables["params"])}
  return fn(variables)


def _copy(tree):
  return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _set(tree: dict, keys, node: dict) -> None:
  for k in keys[:-1]:
    tree = tree[k]
  tree[keys[-1]] = node


def freeze(qmodel, variables: Mapping, *, contract: Mapping[str, Sequence[int]] | None
           = None, compact_scales: bool = False) -> dict:
  """``variables`` with each LoRA layer's float kernel replaced by its QArray.

  Args:
    qmodel: the quantized model (its ``rules``), or the rules themselves.
    variables: Linen variables (with "params") or an NNX pure dict of parameters.
    contract: ``{layer path: contracted kernel axes}`` where the layout is not the
      default (module docstring).
    compact_scales: double-quantized NF4 absmaxes / float16-float8 uniform scales.

  Layers whose rule has no weight spec keep a float kernel; a kernel already a QArray
  stays. Learned weight steps (``jaxq_weight_*``) are dropped once used.
  """
  rules = _rules(qmodel)

  def fn(params):
    out = _copy(params)
    for keys, (node, rule) in _layers(params, rules, "jaxq.lora.freeze").items():
      path = "/".join(keys)
      if rule.weight is None or isinstance(meta.unbox(node["kernel"]), QArray):
        continue
      kernel, bias, axes, stack = _layer_view(path, node, rule, contract)
      learned = {n: node[n] for n in WEIGHT_NAMES if n in node}
      new = {k: v for k, v in node.items() if k not in WEIGHT_NAMES}
      new["kernel"] = freeze_kernel(path, rule, kernel, bias, axes, stack, learned,
                                    compact_scales=compact_scales)
      _set(out, keys, new)
    return out

  return _with_params(variables, fn)


def merge(qmodel, variables: Mapping, *, contract: Mapping[str, Sequence[int]] | None
          = None) -> dict:
  """``variables`` with each LoRA layer's adapter folded into a float kernel
  ``W + (alpha / r) A B`` (:func:`jaxq.layer.lora.merge_kernel`; ``W`` dequantized
  when frozen) and ``lora_a`` / ``lora_b`` removed."""
  rules = _rules(qmodel)

  def fn(params):
    out = _copy(params)
    for keys, (node, rule) in _layers(params, rules, "jaxq.lora.merge").items():
      path = "/".join(keys)
      kernel, _, axes, stack = _layer_view(path, node, rule, contract)
      merged = per_layer(lambda w, a, b: merge_kernel(w, a, b, rule.lora, axes), stack)(
          kernel, meta.unbox(node[LORA_A]), meta.unbox(node[LORA_B]))
      new = {k: v for k, v in node.items() if k not in ADAPTER_NAMES}
      new["kernel"] = merged
      _set(out, keys, new)
    return out

  return _with_params(variables, fn)
