"""Which residuals of a function's VJP :func:`~jaxq.act.compressed_vjp` compresses.

``jax.vjp(fn, *args)`` returns a closure whose pytree leaves are exactly the residuals
the backward pass reads. :func:`trace_forward` traces the function that returns fn's
output and those leaves to one jaxpr over fn's flat arguments; the decision for each
residual comes from :func:`jaxq.act.flow.facts` on that very jaxpr (no second trace, no
matching of leaves by identity):

* a residual that is a *view* of an argument leaf (reached through moves, casts,
  slices, reshapes only, through calls and control flow: a bf16 copy of a weight, one
  layer's slice of stacked weights in a ``scan``) is that argument: compressed only if
  the argument is an activation listed in ``compress_args``;
* any other residual is compressed if it depends on an activation: an argument listed in
  ``compress_args`` or, when none is listed, any argument. So with activations listed,
  whatever is computed from weights alone (a fake-quantized weight) stays exact;
* a residual computed by a primitive the analysis cannot look into stays exact, with a
  warning; integer, tiny (``< group_size`` elements) residuals and per-row statistics
  (:func:`row_statistics`) stay exact too.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from jaxq.act import flow


def is_float(aval) -> bool:
  return jnp.issubdtype(aval.dtype, jnp.floating)


@dataclasses.dataclass(frozen=True)
class Forward:
  """fn's forward pass with its residuals, traced once.

  ``jaxpr``: ClosedJaxpr from the flat arguments to ``(output leaves, residuals)``;
  ``out_tree``; ``treedef`` of the VJP closure and ``slots``, one per closure leaf:
  ``("r", k)`` residual ``k`` or ``("const", value)`` a non-array leaf;
  ``compress[k]``: whether residual ``k`` is stored compressed; ``first[k]``: the first
  residual that is the same value (stored once).
  """
  jaxpr: Any
  out_tree: Any
  treedef: Any
  slots: tuple
  compress: tuple[bool, ...]
  first: tuple[int, ...]

  def stored(self, compressed: bool) -> list[int]:
    """The residuals stored (once each) compressed, or kept as they are."""
    return [k for k, (c, f) in enumerate(zip(self.compress, self.first))
            if c == compressed and f == k]

  @property
  def n_out(self) -> int:
    return self.out_tree.num_leaves

  def residual_avals(self) -> list:
    return [v.aval for v in self.jaxpr.jaxpr.outvars[self.n_out:]]


def _opaque_warning(names: set[str]) -> None:
  warnings.warn(
      "jaxq.act.compressed_vjp cannot analyse the primitive(s) "
      f"{sorted(names)}: the residuals computed through them are kept exact "
      "(not compressed)", UserWarning, stacklevel=4)


def row_statistics(avals) -> set[int]:
  """Indices of float residuals that are per-row statistics of a larger residual
  (LayerNorm's mean and 1/sigma, softmax normalisers): shapes whose non-unit dimensions
  are a subsequence of another float residual's shape with at least ``8x`` as many
  elements. Kept exactly, as ActNN does: small, and the backward pass scales (divides)
  whole rows by them, so their rounding error is not averaged out."""
  big = {tuple(a.shape) for a in avals if is_float(a)}
  out = set()
  for i, a in enumerate(avals):
    if not is_float(a):
      continue
    size = max(int(np.prod(a.shape, dtype=np.int64)), 1)
    core = tuple(d for d in a.shape if d != 1)
    for b in big:
      it = iter(b)
      if (int(np.prod(b, dtype=np.int64)) >= 8 * size
          and all(any(d == e for e in it) for d in core)):
        out.add(i)
        break
  return out


def trace_forward(fn_flat: Callable[..., Any], flat_args: Sequence[Any],
                  activation: Sequence[bool], explicit: Sequence[bool],
                  group_size: int) -> Forward:
  """Traces ``jax.vjp(fn_flat, *flat_args)`` once and decides, per residual, whether it
  is compressed (module docstring). ``activation[i]``: whether flat argument ``i`` counts
  as an activation for residuals computed from it; ``explicit[i]``: whether it is itself
  saved compressed (listed in ``compress_args``)."""
  cell: dict[str, Any] = {}

  def leaves_fn(*flat):
    out, vjp_fn = jax.vjp(fn_flat, *flat)
    leaves, cell["treedef"] = jax.tree_util.tree_flatten(vjp_fn)
    out_leaves, cell["out_tree"] = jax.tree_util.tree_flatten(out)
    arrays, slots = [], []
    for leaf in leaves:
      if isinstance(leaf, jax.Array):
        slots.append(("r", len(arrays)))
        arrays.append(leaf)
      else:
        slots.append(("const", leaf))
    cell["slots"] = slots
    return out_leaves, arrays

  closed = jax.make_jaxpr(leaves_fn)(
      *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in flat_args])
  n_out = cell["out_tree"].num_leaves
  opaque: set[str] = set()
  fs = flow.facts(closed.jaxpr, len(flat_args),
                  on_opaque=lambda eqn: opaque.add(eqn.primitive.name))
  outvars = closed.jaxpr.outvars[n_out:]
  stats = row_statistics([v.aval for v in outvars])
  act_mask = sum(1 << i for i, a in enumerate(activation) if a)
  compress, first, firsts, unknown = [], {}, [], False
  for k, (v, f) in enumerate(zip(outvars, fs[n_out:])):
    aval = v.aval
    size = int(np.prod(aval.shape, dtype=np.int64))
    want = is_float(aval) and size >= group_size and k not in stats
    if want and f.unknown:
      unknown, want = True, False
    elif want:
      want = bool(explicit[f.view]) if f.view >= 0 else bool(f.deps & act_mask)
    if isinstance(v, jex_core.Var):
      first.setdefault(v, k)
      want = compress[first[v]] if first[v] != k else want
    firsts.append(first.get(v, k) if isinstance(v, jex_core.Var) else k)
    compress.append(want)
  if unknown:
    _opaque_warning(opaque)
  return Forward(closed, cell["out_tree"], cell["treedef"], tuple(cell["slots"]),
                 tuple(compress), tuple(firsts))


def run_forward(fwd: Forward, flat_args: Sequence[Any]) -> tuple[list, list]:
  """``(output leaves, residuals)`` of fn at ``flat_args`` (JAX's own jaxpr evaluator)."""
  vals = jex_core.jaxpr_as_fun(fwd.jaxpr)(*flat_args)
  return list(vals[:fwd.n_out]), list(vals[fwd.n_out:])


def apply_closure(fwd: Forward, residuals: Sequence[Any], ct_leaves: Sequence[Any]) -> list:
  """The VJP closure rebuilt from ``residuals`` applied to the output cotangent: the flat
  argument cotangents."""
  leaves = [v if kind == "const" else residuals[v] for kind, v in fwd.slots]
  vjp_fn = jax.tree_util.tree_unflatten(fwd.treedef, leaves)
  return list(vjp_fn(jax.tree_util.tree_unflatten(fwd.out_tree, list(ct_leaves))))


def backward_jaxpr(fwd: Forward, ct_leaves: Sequence[Any]):
  """The backward pass as a ClosedJaxpr over (compressed residuals in order, kept
  residuals in order, output cotangent leaves)."""
  avals = fwd.residual_avals()
  comp, kept = fwd.stored(True), fwd.stored(False)

  def f(c_vals, k_vals, ct):
    res = dict(zip(comp, c_vals)) | dict(zip(kept, k_vals))
    return apply_closure(fwd, [res[fwd.first[k]] for k in range(len(avals))], ct)

  spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
  return jax.make_jaxpr(f)([spec(avals[k]) for k in comp], [spec(avals[k]) for k in kept],
                           [spec(c) for c in ct_leaves])


@dataclasses.dataclass(frozen=True)
class Residual:
  """One residual :func:`compressed_vjp` compresses: ``shape``, ``dtype``, whether the
  backward pass is affine in it (``linear``): then independent unbiased rounding of it
  keeps the gradient unbiased at any width; a residual used non-linearly (LayerNorm's
  normalised values multiplied by themselves, softmax probabilities, activation-function
  derivatives) gets a gradient bias of order ``Var(noise)``; and whether it feeds only
  weight gradients (``weight_only``, e.g. a Dense layer's input, read by ``dW = x^T dy``
  alone), where its rounding noise adds to the gradient once instead of compounding along
  the backward pass (:func:`weight_only`)."""
  shape: tuple[int, ...]
  dtype: Any
  linear: bool
  weight_only: bool

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))


