"""Cross-layer-equalization pairs read off a function's jaxpr, each one proven.

:func:`find_equalization_pairs` traces ``fn(params, *args)`` once (``jax.make_jaxpr``,
nothing is computed) and follows the output of every Conv/Dense contraction whose right
operand is a ``"kernel"`` of ``params`` (layer ``L``) forward through the graph. The value
stays *scaled with L*, i.e. dividing output channel ``i`` of L's kernel (and the biases
found) by ``s_i > 0`` divides channel ``i`` of the value by ``s_i``, while it passes only:
per-channel ``"bias"`` params of shape ``(C,)`` added to it (recorded as L's biases);
products and quotients by values that do not depend on L (BatchNorm scales, constants,
other data); ``max``/``min`` with 0 and ``x >= 0``-style selects (ReLU, leaky ReLU);
sums of values scaled with L; negation, ``abs`` and dtype casts; reshapes, transposes,
zero pads, slices, concatenations, pooling (``reduce_window``) and reductions that keep
the channel axis last. ``(L, K)`` is a pair when the value reaches exactly one
contraction, as its left operand, with a kernel ``K`` (Conv ``lhs_spec``/``rhs_spec`` with
features on the last and second to last axes, Dense ``x @ kernel``), and nowhere else: not
the function's output, not a residual sum, not a loop. A value that still reaches a kernel
after a non-homogeneous step (ReLU6's clip at 6, SiLU's ``x * sigmoid(x)``, an unfolded
BatchNorm's ``x - mean``, a flatten that spreads the channels) makes ``(L, K)``
unprovable. Arrays that ``fn`` closes over are constants of the trace and part of the
proof (subtracting a running mean of zeros passes; a non-zero one does not).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np
# jax.extend.core is the public home of the jaxpr types (Literal, ClosedJaxpr, Jaxpr).
from jax.extend import core as jcore

from jaxq.fold.cle import EqualizationPair

__all__ = ["find_equalization_pairs"]

# Calls whose sub-jaxpr computes the primal outputs from the inputs, one to one.
_CALLS = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat", "checkpoint")
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_SAME = ("convert_element_type", "copy", "copy_p", "neg", "abs")
_COMPARE = ("ge", "gt", "le", "lt", "eq", "ne")
_REDUCE = ("reduce_sum", "reduce_max", "reduce_min")
_WINDOW = ("reduce_window_sum", "reduce_window_max", "reduce_window_min")


@dataclasses.dataclass(frozen=True)
class _Label:
  """What a jaxpr value is, as far as equalization is concerned.

  kind: "param" (one params leaf, up to casts/reshapes), "fixed" (computed from params
  and constants only), "data" (depends on ``args``), "scaled" (scales with layer
  ``layer``'s output channels, on the last axis), "sign" (a predicate or mask of such a
  value that scaling does not change). ``reason``: why a "scaled"/"sign" value is no
  longer exactly homogeneous.
  """

  kind: str
  layer: str = ""
  leaf: str = ""
  per_channel: bool = False  # "param": value[..., c] == leaf[c]
  whole: bool = False  # "param": the leaf itself, up to a cast
  zero: bool = False  # "fixed": all zeros
  reason: str | None = None


_FIXED, _DATA = _Label("fixed"), _Label("data")


def _key_name(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _literal(v) -> _Label:
  return _Label("fixed", zero=bool(np.all(np.asarray(v.val) == 0)))


class _Walker:
  """Labels every value of a jaxpr and records what each layer's output reaches."""

  def __init__(self):
    self.consumers = collections.defaultdict(list)  # L -> [(K, reason)]
    self.escapes = collections.defaultdict(list)  # L -> [reason]
    self.biases = collections.defaultdict(list)  # L -> [bias layer path]
    self.uses = collections.Counter()  # "layer/leaf" -> uses by computing equations

  def walk(self, jaxpr, labels, consts=()) -> list[_Label]:
    env = {}
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = _Label("fixed", zero=bool(np.all(np.asarray(c) == 0)))
    env.update(zip(jaxpr.invars, labels))
    read = lambda v: _literal(v) if isinstance(v, jcore.Literal) else env.get(v, _FIXED)
    for eqn in jaxpr.eqns:
      outs = self.equation(eqn, [read(v) for v in eqn.invars])
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  def equation(self, eqn, ins: list[_Label]) -> list[_Label]:
    name, n_out = eqn.primitive.name, len(eqn.outvars)
    if name in _CALLS:
      for key in _CALL_PARAMS:
        sub = eqn.params.get(key)
        if isinstance(sub, jcore.ClosedJaxpr) and len(sub.jaxpr.invars) == len(ins):
          return self.walk(sub.jaxpr, ins, sub.consts)
        if isinstance(sub, jcore.Jaxpr) and len(sub.invars) == len(ins):
          return self.walk(sub, ins)
    for l in ins:
      if l.kind == "param" and not (name in _SAME + ("reshape", "broadcast_in_dim")):
        self.uses[f"{l.layer}/{l.leaf}"] += 1
    if name in ("conv_general_dilated", "dot_general"):
      return [self.contraction(eqn, ins)]
    tracked = {l.layer for l in ins if l.kind in ("scaled", "sign")}
    if len(tracked) > 1:
      for layer in tracked:
        self.escapes[layer].append(f"meets another layer's output in `{name}`")
      return [_DATA] * n_out
    if not tracked:
      return [self.untracked(eqn, ins)] * n_out
    if any(isinstance(sub, (jcore.Jaxpr, jcore.ClosedJaxpr)) for sub in eqn.params.values()):
      self.escapes[tracked.pop()].append(f"enters a `{name}` (loops and branches are opaque)")
      return [_DATA] * n_out
    return [self.tracked(eqn, ins)] * n_out

  def untracked(self, eqn, ins: list[_Label]) -> _Label:
    name = eqn.primitive.name
    if any(l.kind == "data" for l in ins):
      return _DATA
    params = [l for l in ins if l.kind == "param"]
    if len(params) == 1 and len(ins) == 1 and name in _SAME + ("reshape", "broadcast_in_dim"):
      (p,) = params
      in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
      per_channel = p.per_channel and in_shape[-1:] == out_shape[-1:] and (
          name in _SAME or all(d == 1 for d in out_shape[:-1]) or
          (name == "broadcast_in_dim"
           and eqn.params["broadcast_dimensions"][-1] == len(out_shape) - 1
           and all(d == 1 for d in in_shape[:-1])))
      return dataclasses.replace(p, per_channel=per_channel,
                                 whole=p.whole and name in _SAME[:3])
    zero = name in _SAME + ("reshape", "broadcast_in_dim") and all(l.zero for l in ins)
    return _Label("fixed", zero=zero)

  def contraction(self, eqn, ins: list[_Label]) -> _Label:
    """A Conv/Dense: the end of the value it reads, the start of its layer's output."""
    lhs, rhs = ins[0], ins[1]
    kernel = None
    if rhs.kind == "param" and rhs.leaf == "kernel" and rhs.whole and _layout_ok(eqn):
      kernel = rhs.layer
    if rhs.kind in ("scaled", "sign"):
      self.escapes[rhs.layer].append(f"is the right operand of `{eqn.primitive.name}`")
    if lhs.kind == "sign":
      self.escapes[lhs.layer].append(f"a mask of it is read by `{eqn.primitive.name}`")
    if lhs.kind == "scaled":
      if kernel is None:
        self.escapes[lhs.layer].append(
            f"is contracted by a `{eqn.primitive.name}` whose right operand is not a layer's "
            "kernel (or whose features are not on the standard axes)")
      else:
        self.consumers[lhs.layer].append((kernel, lhs.reason))
    if kernel is not None:
      return _Label("scaled", layer=kernel)
    return _DATA if _DATA.kind in (lhs.kind, rhs.kind) else _FIXED

  def tracked(self, eqn, ins: list[_Label]) -> _Label:
    """The label of an equation's output where one input scales with one layer."""
    name = eqn.primitive.name
    (layer,) = {l.layer for l in ins if l.kind in ("scaled", "sign")}
    reason = next((l.reason for l in ins if l.kind in ("scaled", "sign") and l.reason), None)
    own = [l for l in ins if l.kind == "scaled"]
    others = [l for l in ins if l.kind not in ("scaled", "sign")]
    in_shape = eqn.invars[0].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    kind = "sign" if not own else "scaled"
    keep = _Label(kind, layer=layer, reason=reason)

    def taint(why: str) -> _Label:
      return _Label(kind, layer=layer, reason=reason or why)

    if name in _SAME:
      return keep
    if name in ("reshape", "broadcast_in_dim", "squeeze", "transpose", "pad", "slice") + \
        _REDUCE + _WINDOW:
      return keep if _keeps_channels(eqn, in_shape, out_shape) else taint(
          f"`{name}` moves or mixes its channels (e.g. a flatten before a Dense)")
    if name == "concatenate":
      return keep if not others and eqn.params["dimension"] != len(out_shape) - 1 else taint(
          "`concatenate` joins it with other values or along its channels")
    if name in ("mul", "div"):
      if name == "div" and ins[1].kind in ("scaled", "sign"):
        return taint("divides by it")
      if len(own) > 1:
        return taint(f"`{name}` of it by itself is not homogeneous (e.g. SiLU, GELU)")
      return keep
    if name in ("add", "sub", "add_any"):
      if len(own) == 2 and not reason:
        return keep
      if any(l.kind == "data" for l in others):
        self.escapes[layer].append(f"is added to another tensor in `{name}` (a residual?)")
        return _DATA
      if others and all(l.zero for l in others):
        return keep
      shapes = [v.aval.shape[-1:] for v in eqn.invars]
      if (len(others) == 1 and others[0].kind == "param" and others[0].per_channel
          and others[0].leaf == "bias" and len(set(shapes + [out_shape[-1:]])) == 1):
        self.biases[layer].append(others[0].layer)
        return keep
      return taint(f"`{name}` with a value that is not a per-channel 'bias' parameter (an "
                   "unfolded BatchNorm's statistics? fold it first)")
    if name in ("max", "min"):
      if len(own) == 2 or all(l.zero for l in others):
        return keep
      bound = next((f" {v.val}" for v in eqn.invars if isinstance(v, jcore.Literal)), "")
      return taint(f"`{name}` with{bound or ' a non-zero value'} clips it (ReLU6?), which is "
                   "not positively homogeneous: min(x / s, 6) != min(x, 6) / s")
    if name in _COMPARE:
      sign = _Label("sign", layer=layer, reason=reason)
      return sign if all(l.zero for l in others) else dataclasses.replace(
          sign, reason=reason or f"`{name}` compares it with a non-zero value")
    if name in ("and", "or", "not"):
      return keep
    if name == "select_n":
      pred_ok = ins[0].kind == "sign" or ins[0].kind in ("fixed", "param", "data")
      cases_ok = all(l.kind == "scaled" or l.zero for l in ins[1:])
      return keep if pred_ok and cases_ok else taint("a select between values that do not "
                                                     "all scale with it")
    return taint(f"`{name}` is not positively homogeneous")


