"""Forward data-flow analyses over jaxprs, through control flow.

:func:`propagate` computes, for each output of a jaxpr, a value in a join semi-lattice
given the inputs' values, one transfer ``rule`` per first-order primitive. Higher-order
primitives are followed into their bodies:

* calls (``pjit``, ``closed_call``, ``checkpoint``/``remat``, ``custom_jvp_call``,
  ``custom_vjp_call``, ``shard_map``, ...): the body, inputs and outputs one to one;
* ``scan``: the body with the loop-carried values iterated to a fixed point
  (``carry_in = join(init, carry_out)``), stacked inputs/outputs as their slices;
* ``while``: likewise, the outputs joined with the predicate's value (the trip count
  depends on it);
* ``cond``: the join over the branches, joined with the index's value.

Any other primitive that holds a jaxpr is *opaque*: ``rule`` sees it like a first-order
one, so each analysis decides what it may assume (:func:`facts` marks its outputs
"unknown"). Every lattice used here has finite height, so the fixed points terminate.

Analyses: :func:`facts` (dependence on inputs, "is a view of input i", unknown),
:func:`reach` (bitmask of inputs), :func:`degrees` (polynomial degree in an input).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

#: Call-like primitives: one body whose inputs and outputs are the equation's.
CALLS = frozenset({
    "pjit", "jit", "closed_call", "core_call", "checkpoint", "remat", "remat2",
    "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "shard_map"})

#: Primitives that only move, reshape or re-type data of their first operand (the other
#: operands being indices): a value reached from one input through these alone is a view
#: of that input (e.g. a bf16 copy of a weight, or one layer's slice of stacked weights).
VIEWS = frozenset({
    "convert_element_type", "transpose", "reshape", "squeeze", "expand_dims",
    "broadcast_in_dim", "copy", "copy_p", "reduce_precision", "rev", "slice", "name",
    "dynamic_slice", "gather", "optimization_barrier", "sharding_constraint",
    "mesh_cast", "reshard"})


def _body(p) -> Jaxpr | None:
  p = p.jaxpr if isinstance(p, ClosedJaxpr) else p
  return p if isinstance(p, Jaxpr) else None


def call_body(eqn) -> Jaxpr | None:
  """The body of a call-like equation (:data:`CALLS`) whose inputs and outputs map one to
  one onto the equation's, else None."""
  if eqn.primitive.name not in CALLS:
    return None
  for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = _body(eqn.params.get(name))
    if (sub is not None and len(sub.invars) == len(eqn.invars)
        and len(sub.outvars) == len(eqn.outvars)):
      return sub
  return None


def has_body(eqn) -> bool:
  """Whether ``eqn`` holds a jaxpr (a higher-order primitive)."""
  for p in eqn.params.values():
    for q in p if isinstance(p, (tuple, list)) else (p,):
      if _body(q) is not None:
        return True
  return False


@dataclasses.dataclass(frozen=True)
class Lattice:
  """A join semi-lattice: ``bottom`` (nothing reaches the variable), ``join``,
  ``rule(eqn, input_values) -> output_values`` for first-order (and opaque) equations, and
  ``control(value, predicate)``: a value selected by a branch index or loop predicate
  (default: their join)."""
  bottom: Any
  join: Callable[[Any, Any], Any]
  rule: Callable[[Any, list], list]
  control: Callable[[Any, Any], Any] | None = None

  def controlled(self, x, pred) -> Any:
    return (self.control or self.join)(x, pred)

  def join_all(self, xs) -> Any:
    out = self.bottom
    for x in xs:
      out = self.join(out, x)
    return out


def propagate(jaxpr: Jaxpr, in_vals: Sequence, lat: Lattice) -> list:
  """The value of each output of ``jaxpr`` given its inputs' (module docstring)."""
  val: dict[Any, Any] = {v: x for v, x in zip(jaxpr.invars, in_vals) if x != lat.bottom}
  get = lambda v: lat.bottom if isinstance(v, Literal) else val.get(v, lat.bottom)  # noqa: E731
  for eqn in jaxpr.eqns:
    xs = [get(v) for v in eqn.invars]
    if all(x == lat.bottom for x in xs):
      continue
    for v, x in zip(eqn.outvars, _equation(eqn, xs, lat)):
      if x != lat.bottom:
        val[v] = x
  return [get(v) for v in jaxpr.outvars]


def _equation(eqn, xs: list, lat: Lattice) -> list:
  name = eqn.primitive.name
  if name == "scan":
    return _scan(eqn, xs, lat)
  if name == "while":
    return _while(eqn, xs, lat)
  if name == "cond":
    return _cond(eqn, xs, lat)
  sub = call_body(eqn)
  if sub is not None:
    return propagate(sub, xs, lat)
  return lat.rule(eqn, xs)


def _fixed_point(body: Jaxpr, consts: list, init: list, rest: list, lat: Lattice,
                 n_carry_out: int):
  """Iterates ``carry = join(init, body(consts, carry, rest)[:n])`` to a fixed point;
  returns the body's outputs at it and the carry."""
  carry = list(init)
  while True:
    outs = propagate(body, consts + carry + rest, lat)
    new = [lat.join(i, o) for i, o in zip(init, outs[:n_carry_out])]
    if new == carry:
      return outs, carry
    carry = new


def _scan(eqn, xs, lat):
  nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
  body = _body(eqn.params["jaxpr"])
  outs, carry = _fixed_point(body, xs[:nc], xs[nc:nc + nk], xs[nc + nk:], lat, nk)
  return carry + outs[nk:]


