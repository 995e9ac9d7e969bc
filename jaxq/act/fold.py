"""Folding elementwise regions of the backward pass into one residual each.

JAX's linearization saves every factor of an elementwise derivative as its own residual:
the tanh-GELU's backward pass reads five tensors of the MLP's width (``x``, ``tanh(u)``,
``1 - tanh(u)``, ``(1 + tanh(u)) / 2``, ``3 x^2``), all multiplied with the cotangent.

A *diagonal region* of the backward jaxpr is a set of equations that map one cotangent
value ``t`` (its *entry*) elementwise and linearly to others: ``mul`` or ``div`` by a value
computed from residuals alone, ``neg``, and sums of two values of the same entry. Each
value ``v`` of the region is then ``J_v * t``, where ``J_v``, the region evaluated at
``t = 1``, depends on the residuals only. Folding stores ``J_v`` for each region value read
outside the region (its *exits*; for an activation function one, its input's cotangent)
instead of the residuals that only the region reads: ``J`` is computed in the forward pass
from the exact residuals, and the backward pass computes ``exit = t * J``.

Gradients stay unbiased: the backward pass is linear in ``J``, which is compressed with
unbiased rounding (before, it multiplied independently rounded factors, also unbiased).
GELU's five factors become one tensor: fewer tensors packed, unpacked and alive together
in the backward pass. A region is folded only when the residuals it frees hold more
elements than its exits.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.extend.core import Literal

from jaxq.act.interpret import bind_equation, zero_after

#: ``mul`` / ``div``: one operand (``div``: the numerator) depends on the cotangent, the
#: other on residuals alone; sums of two cotangent values; sign changes and copies.
_SCALE = frozenset({"mul", "div"})
_SUM = frozenset({"add", "add_any", "sub"})
_UNARY = frozenset({"neg", "copy", "copy_p"})


@dataclasses.dataclass(frozen=True)
class Folded:
  """The backward pass with its diagonal regions folded.

  ``jaxpr``: ClosedJaxpr over (stored compressed residuals, kept residuals, cotangents),
  the stored compressed residuals being the original ones listed in ``keep`` followed by
  one ``J`` per exit; ``jacobians``: ClosedJaxpr from (original compressed residuals, kept
  residuals) to those ``J``, evaluated in the forward pass (None: nothing folded). ``build(anchored)`` builds
  ``jaxpr``; without the ordering dependencies of recomputed residuals (``anchored=False``,
  :meth:`plain`) for the analyses of :mod:`jaxq.act.flow`, which would read them as
  (exactly zero) non-linear dependencies.
  """
  jaxpr: Any
  keep: tuple[int, ...]
  jacobians: Any
  build: Callable[[bool], Any]

  def plain(self):
    """``jaxpr`` without ordering dependencies (same values)."""
    return self.build(False)

  def stored(self, compressed: Sequence[Any], kept: Sequence[Any]) -> list:
    """The compressed residuals to store, from the original ones (forward pass)."""
    js = jex_core.jaxpr_as_fun(self.jacobians)(*compressed, *kept) if self.n_folded else []
    return [compressed[i] for i in self.keep] + list(js)

  @property
  def n_folded(self) -> int:
    return 0 if self.jacobians is None else len(self.jacobians.jaxpr.outvars)


def _same(a, b) -> bool:
  return tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype


def _roots(jaxpr, ct_vars: set) -> dict:
  """For each output of a diagonal equation, its region's entry."""
  dep = set(ct_vars)
  root: dict[Any, Any] = {}
  for eqn in jaxpr.eqns:
    ins = [v for v in eqn.invars if not isinstance(v, Literal) and v in dep]
    if not ins:
      continue
    dep.update(eqn.outvars)
    name, out = eqn.primitive.name, eqn.outvars[0]
    if len(eqn.outvars) != 1 or not jnp.issubdtype(out.aval.dtype, jnp.floating):
      continue
    if not all(_same(v.aval, out.aval) for v in ins):
      continue
    if name in _SCALE:
      other = [v for v in eqn.invars if isinstance(v, Literal) or v not in dep]
      ok = (len(ins) == 1 and len(other) == 1 and (name == "mul" or eqn.invars[0] is ins[0])
            and (tuple(other[0].aval.shape) in ((), tuple(out.aval.shape))))
    elif name in _SUM:
      ok = len(ins) == 2
    else:
      ok = name in _UNARY and len(ins) == 1
    entries = {root.get(v, v) for v in ins}
    if ok and len(entries) == 1:
      root[out] = entries.pop()
  return root