def _layout_ok(eqn) -> bool:
  """Features on the last axis of input and output, kernel ``(..., in, out)``."""
  lhs_nd, rhs_nd = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
  if eqn.primitive.name == "dot_general":
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    return (tuple(lc) == (lhs_nd - 1,) and tuple(rc) == (0,) and not lb and not rb
            and rhs_nd == 2)
  dn = eqn.params["dimension_numbers"]
  return (dn.lhs_spec[1] == lhs_nd - 1 and dn.out_spec[1] == lhs_nd - 1
          and dn.rhs_spec[:2] == (rhs_nd - 1, rhs_nd - 2)
          and eqn.params["batch_group_count"] == 1)


def _keeps_channels(eqn, in_shape, out_shape) -> bool:
  """The last axis stays the last axis, entry for entry."""
  name, p = eqn.primitive.name, eqn.params
  last = len(in_shape) - 1
  if not in_shape or not out_shape or in_shape[-1] != out_shape[-1]:
    return False
  if name == "reshape":
    return True  # row-major: [..., c] -> [..., c] when the last size is kept
  if name == "broadcast_in_dim":
    return p["broadcast_dimensions"][-1] == len(out_shape) - 1
  if name == "squeeze":
    return last not in {d % len(in_shape) for d in p["dimensions"]}
  if name == "transpose":
    return p["permutation"][-1] == last
  if name == "pad":
    value = eqn.invars[1]
    return (tuple(p["padding_config"][-1]) == (0, 0, 0) and isinstance(value, jcore.Literal)
            and bool(np.all(np.asarray(value.val) == 0)))
  if name == "slice":
    return (p["start_indices"][-1] == 0 and p["limit_indices"][-1] == in_shape[-1]
            and (p["strides"] is None or p["strides"][-1] == 1))
  if name in _REDUCE:
    return last not in p["axes"]
  if name in _WINDOW:
    return (p["window_dimensions"][-1] == 1 and p["window_strides"][-1] == 1
            and tuple(p["padding"][-1]) == (0, 0))
  return False


