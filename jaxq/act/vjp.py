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
from jaxq.act.adaptive import (SampleBits, SampleCompressed, compress_samples,
                               decompress_samples, has_sample_bits)

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


def _call_jaxpr(eqn):
  """The jaxpr of a call-like equation (``pjit``, ``checkpoint``, ``closed_call``, ...)
  whose inputs and outputs map one to one onto the equation's, else None."""
  sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  sub = getattr(sub, "jaxpr", sub)
  if sub is not None and hasattr(sub, "eqns") and len(sub.invars) == len(eqn.invars) \
      and len(sub.outvars) == len(eqn.outvars):
    return sub
  return None


def _propagate(jaxpr, in_vals: list, rule, absent) -> list:
  """Forward data flow over ``jaxpr``: each variable's value, ``absent`` where nothing
  reaches it. An equation with no present input is skipped; a call-like one (``pjit``,
  ``checkpoint``, ...) is followed through its own jaxpr; any other gives
  ``rule(eqn, input_values)``, one value per output. Returns the outputs' values."""
  val: dict[Any, Any] = {v: x for v, x in zip(jaxpr.invars, in_vals) if x != absent}
  get = lambda v: absent if isinstance(v, Literal) else val.get(v, absent)  # noqa: E731
  for eqn in jaxpr.eqns:
    xs = [get(v) for v in eqn.invars]
    if all(x == absent for x in xs):
      continue
    sub = _call_jaxpr(eqn)
    outs = _propagate(sub, xs, rule, absent) if sub is not None else rule(eqn, xs)
    for v, x in zip(eqn.outvars, outs):
      if x != absent:
        val[v] = x
  return [get(v) for v in jaxpr.outvars]


def _origin_rule(eqn, origins: list[int | None]) -> list[int | None]:
  if eqn.primitive.name in _VIEW_PRIMITIVES and len(eqn.invars) == 1:
    return origins
  return [None] * len(eqn.outvars)


def _origins(jaxpr, in_origins: list[int | None]) -> list[int | None]:
  """Propagates "view of argument i" through a jaxpr (and the jaxprs of call-like
  equations such as ``pjit`` and ``checkpoint``); returns it for each output."""
  return _propagate(jaxpr, in_origins, _origin_rule, None)


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


def _check_width(b, name: str):
  if isinstance(b, SampleBits):
    return b
  if isinstance(b, (int, np.integer)) and not isinstance(b, bool):
    return pack.check_bits(b, name)
  raise ValueError(f"{name} must be one of {pack.VALID_BITS} or a jaxq.act.SampleBits, "
                   f"got {b!r}")


def _validate(bits, group_size, compress_args):
  if isinstance(bits, (tuple, list)):
    if not bits:
      raise ValueError("bits must not be an empty sequence")
    bits = tuple(_check_width(b, f"bits[{i}]") for i, b in enumerate(bits))
  else:
    bits = _check_width(bits, "bits")
  widths = set()
  for b in bits if isinstance(bits, tuple) else (bits,):
    widths |= set(b.widths) if isinstance(b, SampleBits) else {b}
  group_size = pack.check_group_size(group_size, min(widths))
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


def compressed_vjp(fn: Callable[..., Any], bits: int | SampleBits | Sequence = 2,
                   group_size: int = 256,
                   compress_args: Sequence[int] = ()) -> Callable[..., Any]:
  """Wraps ``fn`` so that its residuals are saved compressed (ActNN, Chen et al. 2021).

  Args:
    fn: any JAX-traceable function of pytrees of arrays (a layer, a block, a model).
    bits: code width of the compressed residuals, one of 1, 2, 4, 8; or a
      :class:`~jaxq.act.SampleBits` (per-sample widths: each sample of a residual that
      has a leading batch axis and feeds only weight gradients gets a width from its own
      sensitivity, a static number of samples per width; other residuals
      ``SampleBits.fallback`` bits); or a tuple of
      those, one per compressed residual in the order of the VJP closure's leaves
      (per-residual widths; :func:`compressed_residuals` lists them), its length checked
      when ``g`` is traced.
    group_size: elements sharing one ``(lo, scale)``; a multiple of ``8 // bits`` for
      every width used.
      Residuals are flattened (keeping the leading axis when its rows hold whole groups)
      and edge-padded to whole groups.
    compress_args: positions of fn's arguments that are activations (e.g. the input ``x``
      of a single Dense layer) and are saved compressed when the backward pass needs them.
      All other arguments (weights) are saved as they are.

  Returns:
    ``g(*args, key=None, probe=None, sample_weight=None)`` returning ``fn(*args)``
    bitwise. With a PRNG ``key`` the residuals are rounded stochastically (unbiased
    gradients); with ``key=None`` to nearest. ``probe`` (optional ``f32[3]``, normally
    zeros) receives, as its gradient, the statistics adaptive precision needs (see
    :mod:`jaxq.act.adaptive`): ``[sum_g S * range_g^2, number of compressed elements,
    |cotangent|^2 / rows]``. ``sample_weight`` (``f32[B]``, only with
    :class:`~jaxq.act.SampleBits` widths) is each sample's gradient-norm estimate
    ``G_n`` (e.g. :func:`~jaxq.act.output_grad_sqnorm` from the sample's last visit):
    samples are then ranked by ``G_n R_n`` instead of ``R_n``, ActNN's per-sample
    sensitivity. It is not differentiated.
  """
  bits, group_size, compress_args = _validate(bits, group_size, compress_args)

  @functools.wraps(fn)
  def g(*args, key=None, probe=None, sample_weight=None):
    if any(p >= len(args) for p in compress_args):
      raise ValueError(
          f"compress_args={compress_args} names a position >= the {len(args)} arguments "
          f"given to {getattr(fn, '__name__', fn)!r}")
    seed = None if key is None else numerics.seed_from_key(key)
    batch = _batch_size(bits, args, compress_args)
    if sample_weight is not None:
      sample_weight = _check_sample_weight(sample_weight, bits, batch)
    return _call(fn, bits, group_size, compress_args, args, seed, probe, batch, sample_weight)

  return g