def _live(jaxpr, folded: tuple, recipe_of: dict) -> set:
  """Variables the backward pass reads when the regions in ``folded`` (exit -> entry,
  region equation indices) are replaced by ``exit = entry * J`` and residuals with a
  recipe (``recipe_of``: input -> (recipe, source inputs)) are recomputed."""
  exits, region_eqns = folded
  need = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
  for i in range(len(jaxpr.eqns) - 1, -1, -1):
    eqn = jaxpr.eqns[i]
    hit = [v for v in eqn.outvars if v in need]
    if not hit:
      continue
    if i in region_eqns:
      need.update(exits[v] for v in hit if v in exits)
      continue
    need.update(v for v in eqn.invars if not isinstance(v, Literal))
  need.update(s for v, (_, srcs) in recipe_of.items() if v in need for s in srcs)
  return need


#: Calls inlined before the analysis when their body holds only these primitives: JAX
#: transposes ``jax.nn.silu`` & co. into a ``jit`` of the derivative's products.
_INLINED = frozenset({"pjit", "jit", "closed_call"})
_ELEMENTWISE = _SCALE | _SUM | _UNARY | {"convert_element_type", "broadcast_in_dim"}


def _inlinable(eqn) -> bool:
  body = eqn.params.get("jaxpr")
  return (eqn.primitive.name in _INLINED and hasattr(body, "jaxpr")
          and all(e.primitive.name in _ELEMENTWISE or _inlinable(e) for e in body.jaxpr.eqns))


#: Equations that are the identity on values when their output has the operand's shape:
#: under a mesh JAX's backward pass reshapes to the same shape with a sharding, which
#: would split a region the one-device trace folds whole (a different set of stored
#: residuals, hence different rounding noise, than the unsharded run).
_IDENTITIES = frozenset({"reshape", "sharding_constraint", "copy", "copy_p"})


def _is_identity(eqn) -> bool:
  return (eqn.primitive.name in _IDENTITIES and len(eqn.invars) == 1
          and not isinstance(eqn.invars[0], Literal)
          and _same(eqn.invars[0].aval, eqn.outvars[0].aval))


def _eval_simplified(jaxpr, consts, args) -> list:
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    if _is_identity(eqn):
      outs = ins
    elif _inlinable(eqn):
      body = eqn.params["jaxpr"]
      outs = _eval_simplified(body.jaxpr, body.consts, ins)
    else:
      outs = bind_equation(eqn, ins)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def simplify(closed):
  """``closed`` with its elementwise-only calls (:data:`_INLINED`) inlined and its
  same-shape reshapes, sharding constraints and copies dropped (layout hints inside the
  backward pass; values unchanged), so that the regions found are the same on one device
  and on a mesh. One retrace, none when there is nothing to do."""
  if not any(_is_identity(e) or _inlinable(e) for e in closed.jaxpr.eqns):
    return closed
  return jax.make_jaxpr(lambda *a: _eval_simplified(closed.jaxpr, closed.consts, a))(
      *[_spec(v) for v in closed.jaxpr.invars])


def fold(closed, n_compressed: int, n_kept: int, recipes: dict | None = None) -> Folded:
  """Folds the profitable diagonal regions of ``closed`` (a ClosedJaxpr over the
  compressed residuals, kept residuals and cotangents; module docstring). ``recipes``
  (:func:`jaxq.act.recompute.recipes`): compressed residuals recomputed right before
  their first use instead of stored."""
  closed = simplify(closed)
  jaxpr = closed.jaxpr
  n_res = n_compressed + n_kept
  comp = jaxpr.invars[:n_compressed]
  recipe_of = {comp[j]: (r, tuple(jaxpr.invars[p] for p in pos))
               for j, (r, pos) in (recipes or {}).items()}
  root = _roots(jaxpr, set(jaxpr.invars[n_res:]))
  members: dict[Any, list[int]] = {}
  for i, eqn in enumerate(jaxpr.eqns):
    if eqn.outvars and eqn.outvars[0] in root:
      members.setdefault(root[eqn.outvars[0]], []).append(i)
  exits: dict[Any, Any] = {}
  region_eqns: set[int] = set()
  size = lambda v: int(np.prod(v.aval.shape, dtype=np.int64))  # noqa: E731
  live = _live(jaxpr, (exits, region_eqns), recipe_of)
  stored = lambda live: {v for v in comp if v in live and v not in recipe_of}  # noqa: E731
  for entry, idx in members.items():
    inside = set(idx)
    outs = {jaxpr.eqns[i].outvars[0] for i in idx}
    used_outside = {v for j, e in enumerate(jaxpr.eqns) if j not in inside
                    for v in e.invars if not isinstance(v, Literal) and v in outs}
    ex = [v for v in outs if v in used_outside or v in jaxpr.outvars]
    trial = (exits | {v: entry for v in ex}, region_eqns | inside)
    now = _live(jaxpr, trial, recipe_of)
    freed = sum(size(v) for v in stored(live) - stored(now))
    if freed > sum(size(v) for v in ex):
      exits, region_eqns, live = trial[0], trial[1], now
  keep = tuple(j for j, v in enumerate(comp) if v in stored(live))
  exit_vars = [v for i in sorted(region_eqns) for v in jaxpr.eqns[i].outvars if v in exits]
  build = functools.partial(_folded_jaxpr, closed, n_compressed, n_kept, keep, exits,
                            region_eqns, exit_vars, recipe_of)
  jacobians = _jacobian_jaxpr(closed, n_res, exits, exit_vars) if exit_vars else None
  return Folded(build(True), keep, jacobians, build)