def _while(eqn, xs, lat):
  cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
  body, cond = _body(eqn.params["body_jaxpr"]), _body(eqn.params["cond_jaxpr"])
  init = xs[cn + bn:]
  _, carry = _fixed_point(body, xs[cn:cn + bn], init, [], lat, len(init))
  pred = propagate(cond, xs[:cn] + carry, lat)[0]
  return [lat.controlled(c, pred) for c in carry]


def _cond(eqn, xs, lat):
  branches = [propagate(_body(b), xs[1:], lat) for b in eqn.params["branches"]]
  return [lat.controlled(lat.join_all(outs), xs[0]) for outs in zip(*branches)]


# ------------------------------------------------------------------------------- analyses
@dataclasses.dataclass(frozen=True)
class Facts:
  """What is known of a variable: ``deps``, the bitmask of the inputs it depends on;
  ``view``, the input it is a view of (:data:`VIEWS` only), else -1; ``unknown``, whether
  an opaque primitive lies on its path."""
  deps: int = 0
  view: int = -1
  unknown: bool = False


NOTHING = Facts()


def _join_facts(a: Facts, b: Facts) -> Facts:
  if a == NOTHING:
    return b
  if b == NOTHING:
    return a
  view = a.view if (a.view == b.view or not b.deps) else b.view if not a.deps else -1
  return Facts(a.deps | b.deps, view, a.unknown or b.unknown)


def _control_facts(x: Facts, pred: Facts) -> Facts:
  """A value chosen under control of ``pred`` depends on it, but stays a view: a weight
  returned by every branch is that weight."""
  view = x.view if x.deps else -1
  return Facts(x.deps | pred.deps, view, x.unknown or pred.unknown)


def _facts_rule(on_opaque: Callable[[Any], None]):
  def rule(eqn, xs: list[Facts]) -> list[Facts]:
    deps, unknown = 0, False
    for x in xs:
      deps |= x.deps
      unknown |= x.unknown
    if has_body(eqn):
      on_opaque(eqn)
      unknown = True
    view = -1
    if (eqn.primitive.name in VIEWS and xs and xs[0].view >= 0
        and not any(x.deps for x in xs[1:])):
      view = xs[0].view
    return [Facts(deps, view, unknown)] * len(eqn.outvars)
  return rule


def facts(jaxpr: Jaxpr, n_inputs: int | None = None,
          on_opaque: Callable[[Any], None] = lambda eqn: None) -> list[Facts]:
  """:class:`Facts` of each output; input ``i`` (of the first ``n_inputs``, default all)
  is ``Facts(1 << i, i)``. ``on_opaque(eqn)`` is called for each opaque equation that a
  tracked input reaches."""
  n = len(jaxpr.invars) if n_inputs is None else n_inputs
  ins = [Facts(1 << i, i) if i < n else NOTHING for i in range(len(jaxpr.invars))]
  return propagate(jaxpr, ins, Lattice(NOTHING, _join_facts, _facts_rule(on_opaque),
                                       _control_facts))


def _or_rule(eqn, masks: list[int]) -> list[int]:
  m = 0
  for x in masks:
    m |= x
  return [m] * len(eqn.outvars)


def reach(jaxpr: Jaxpr, in_masks: Sequence[int]) -> list[int]:
  """Bitmask of the inputs each output depends on, given each input's mask (an opaque
  equation makes each output depend on all its inputs: no dependence is missed)."""
  return propagate(jaxpr, list(in_masks), Lattice(0, lambda a, b: a | b, _or_rule))


#: Primitives whose output is linear in each operand separately (degree = sum).
_BILINEAR = frozenset({"mul", "dot_general", "conv_general_dilated"})
#: Primitives affine in their operands jointly (degree = max), given
#: :data:`_ONLY_FIRST_AFFINE`.
_AFFINE = frozenset(VIEWS | {
    "add", "add_any", "sub", "neg", "reduce_sum", "concatenate", "pad", "cumsum",
    "dynamic_update_slice", "scatter-add", "scatter_add", "select_n", "real", "imag",
    "complex", "conj", "psum", "all_gather", "reduce_scatter"})
#: Affine only in their first operand (``div``: numerator; indices must not depend on it).
_ONLY_FIRST_AFFINE = frozenset({"div", "dynamic_slice", "gather"})


def _degree_rule(eqn, ds: list[int]) -> list[int]:
  name = eqn.primitive.name
  if has_body(eqn):
    d = 2
  elif name in _BILINEAR:
    d = min(sum(ds), 2)
  elif name == "select_n":
    d = 2 if ds[0] else max(ds)
  elif name in _ONLY_FIRST_AFFINE:
    d = 2 if any(ds[1:]) else ds[0]
  elif name in _AFFINE:
    d = max(ds)
  else:
    d = 2
  return [d] * len(eqn.outvars)


def degrees(jaxpr: Jaxpr, in_deg: Sequence[int]) -> list[int]:
  """Polynomial degree (0, 1, or 2 meaning ">= 2 / non-polynomial") of each output in
  one input, given the inputs' degrees. Through a loop the carried degree is the join
  (max) of the iterations', so a product accumulated over iterations reads as 2."""
  return propagate(jaxpr, list(in_deg),
                   Lattice(0, max, _degree_rule, lambda d, p: 2 if p else d))