def _select(fn, args, group_size, compress_args):
  """Runs ``jax.vjp(fn, *args)`` (traced) and sorts the closure's leaves: returns
  ``(out, treedef, slots, to_compress, kept)`` (slots as in :class:`_Plan`)."""
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
      slot = ("c", len(compressed))
      compressed.append(leaf)
    else:
      slot = ("k", len(kept))
      kept.append(leaf)
    seen[id(leaf)] = slot
    slots.append(slot)
  return out, treedef, tuple(slots), compressed, kept


#: Primitives whose output is linear in each operand separately (so of degree
#: ``sum(operand degrees)``: a product of two uses of one residual is degree 2).
_BILINEAR = frozenset({"mul", "dot_general", "conv_general_dilated"})
#: Primitives whose output is an affine function of their operands jointly (degree
#: ``max(operand degrees)``), given the operands named in :data:`_ONLY_FIRST_AFFINE`.
_AFFINE = frozenset(_VIEW_PRIMITIVES | {
    "add", "add_any", "sub", "neg", "reduce_sum", "concatenate", "pad", "cumsum",
    "dynamic_slice", "dynamic_update_slice", "gather", "scatter-add", "scatter_add",
    "select_n", "real", "imag", "complex", "conj", "psum", "all_gather",
    "reduce_scatter"})
#: Affine only in their first operand (``div``: numerator; gather/dynamic_slice: indices
#: after the first operand must not depend on the residual; select_n: predicate first).
_ONLY_FIRST_AFFINE = frozenset({"div", "dynamic_slice", "gather"})


def _degree_rule(eqn, ds: list[int]) -> list[int]:
  name = eqn.primitive.name
  if name in _BILINEAR:
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


def _degrees(jaxpr, in_deg: list[int]) -> list[int]:
  """Polynomial degree (0, 1, or 2 meaning ">= 2 / non-polynomial") of each output of
  ``jaxpr`` in one input, given the inputs' degrees; sub-jaxprs of call-like equations are
  followed, any other primitive with a dependent operand gives 2."""
  return _propagate(jaxpr, in_deg, _degree_rule, 0)


@dataclasses.dataclass(frozen=True)
class Residual:
  """One residual :func:`compressed_vjp` compresses: ``shape``, ``dtype``, whether the
  backward pass is affine in it (``linear``): then independent unbiased rounding of it
  keeps the gradient unbiased at any width; a residual used non-linearly (LayerNorm's
  normalised values multiplied by themselves, softmax probabilities, activation-function
  derivatives) gets a gradient bias of order ``Var(noise)``; and whether it feeds only
  weight gradients (``weight_only``, e.g. a Dense layer's input, read by ``dW = x^T dy``
  alone), where its rounding noise adds to the gradient once instead of compounding along
  the backward pass (:func:`_weight_only`)."""
  shape: tuple[int, ...]
  dtype: Any
  linear: bool
  weight_only: bool

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))


def _apply_closure(treedef, slots, dec, kept, ct):
  """The VJP closure rebuilt from decompressed residuals ``dec`` and ``kept`` leaves
  (``slots`` as in :class:`_Plan`), applied to the cotangent ``ct``."""
  leaves = [v if kind == "const" else dec[v] if kind == "c" else kept[v]
            for kind, v in slots]
  return jax.tree_util.tree_unflatten(treedef, leaves)(ct)


