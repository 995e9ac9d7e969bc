"""Residuals recomputed in the backward pass from other stored residuals, not stored.

JAX's linearization saves values that are cheap functions of other residuals: LayerNorm
saves ``x - mean``, its normalised output ``(x - mean) * (1/sigma * scale) + bias`` and the
full-size product ``1/sigma * scale`` (a per-row statistic times a weight, both kept exact),
and softmax saves both ``exp(s - max)`` and the probabilities ``exp(s - max) / sum``.

A compressed residual has a *recipe* when the forward pass computes it, by elementwise
and layout operations only (:data:`CHEAP`), from kept residuals, literals and at most
other stored compressed residuals, *affinely* in the compressed ones: sums, products with
exact values, division of a compressed value by an exact one. Such a residual is not
stored; the backward pass recomputes it right before its first use from the decompressed
sources (gradients stay unbiased: affine in independently rounded residuals) or, when it
depends on exact values only, exactly (``1/sigma * scale``: no rounding at all).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jax.extend.core import Literal

from jaxq.act import flow
from jaxq.act.interpret import bind_equation

#: Elementwise and layout primitives recomputed in the backward pass.
CHEAP = frozenset({
    "add", "add_any", "sub", "neg", "mul", "div", "max", "min", "exp", "log", "rsqrt",
    "sqrt", "integer_pow", "square", "abs", "sign", "tanh", "logistic", "select_n",
    "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "convert_element_type",
    "transpose", "copy", "copy_p", "stop_gradient"})
#: Primitives affine in their operands jointly (``mul``: in one at a time, ``div``: in
#: its numerator).
_AFFINE = frozenset({
    "add", "add_any", "sub", "neg", "broadcast_in_dim", "reshape", "squeeze",
    "expand_dims", "convert_element_type", "transpose", "copy", "copy_p"})
#: At most this many equations per recipe.
MAX_EQUATIONS = 8


@dataclasses.dataclass(frozen=True)
class Recipe:
  """``out`` computed by ``eqns`` (forward-pass equations, in order) from ``sources``
  (forward-pass variables: stored residuals), literals and ``consts`` ((var, value)
  pairs of the forward pass's constants)."""
  out: Any
  eqns: tuple
  sources: tuple
  consts: tuple = ()

  def evaluate(self, values: Sequence[Any]) -> Any:
    """``out`` given the values of ``sources`` (in order)."""
    env = dict(self.consts)
    env.update(zip(self.sources, values))
    read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
    for eqn in self.eqns:
      env.update(zip(eqn.outvars, bind_equation(eqn, [read(v) for v in eqn.invars])))
    return env[self.out]


def _affine_step(eqn, comp_dep: list[bool]) -> bool:
  name = eqn.primitive.name
  if not any(comp_dep):
    return True
  if name in _AFFINE:
    return True
  if name == "mul":
    return sum(comp_dep) == 1
  if name == "div":
    return not comp_dep[1]
  return False


def find(jaxpr, target, exact: set, compressed: set, consts: dict) -> Recipe | None:
  """The :class:`Recipe` of ``target`` in ``jaxpr`` from ``exact`` variables (kept
  residuals) and ``compressed`` ones, affine in the latter; None if there is none."""
  defining = {v: e for e in jaxpr.eqns for v in e.outvars}
  order = {id(e): i for i, e in enumerate(jaxpr.eqns)}
  eqns: dict[int, Any] = {}
  sources: set = set()
  comp_dep: dict[Any, bool] = {}

  def visit(v) -> bool:
    if isinstance(v, Literal):
      return True
    if v in consts:
      comp_dep[v] = False
      return True
    if v is not target and (v in exact or v in compressed):
      sources.add(v)
      comp_dep[v] = v in compressed
      return True
    if v in comp_dep:
      return True
    eqn = defining.get(v)
    if (eqn is None or eqn.primitive.name not in CHEAP or len(eqn.outvars) != 1
        or len(eqns) >= MAX_EQUATIONS):
      return False
    if not all(visit(u) for u in eqn.invars):
      return False
    deps = [not isinstance(u, Literal) and comp_dep[u] for u in eqn.invars]
    if not _affine_step(eqn, deps):
      return False
    comp_dep[v] = any(deps)
    eqns[order[id(eqn)]] = eqn
    return True

  if not visit(target) or not eqns:
    return None
  used = {u for e in eqns.values() for u in e.invars if not isinstance(u, Literal)}
  return Recipe(target, tuple(eqns[i] for i in sorted(eqns)), tuple(sources),
                tuple((c, consts[c]) for c in consts if c in used))


def recipes(closed, n_out: int, compressed: list[int], kept: list[int],
            backward) -> dict[int, tuple]:
  """Recipes of the stored compressed residuals of the forward pass ``closed`` (a
  ClosedJaxpr to (outputs, residuals); ``compressed`` / ``kept``: the indices of the
  residuals stored compressed / exact), by position in ``compressed``:
  ``{j: (recipe, source positions)}``, a source's position being ``j'`` for compressed
  residual ``j'`` and ``len(compressed) + i`` for kept residual ``i``.

  A residual that another recipe reads stays stored. A recipe from compressed sources is
  taken only if the backward pass ``backward`` (ClosedJaxpr over the compressed, kept
  residuals and cotangents) is no less linear in the residual and its sources taken
  together than in each alone (:func:`jaxq.act.flow.degrees`): recomputing ``x - mean``
  from the stored ``x`` would make LayerNorm's backward pass, which multiplies the two,
  quadratic in one rounded tensor (a gradient bias), where it multiplied two
  independently rounded ones."""
  jaxpr = closed.jaxpr
  outs = jaxpr.outvars[n_out:]
  comp_vars = [outs[k] for k in compressed]
  position = {v: len(compressed) + i for i, v in enumerate(outs[k] for k in kept)
              if not isinstance(v, Literal)}
  position.update((v, j) for j, v in enumerate(comp_vars))
  exact = {outs[k] for k in kept if not isinstance(outs[k], Literal)}
  consts = dict(zip(jaxpr.constvars, closed.consts))
  stored = {v for v in comp_vars if not isinstance(v, Literal)}
  n_in = len(backward.jaxpr.invars)

  def degree(group: set[int]) -> int:
    deg = flow.degrees(backward.jaxpr, [int(i in group) for i in range(n_in)])
    return max(deg, default=0)

  found: dict[int, tuple] = {}
  read: set = set()
  for j, v in enumerate(comp_vars):
    if isinstance(v, Literal) or v in read:
      continue
    r = find(jaxpr, v, exact, stored - {v}, consts)
    if r is None:
      continue
    pos = tuple(position[s] for s in r.sources)
    group = {j} | {p for p in pos if p < len(compressed)}
    group |= {i for i, (_, ps) in found.items() if set(ps) & group}
    if len(group) > 1 and degree(group) > max(degree({i}) for i in group):
      continue
    found[j] = (r, pos)
    stored.discard(v)
    read.update(r.sources)
  return found