def weight_only(bwd_jaxpr, n_compressed: int, weight_outputs: Sequence[bool]) -> list[bool]:
  """For each of the first ``n_compressed`` inputs of the backward jaxpr: whether every
  output it reaches is a weight cotangent (``weight_outputs[k]``). Any other residual
  (attention probabilities, normalised values, activation derivatives) scales the
  activation cotangent passed to the layers below, so its noise multiplies with theirs."""
  n_in = len(bwd_jaxpr.invars)
  outs = flow.reach(bwd_jaxpr, [1 << j if j < n_compressed else 0 for j in range(n_in)])
  if len(outs) != len(weight_outputs):
    raise ValueError(f"the backward pass has {len(outs)} outputs, expected one per "
                     f"argument leaf ({len(weight_outputs)})")
  return [all(weight_outputs[k] for k, m in enumerate(outs) if m >> j & 1)
          for j in range(n_compressed)]


def describe(bwd_closed, n_compressed: int,
             weight_outputs: Sequence[bool]) -> list[Residual]:
  """:class:`Residual` of each of the first ``n_compressed`` inputs of the backward pass
  ``bwd_closed`` (the compressed residuals, in order)."""
  jaxpr = bwd_closed.jaxpr
  comp = [v.aval for v in jaxpr.invars[:n_compressed]]
  w_only = weight_only(jaxpr, len(comp), weight_outputs)
  n_in = len(jaxpr.invars)
  out = []
  for j, a in enumerate(comp):
    deg = max(flow.degrees(jaxpr, [int(i == j) for i in range(n_in)]), default=0)
    out.append(Residual(tuple(a.shape), a.dtype, deg <= 1, w_only[j]))
  return out