def _closure_jaxpr(treedef, slots, comp, kept, out):
  """The jaxpr of the rebuilt VJP closure over (compressed residuals, kept leaves, output
  cotangent); outputs: the flat argument cotangents."""
  ct = jax.tree_util.tree_map(jnp.zeros_like, out)
  closure = functools.partial(_apply_closure, treedef, slots)
  return jax.make_jaxpr(closure)(comp, kept, ct).jaxpr


def _backward_jaxpr(fn, args, group_size, compress_args):
  """Inside a trace of ``fn(*args)``: the jaxpr of its backward pass over (compressed
  residuals, kept leaves, output cotangent), and the residuals to compress."""
  out, treedef, slots, comp, kept = _select(fn, args, group_size, compress_args)
  return _closure_jaxpr(treedef, slots, comp, kept, out), comp


def _mask_rule(eqn, masks: list[int]) -> list[int]:
  m = 0
  for x in masks:
    m |= x
  return [m] * len(eqn.outvars)


def _reach(jaxpr, in_masks: list[int]) -> list[int]:
  """Bitmask of the inputs each output of ``jaxpr`` depends on, given each input's mask
  (call-like equations followed input by input; any other equation makes each output
  depend on all its inputs, so a dependence is never missed)."""
  return _propagate(jaxpr, in_masks, _mask_rule, 0)


def _weight_only(jaxpr, n_compressed: int, weight_outputs: Sequence[bool]) -> list[bool]:
  """For each of the first ``n_compressed`` inputs of the backward ``jaxpr``: whether
  every output it reaches is a weight cotangent (``weight_outputs[k]``). Such a residual
  is multiplied into one weight gradient term; any other (attention probabilities,
  normalised values, activation derivatives) scales the activation cotangent passed to
  the layers below, so its rounding noise multiplies with theirs."""
  outs = _reach(jaxpr, [1 << j if j < n_compressed else 0 for j in range(len(jaxpr.invars))])
  if len(outs) != len(weight_outputs):
    raise ValueError(f"the backward pass has {len(outs)} outputs, expected one per "
                     f"argument leaf ({len(weight_outputs)})")
  return [all(weight_outputs[k] for k, m in enumerate(outs) if m >> j & 1)
          for j in range(n_compressed)]


def _weight_outputs(args, compress_args) -> list[bool]:
  """Per flat argument leaf: whether its cotangent is a weight gradient (the argument is
  not an activation listed in ``compress_args``)."""
  return [p not in compress_args for p, a in enumerate(args)
          for _ in jax.tree_util.tree_leaves(a)]


def compressed_residuals(fn: Callable[..., Any], *args, group_size: int = 256,
                         compress_args: Sequence[int] = ()) -> list[Residual]:
  """The residuals :func:`compressed_vjp` compresses for ``fn(*args)``, in the order a
  per-residual ``bits`` tuple refers to (:class:`Residual`: shape, dtype, and whether the
  backward pass uses it linearly). Computed abstractly (traces only)."""
  _, group_size, compress_args = _validate(8, group_size, compress_args)
  cell = []

  def f(*a):
    jaxpr, comp = _backward_jaxpr(fn, a, group_size, compress_args)
    n_in = len(jaxpr.invars)
    weight_only = _weight_only(jaxpr, len(comp), _weight_outputs(a, compress_args))
    for j, l in enumerate(comp):
      deg = max(_degrees(jaxpr, [int(i == j) for i in range(n_in)]), default=0)
      cell.append(Residual(tuple(l.shape), l.dtype, deg <= 1, weight_only[j]))
    return 0

  jax.eval_shape(f, *args)
  return list(cell)


def _batch_size(bits, args, compress_args) -> int | None:
  """Leading size marking per-sample residuals (:class:`SampleBits`), else None."""
  specs = bits if isinstance(bits, tuple) else (bits,)
  explicit = {b.batch_size for b in specs if isinstance(b, SampleBits)} - {None}
  if len(explicit) > 1:
    raise ValueError(f"SampleBits entries of bits name different batch sizes {explicit}")
  if explicit:
    return explicit.pop()
  if not has_sample_bits(bits):
    return None
  for p in compress_args:
    for leaf in jax.tree_util.tree_leaves(args[p]):
      if getattr(leaf, "ndim", 0) >= 1:
        return int(leaf.shape[0])
  return None


