"""``compressed_vjp``: any JAX function with its saved activations compressed (ActNN).

Reverse-mode autodiff keeps, from the forward pass, the *residuals* the backward pass needs
(layer inputs, attention maps, normalised values, activation-function inputs, ...). They
dominate training memory. ActNN (Chen et al. 2021) stores them with 2-bit per-group
stochastic quantization instead: the forward pass is unchanged, the gradient stays
unbiased, and its variance grows only by ``O(range^2 / (2^b - 1)^2)``.

How: a ``jax.custom_vjp`` whose forward rule runs ``jax.vjp(fn, *args)``. The VJP closure
JAX returns is a pytree whose leaves are exactly the residuals. Leaves that are fn's own
arguments (weights, and activation inputs unless listed in ``compress_args``), integer
leaves, tiny leaves and row statistics (see :func:`_row_statistics`) are kept as they are;
every other floating-point leaf is stored as a
:class:`~jaxq.act.pack.CompressedArray`. The backward rule decompresses them, rebuilds the
closure (``tree_unflatten``) and applies it to the incoming cotangent. Shapes and dtypes of
the residuals are kept (bf16 residuals come back as bf16).

Weights are recognised as arguments even when fn casts or transposes them first (e.g.
Flax's ``promote_dtype`` to bf16): a residual computed from one argument leaf through
casts/reshapes/transposes only counts as that argument.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.extend.core import Literal

from jaxq import numerics
from jaxq.act import pack

#: ``checkpoint_name`` of the compressed residuals (codes, lo, scale).
PACKED_NAME = "jaxq_act_packed"
#: ``checkpoint_name`` of residuals kept as they are (arguments, integer and tiny leaves).
KEPT_NAME = "jaxq_act_kept"

#: Primitives that only move, reshape or re-type data: a residual reached from a single
#: argument leaf through these alone is that argument (e.g. a bf16 copy of a weight).
_VIEW_PRIMITIVES = frozenset({
    "convert_element_type", "transpose", "reshape", "squeeze", "expand_dims",
    "broadcast_in_dim", "copy", "copy_p", "reduce_precision", "rev", "slice", "name",
})


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static decisions for one traced call: how to rebuild the VJP closure."""
  treedef: Any
  # For each closure leaf: ("c", j) compressed slot j, ("k", j) kept slot j, or
  # ("const", value) a non-array leaf carried statically.
  slots: tuple


def _is_float_array(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)


def _leaf_origins(leaves_fn, flat_args) -> list[int | None] | None:
  """For each leaf ``leaves_fn(*flat_args)`` returns: the index of the argument it is a view
  of (reached through :data:`_VIEW_PRIMITIVES` only), else None.

  Traces ``leaves_fn`` to a jaxpr; returns None if that fails (callers then fall back to
  object identity).
  """
  try:
    closed = jax.make_jaxpr(leaves_fn)(
        *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in flat_args])
  except Exception:  # noqa: BLE001 -- analysis is an optimisation, never a failure
    return None
  return _origins(closed.jaxpr, list(range(len(flat_args))))


def _origins(jaxpr, in_origins: list[int | None]) -> list[int | None]:
  """Propagates "view of argument i" through a jaxpr (and the jaxprs of call-like
  equations such as ``pjit`` and ``checkpoint``); returns it for each output."""
  origin: dict[Any, int] = {v: o for v, o in zip(jaxpr.invars, in_origins) if o is not None}
  get = lambda v: None if isinstance(v, Literal) else origin.get(v)  # noqa: E731
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _VIEW_PRIMITIVES and len(eqn.invars) == 1:
      o = get(eqn.invars[0])
      if o is not None:
        origin[eqn.outvars[0]] = o
      continue
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    sub = getattr(sub, "jaxpr", sub)
    if sub is not None and hasattr(sub, "eqns") and len(sub.invars) == len(eqn.invars) \
        and len(sub.outvars) == len(eqn.outvars):
      if any(get(v) is not None for v in eqn.invars):
        for ov, o in zip(eqn.outvars, _origins(sub, [get(v) for v in eqn.invars])):
          if o is not None:
            origin[ov] = o
  return [get(v) for v in jaxpr.outvars]


def _is_subsequence(small: tuple, big: tuple) -> bool:
  it = iter(big)
  return all(any(d == b for b in it) for d in small)