def find_equalization_pairs(fn: Callable, params: Mapping, *args, unprovable: str = "raise",
                            **kwargs) -> list[EqualizationPair]:
  """The ``(layer1, layer2, bias_paths)`` pairs that :func:`jaxq.fold.equalize` may rescale.

  Args:
    fn: ``fn(params, *args, **kwargs)``, the model's forward function (e.g.
      ``lambda p, x: FoldedBatchNorm(model, bns).apply({"params": p, "batch_stats": s},
      x)``, or for NNX ``lambda p, x: nnx.merge(graphdef, p, rest)(x)``).
    params: the params tree; layers are named by their "/"-joined paths in it.
    *args: ``fn``'s array arguments (arrays or ``jax.ShapeDtypeStruct``), traced.
    unprovable: "raise" (default): a ValueError naming every layer whose output reaches
      another layer's kernel but that cannot be equalized with it exactly, and why (ReLU6,
      a residual sum, an unfolded BatchNorm, a flatten, shared weights, several
      consumers); "skip": leave those out.
    **kwargs: static keyword arguments of ``fn`` (e.g. ``train=False``).

  Returns:
    :class:`jaxq.fold.EqualizationPair` s in the order of the first layers in ``fn``; each
    is proven (module docstring) to keep ``fn`` unchanged when equalized.
  """
  if unprovable not in ("raise", "skip"):
    raise ValueError(f"unprovable must be 'raise' or 'skip'; got {unprovable!r}")
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  closed = jax.make_jaxpr(lambda p, *a: fn(p, *a, **kwargs))(params, *args)
  labels = []
  for path, leaf in leaves:
    names = [_key_name(k) for k in path]
    labels.append(_Label("param", layer="/".join(names[:-1]), leaf=names[-1],
                         per_channel=np.ndim(leaf) == 1, whole=True))
  labels += [_DATA] * (len(closed.jaxpr.invars) - len(labels))
  walker = _Walker()
  for label in walker.walk(closed.jaxpr, labels, closed.consts):
    if label.kind in ("scaled", "sign"):
      walker.escapes[label.layer].append("is an output of the function")
  leaves_used = {f"{l.layer}/{l.leaf}" for l in labels if l.kind == "param"}
  pairs, problems = [], []
  for layer, consumers in walker.consumers.items():
    kernel, added = consumers[0][0], walker.biases[layer]
    weights = [f"{layer}/kernel", f"{kernel}/kernel"] + [f"{b}/bias" for b in added]
    own_bias_elsewhere = (f"{layer}/bias" in leaves_used and layer not in added
                          and walker.uses[f"{layer}/bias"] > 0)
    if (walker.escapes[layer] or len(consumers) > 1 or own_bias_elsewhere
        or any(walker.uses[w] > 1 for w in weights)):
      continue  # its output (or a weight it scales) also goes elsewhere: not a pair
    if consumers[0][1]:
      problems.append(f"{layer!r} -> {kernel!r}: {consumers[0][1]}")
    else:
      pairs.append(EqualizationPair(layer, kernel,
                                    tuple(dict.fromkeys(b for b in added if b != layer))))
  if problems and unprovable == "raise":
    raise ValueError(
        "cannot prove that equalizing these layer pairs keeps the function (pass "
        "unprovable='skip' to leave them out; AIMET's CLE replaces ReLU6 by ReLU first, "
        "which changes the float model: do that in the model if its accuracy holds):\n  "
        + "\n  ".join(problems))
  return pairs