def _check_sample_weight(w, bits, batch) -> jax.Array:
  if not has_sample_bits(bits):
    raise ValueError("sample_weight ranks samples for per-sample widths; it needs bits to "
                     f"be (or hold) a jaxq.act.SampleBits, got bits={bits!r}")
  if batch is None:
    raise ValueError("sample_weight needs the batch size: list the activation input in "
                     "compress_args or set SampleBits.batch_size")
  w = jnp.asarray(w)
  if w.shape != (batch,) or not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"sample_weight must be a float array of shape ({batch},) (one weight "
                     f"per sample of the batch), got {w.dtype}{list(w.shape)}")
  return jax.lax.stop_gradient(w.astype(jnp.float32))


def _compress_leaf(leaf, spec, group_size, seed, batch, weight=None, weight_only=False):
  """One residual as CompressedArray (int ``spec``) or per sample (SampleBits, for a
  ``weight_only`` residual with the batch on its leading axis)."""
  if isinstance(spec, SampleBits):
    if (weight_only and batch is not None and batch > 1 and leaf.ndim >= 2
        and leaf.shape[0] == batch):
      return compress_samples(leaf, spec.counts(batch), group_size, seed, weight)
    spec = spec.fallback
  return pack.compress(leaf, spec, group_size, seed)


def _decompress(c):
  return decompress_samples(c) if isinstance(c, SampleCompressed) else pack.decompress(c)


def _parts(c) -> tuple[pack.CompressedArray, ...]:
  return c.parts if isinstance(c, SampleCompressed) else (c,)


def _call(fn, bits, group_size, compress_args, args, seed, probe, batch=None, weight=None):
  plan_cell: dict[str, _Plan] = {}

  @jax.custom_vjp
  def run(args, seed, probe, weight):
    del seed, probe, weight
    return fn(*args)

  def fwd(args, seed, probe, weight):
    if not any(isinstance(l, jax.core.Tracer) for l in jax.tree_util.tree_leaves(args)):
      # Eager call: ``jax.vjp`` on concrete arrays builds its closure differently (other
      # leaves, in another order) from the traced one that :func:`_closure_origins`
      # analyses; tracing the forward rule makes both the same, as under ``jit``.
      return jax.jit(traced_fwd)(args, seed, probe, weight)
    return traced_fwd(args, seed, probe, weight)

  def traced_fwd(args, seed, probe, weight):
    del probe
    out, treedef, slots, compressed, kept = _select(fn, args, group_size, compress_args)
    plan_cell["plan"] = _Plan(treedef, slots)
    if isinstance(bits, tuple) and len(bits) != len(compressed):
      raise ValueError(
          f"bits has {len(bits)} entries but {getattr(fn, '__name__', fn)!r} has "
          f"{len(compressed)} compressed residuals, shapes "
          f"{[tuple(l.shape) for l in compressed]}")
    specs = bits if isinstance(bits, tuple) else (bits,) * len(compressed)
    weight_only = [False] * len(compressed)
    if batch is not None and has_sample_bits(bits):
      weight_only = _weight_only(_closure_jaxpr(treedef, slots, compressed, kept, out),
                                 len(compressed), _weight_outputs(args, compress_args))
    compressed = [
        _compress_leaf(l, b, group_size,
                       None if seed is None else numerics.derive_seed(seed, j), batch,
                       weight, w_only)
        for j, (l, b, w_only) in enumerate(zip(compressed, specs, weight_only))]
    # fn's output depends (by an exact - (+0)) on the packed residuals: the next layer then
    # starts only once these are packed, and the float residuals die here.
    if compressed:
      dep = jnp.minimum(jnp.isnan(_parts(compressed[-1])[-1].lo[0]).astype(jnp.float32),
                        0.0)
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
    return tuple(arg_cts), None, probe_ct, None

  run.defvjp(fwd, bwd)
  return run(tuple(args), seed, probe, weight)


def _after(c, x: jax.Array):
  """``c`` unchanged in value but computed after ``x``: ``lo - min(isnan(x[0]), 0)``.

  ``jax.lax.optimization_barrier`` would say the same, but XLA:CPU expands barriers away
  before scheduling, and its scheduler then hoists the decompression of every layer into
  the forward pass (float activations alive from forward to backward: no memory saved).
  A data dependency survives every pass; ``min(isnan(.), 0)`` is exactly 0 yet not
  foldable, and costs one scalar op per group.
  """
  dep = jnp.minimum(jnp.isnan(x.reshape(-1)[0]).astype(jnp.float32), 0.0)
  if isinstance(c, SampleCompressed):
    return dataclasses.replace(c, parts=tuple(_after(p, x) for p in c.parts))
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

  closure = functools.partial(_apply_closure, plan.treedef, plan.slots)
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
        env[v] = _decompress(c)
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
  parts = [p for c in compressed for p in _parts(c)]
  sr2 = sum((jnp.sum(((2.0**c.bits - 1) / c.scale) ** 2) * c.packed.shape[1] * 8 // c.bits
             for c in parts), jnp.float32(0))
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