def _row_statistics(leaves) -> set[int]:
  """Ids of float leaves that are per-row statistics of a larger residual (LayerNorm's
  mean and 1/sigma, softmax normalisers): shapes whose non-unit dimensions are a
  subsequence of another float residual's shape with at least ``8x`` as many elements.

  They are kept exactly, as ActNN does: they cost a small fraction of the memory, and the
  backward pass scales whole rows by them, so their quantization noise is not averaged
  out (2-bit training of a small ViT loses ~5 points of accuracy when they are compressed,
  none when they are not; tests/test_act_train.py).
  """
  floats = [l for l in leaves if _is_float_array(l)]
  big = {tuple(l.shape) for l in floats}
  out = set()
  for l in floats:
    core = tuple(d for d in l.shape if d != 1)
    if any(int(np.prod(b)) >= 8 * max(l.size, 1) and _is_subsequence(core, b) for b in big):
      out.add(id(l))
  return out


def _closure_origins(fn, args, n_leaves) -> list[int | None] | None:
  """:func:`_leaf_origins` of the leaves of ``jax.vjp(fn, *args)``'s closure."""
  flat_args, in_tree = jax.tree_util.tree_flatten(args)

  def leaves_fn(*flat):
    _, vjp_fn = jax.vjp(fn, *jax.tree_util.tree_unflatten(in_tree, flat))
    return jax.tree_util.tree_leaves(vjp_fn)

  out = _leaf_origins(leaves_fn, flat_args)
  return out if out is not None and len(out) == n_leaves else None


def _validate(bits, group_size, compress_args) -> tuple[int, int, tuple[int, ...]]:
  bits = pack.check_bits(bits)
  group_size = pack.check_group_size(group_size, bits)
  if isinstance(compress_args, (int, np.integer)):
    compress_args = (compress_args,)
  try:
    compress_args = tuple(compress_args)
  except TypeError:
    raise TypeError(
        f"compress_args must be a sequence of argument positions, got {compress_args!r}"
    ) from None
  for p in compress_args:
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 0:
      raise ValueError(
          f"compress_args must hold non-negative argument positions, got {compress_args!r}")
  return bits, group_size, tuple(int(p) for p in compress_args)


def compressed_vjp(fn: Callable[..., Any], bits: int = 2, group_size: int = 256,
                   compress_args: Sequence[int] = ()) -> Callable[..., Any]:
  """Wraps ``fn`` so that its residuals are saved compressed (ActNN, Chen et al. 2021).

  Args:
    fn: any JAX-traceable function of pytrees of arrays (a layer, a block, a model).
    bits: code width of the compressed residuals, one of 1, 2, 4, 8.
    group_size: elements sharing one ``(lo, scale)``; a multiple of ``8 // bits``.
      Residuals are flattened (keeping the leading axis when its rows hold whole groups)
      and edge-padded to whole groups.
    compress_args: positions of fn's arguments that are activations (e.g. the input ``x``
      of a single Dense layer) and are saved compressed when the backward pass needs them.
      All other arguments (weights) are saved as they are.

  Returns:
    ``g(*args, key=None, probe=None)`` returning ``fn(*args)`` bitwise. With a PRNG ``key``
    the residuals are rounded stochastically (unbiased gradients); with ``key=None`` to
    nearest. ``probe`` (optional ``f32[3]``, normally zeros) receives, as its gradient,
    the statistics adaptive precision needs (see :mod:`jaxq.act.adaptive`):
    ``[sum_g S * range_g^2, number of compressed elements, |cotangent|^2 / rows]``.
  """
  bits, group_size, compress_args = _validate(bits, group_size, compress_args)

  @functools.wraps(fn)
  def g(*args, key=None, probe=None):
    if any(p >= len(args) for p in compress_args):
      raise ValueError(
          f"compress_args={compress_args} names a position >= the {len(args)} arguments "
          f"given to {getattr(fn, '__name__', fn)!r}")
    seed = None if key is None else numerics.seed_from_key(key)
    return _call(fn, bits, group_size, compress_args, args, seed, probe)

  return g