def _spec(v):
  return jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)


def _run(jaxpr, env: dict, skip: set[int], need: set) -> None:
  """Binds, in order, the equations not in ``skip`` whose outputs are in ``need``."""
  read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
  for i, eqn in enumerate(jaxpr.eqns):
    if i in skip or not any(v in need for v in eqn.outvars) or eqn.outvars[0] in env:
      continue
    env.update(zip(eqn.outvars, bind_equation(eqn, [read(v) for v in eqn.invars])))


def _folded_jaxpr(closed, n_comp, n_kept, keep, exits, region_eqns, exit_vars, recipe_of,
                  anchored: bool):
  jaxpr = closed.jaxpr
  need = _live(jaxpr, (exits, region_eqns), recipe_of)
  comp, rest = jaxpr.invars[:n_comp], jaxpr.invars[n_comp:]
  residual_vars = set(jaxpr.invars[:n_comp + n_kept])

  def f(stored, kept, cts):
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip([comp[j] for j in keep], stored[:len(keep)]))
    env.update(zip(rest, list(kept) + list(cts)))
    jac = dict(zip(exit_vars, stored[len(keep):]))
    pending = {v: rs for v, rs in recipe_of.items() if v in need}
    read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731

    def recompute(v, anchor):
      recipe, srcs = pending.pop(v)
      vals = [env[s] for s in srcs]
      if anchor is not None:  # computed after an operand of its first use (interpret.after)
        dep = zero_after(anchor)
        vals = [x - dep.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
                for x in vals]
      env[v] = recipe.evaluate(vals)

    for i, eqn in enumerate(jaxpr.eqns):
      if i in region_eqns:
        for v in eqn.outvars:
          if v in exits:
            env[v] = (env[exits[v]] * jac[v]).astype(v.aval.dtype)
        continue
      if not any(v in need for v in eqn.outvars):
        continue
      ins = [v for v in eqn.invars if not isinstance(v, Literal)]
      if any(v in pending for v in ins):
        anchors = [env[v] for v in ins if v not in residual_vars and v in env
                   and jnp.issubdtype(v.aval.dtype, jnp.floating) and v.aval.shape]
        anchor = anchors[0] if anchored and anchors else None
        for v in ins:
          if v in pending:
            recompute(v, anchor)
      env.update(zip(eqn.outvars, bind_equation(eqn, [read(v) for v in eqn.invars])))
    for v in list(pending):  # passed through to the outputs
      recompute(v, None)
    return [read(v) for v in jaxpr.outvars]

  stored = [_spec(comp[j]) for j in keep] + [_spec(v) for v in exit_vars]
  return jax.make_jaxpr(f)(stored, [_spec(v) for v in rest[:n_kept]],
                           [_spec(v) for v in rest[n_kept:]])


def _jacobian_jaxpr(closed, n_res, exits, exit_vars):
  """ClosedJaxpr from the residuals to ``J`` of each exit: its region at ``entry = 1``."""
  jaxpr = closed.jaxpr
  res = jaxpr.invars[:n_res]

  def f(*vals):
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(res, vals))
    for entry in {exits[v] for v in exit_vars}:
      env[entry] = jnp.ones(entry.aval.shape, entry.aval.dtype)
    need = _live_for(jaxpr, set(exit_vars), set(env))
    _run(jaxpr, env, set(), need)
    return [env[v] for v in exit_vars]

  return jax.make_jaxpr(f)(*[_spec(v) for v in res])


def _live_for(jaxpr, targets: set, known: set) -> set:
  """Variables needed to compute ``targets`` from the ``known`` ones."""
  need = set(targets)
  for eqn in reversed(jaxpr.eqns):
    if any(v in need and v not in known for v in eqn.outvars):
      need.update(v for v in eqn.invars if not isinstance(v, Literal))
  return need