def _call(fn, bits, group_size, compress_args, args, seed, probe):
  plan_cell: dict[str, _Plan] = {}

  @jax.custom_vjp
  def run(args, seed, probe):
    del seed, probe
    return fn(*args)

  def fwd(args, seed, probe):
    if not any(isinstance(l, jax.core.Tracer) for l in jax.tree_util.tree_leaves(args)):
      # Eager call: ``jax.vjp`` on concrete arrays builds its closure differently (other
      # leaves, in another order) from the traced one that :func:`_closure_origins`
      # analyses; tracing the forward rule makes both the same, as under ``jit``.
      return jax.jit(traced_fwd)(args, seed, probe)
    return traced_fwd(args, seed, probe)

  def traced_fwd(args, seed, probe):
    del probe
    out, vjp_fn = jax.vjp(fn, *args)
    leaves, treedef = jax.tree_util.tree_flatten(vjp_fn)
    flat_args = jax.tree_util.tree_leaves(args)
    arg_pos = []  # argument position of each flat arg leaf
    for p, a in enumerate(args):
      arg_pos += [p] * len(jax.tree_util.tree_leaves(a))
    by_id = {id(a): i for i, a in enumerate(flat_args)}
    # A weight cast/reshaped inside fn has the size of that weight: only then is the
    # (second) trace that follows residuals back to arguments worth its cost.
    plain_sizes = {a.size for a, p in zip(flat_args, arg_pos)
                   if p not in compress_args and _is_float_array(a)}
    origins = None
    if any(_is_float_array(l) and id(l) not in by_id and l.size in plain_sizes
           for l in leaves):
      origins = _closure_origins(fn, args, len(leaves))

    stats = _row_statistics(leaves)
    compressed, kept, slots, seen = [], [], [], {}
    for i, leaf in enumerate(leaves):
      if not isinstance(leaf, jax.Array):
        slots.append(("const", leaf))
        continue
      if id(leaf) in seen:
        slots.append(seen[id(leaf)])
        continue
      src = by_id.get(id(leaf))
      if src is None and origins is not None:
        src = origins[i]
      is_arg = src is not None
      want = (_is_float_array(leaf) and leaf.size >= group_size and id(leaf) not in stats
              and (not is_arg or arg_pos[src] in compress_args))
      if want:
        s = None if seed is None else numerics.derive_seed(seed, len(compressed))
        slot = ("c", len(compressed))
        compressed.append(pack.compress(leaf, bits, group_size, s))
      else:
        slot = ("k", len(kept))
        kept.append(leaf)
      seen[id(leaf)] = slot
      slots.append(slot)
    plan_cell["plan"] = _Plan(treedef, tuple(slots))
    # fn's output depends (by an exact - (+0)) on the packed residuals: the next layer then
    # starts only once these are packed, and the float residuals die here.
    if compressed:
      dep = jnp.minimum(jnp.isnan(compressed[-1].lo[0]).astype(jnp.float32), 0.0)
      out = jax.tree_util.tree_map(
          lambda o: o - dep.astype(o.dtype) if _is_float_array(o) else o, out)
    compressed = checkpoint_name(compressed, PACKED_NAME)
    kept = checkpoint_name(kept, KEPT_NAME)
    return out, (compressed, kept)

  def bwd(res, ct):
    compressed, kept = res
    plan = plan_cell["plan"]
    ct_leaves = jax.tree_util.tree_leaves(ct)
    arg_cts = _lazy_backward(plan, compressed, kept, ct)
    probe_ct = None if probe is None else _stats(compressed, ct_leaves)
    return tuple(arg_cts), None, probe_ct

  run.defvjp(fwd, bwd)
  return run(tuple(args), seed, probe)


def _after(c: pack.CompressedArray, x: jax.Array) -> pack.CompressedArray:
  """``c`` unchanged in value but computed after ``x``: ``lo - min(isnan(x[0]), 0)``.

  ``jax.lax.optimization_barrier`` would say the same, but XLA:CPU expands barriers away
  before scheduling, and its scheduler then hoists the decompression of every layer into
  the forward pass (float activations alive from forward to backward: no memory saved).
  A data dependency survives every pass; ``min(isnan(.), 0)`` is exactly 0 yet not
  foldable, and costs one scalar op per group.
  """
  dep = jnp.minimum(jnp.isnan(x.reshape(-1)[0]).astype(jnp.float32), 0.0)
  return dataclasses.replace(c, lo=c.lo - dep)  # x - (+0) == x bitwise, -0 included


def _lazy_backward(plan, compressed, kept, ct):
  """Applies the rebuilt VJP closure to ``ct``, decompressing each residual only where the
  backward computation first uses it.

  The closure is traced to a jaxpr over (residual leaves, cotangent) and evaluated equation
  by equation; before the first equation that reads compressed residual ``j``, its codes
  get a data dependency on one of that equation's other operands (:func:`_after`), so XLA
  cannot decompress it earlier: only the float residuals the current step of the backward
  pass needs are alive at a time, not the whole set (nor every layer's at once).
  """
  n_c = len(compressed)
  avals = [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in compressed]

  def closure(dec, kept, ct):
    leaves = [v if kind == "const" else dec[v] if kind == "c" else kept[v]
              for kind, v in plan.slots]
    return jax.tree_util.tree_unflatten(plan.treedef, leaves)(ct)

  closed = jax.make_jaxpr(closure)(avals, kept, ct)
  jaxpr = closed.jaxpr
  ct_leaves = jax.tree_util.tree_leaves(ct)
  env: dict[Any, Any] = {}
  for v, c in zip(jaxpr.constvars, closed.consts):
    env[v] = c
  dec_vars = jaxpr.invars[:n_c]
  for v, x in zip(jaxpr.invars[n_c:], list(kept) + ct_leaves):
    env[v] = x
  pending = {v: j for j, v in enumerate(dec_vars)}

  def read(v):
    return v.val if isinstance(v, Literal) else env[v]

  for eqn in jaxpr.eqns:
    need = [v for v in eqn.invars if not isinstance(v, Literal) and v in pending]
    if need:
      others = [read(v) for v in eqn.invars
                if not isinstance(v, Literal) and v not in pending and
                isinstance(read(v), jax.Array) and _is_float_array(read(v))]
      codes = [compressed[pending[v]] for v in need]
      if others:
        codes = [_after(c, others[0]) for c in codes]
      for v, c in zip(need, codes):
        env[v] = pack.decompress(c)
        del pending[v]
    outs = eqn.primitive.bind(*[read(v) for v in eqn.invars], **eqn.params)
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  outs = [read(v) for v in jaxpr.outvars]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(
      jax.eval_shape(closure, avals, kept, ct)), outs)


def _stats(compressed, ct_leaves) -> jax.Array:
  """``[sum_g S range_g^2, n compressed, |ct|^2 / rows]`` for :mod:`jaxq.act.adaptive`."""
  levels = [2.0**c.bits - 1 for c in compressed]
  sr2 = sum((jnp.sum((lv / c.scale) ** 2) * c.packed.shape[1] * 8 // c.bits
             for lv, c in zip(levels, compressed)), jnp.float32(0))
  n = float(sum(int(np.prod(c.shape)) for c in compressed))
  fl = [c for c in ct_leaves if _is_float_array(c)]
  ct2 = sum((jnp.sum(jnp.square(c.astype(jnp.float32))) * c.shape[-1] / max(c.size, 1)
             if c.ndim else jnp.square(c.astype(jnp.float32)) for c in fl), jnp.float32(0))
  return jnp.stack([sr2, jnp.float32(n), ct2]).astype(jnp.float32)


def residual_nbytes(fn: Callable[..., Any], *args, **kwargs) -> int:
  """Bytes that ``jax.vjp(fn, *args)`` keeps for the backward pass, fn's arguments excluded.

  The sum over the distinct leaves of the VJP closure (the residuals), leaving out those
  that are leaves of ``args`` (parameters, inputs), or casts/reshapes/names of them.
  Computed abstractly (a trace to a jaxpr): nothing is run. ``kwargs`` go to ``fn``.
  """
  flat_args, in_tree = jax.tree_util.tree_flatten(args)
  shapes = []

  def leaves_fn(*flat):
    a = jax.tree_util.tree_unflatten(in_tree, flat)
    _, vjp_fn = jax.vjp(lambda *p: fn(*p, **kwargs), *a)
    leaves, seen = [], set()
    for leaf in jax.tree_util.tree_leaves(vjp_fn):
      if isinstance(leaf, jax.Array) and id(leaf) not in seen:
        seen.add(id(leaf))
        leaves.append(leaf)
    shapes[:] = [(l.size, jnp.dtype(l.dtype).itemsize) for l in leaves]
    return leaves

  origins = _leaf_origins(leaves_fn, flat_args)
  if origins is None:
    raise ValueError("could not trace jax.vjp(fn, *args) to count its residuals")
  return int(sum(n * b for (n, b), o in zip(shapes, origins) if o is None))
