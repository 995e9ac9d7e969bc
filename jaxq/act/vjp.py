"""``compressed_vjp``: any JAX function with its saved activations compressed (ActNN).

Reverse-mode autodiff keeps, from the forward pass, the *residuals* the backward pass needs
(layer inputs, attention maps, normalised values, activation-function inputs, ...). They
dominate training memory. ActNN (Chen et al. 2021) stores them with 2-bit per-group
stochastic quantization instead: the forward pass is unchanged, the gradient stays
unbiased, and its variance grows only by ``O(range^2 / (2^b - 1)^2)``.

How: a ``jax.custom_vjp`` whose forward rule runs fn's forward pass with its VJP
residuals (:func:`jaxq.act.residuals.trace_forward`, one trace of ``jax.vjp`` that also
decides which residuals are activations: weights and anything computed from weights
alone stay exact), stores the activations as
:class:`~jaxq.act.pack.CompressedArray` and the rest as they are. The backward rule
evaluates the VJP closure's jaxpr, decompressing each residual right before its first use
(:mod:`jaxq.act.interpret`). fn is closure-converted first (``jax.closure_convert``):
values it closes over that are being differentiated (``lambda x: model.apply(params, x)``
under ``jax.grad`` of ``params``) become extra arguments, saved as weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxq import numerics
from jaxq.act import flow, fold, pack, recompute
from jaxq.act.adaptive import SampleBits, has_sample_bits
from jaxq.act.samples import SampleCompressed, compress_samples, decompress_samples
from jaxq.act.interpret import eval_lazily
from jaxq.act.residuals import (Forward, Residual, backward_jaxpr, describe, is_float,
                                run_forward, trace_forward, weight_only)

#: ``checkpoint_name`` of the compressed residuals (codes, lo, scale).
PACKED_NAME = "jaxq_act_packed"
#: ``checkpoint_name`` of residuals kept as they are (arguments, integer and tiny leaves).
KEPT_NAME = "jaxq_act_kept"

__all__ = ["KEPT_NAME", "PACKED_NAME", "Residual", "compressed_residuals", "compressed_vjp",
           "residual_nbytes"]


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
    group_size: at most this many elements share one ``(lo, scale)``; a multiple of
      ``8 // bits`` for every width used. Groups never span two rows of a residual (its
      last axis, see :mod:`jaxq.act.pack`): rows of very different scale (a blank image
      patch's token next to an ordinary one) are quantized in their own ranges.
    compress_args: positions of fn's arguments that are activations (e.g. the input ``x``
      of a single Dense layer) and are saved compressed when the backward pass needs them.
      Residuals computed from them are compressed; residuals computed from the other
      arguments alone (weights, casts or slices of them, fake-quantized weights) are not.
      With none listed, every argument counts as an activation for what is computed from
      it, but views of arguments (casts, reshapes, slices) are still kept exact.
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
    region = _Region.of(fn, args, compress_args)
    return region.call(bits, group_size, seed, probe, batch, sample_weight)

  return g


class _Region:
  """fn closure-converted over its flat argument leaves: ``fn_flat(*leaves, *hoisted)``,
  with which leaves are activations (``activation``) and which are listed in
  ``compress_args`` (``explicit``); hoisted closed-over values count as weights."""

  def __init__(self, fn_flat, leaves, hoisted, in_tree, positions, compress_args):
    self.fn_flat, self.in_tree = fn_flat, in_tree
    self.leaves = list(leaves) + list(hoisted)
    self.n_user = len(leaves)
    self.explicit = [p in compress_args for p in positions] + [False] * len(hoisted)
    self.activation = (self.explicit if compress_args
                       else [True] * len(leaves) + [False] * len(hoisted))

  @classmethod
  def of(cls, fn, args, compress_args) -> "_Region":
    leaves, in_tree = jax.tree_util.tree_flatten(tuple(args))
    positions = [p for p, a in enumerate(args) for _ in jax.tree_util.tree_leaves(a)]

    def fn_leaves(*flat):
      return fn(*jax.tree_util.tree_unflatten(in_tree, flat))

    converted, hoisted = jax.closure_convert(fn_leaves, *leaves)
    return cls(converted, leaves, hoisted, in_tree, positions, compress_args)

  def trace(self, leaves, group_size) -> Forward:
    return trace_forward(self.fn_flat, leaves, self.activation, self.explicit, group_size)

  def weight_outputs(self) -> list[bool]:
    """Per flat argument: whether its cotangent is a weight gradient."""
    return [not e for e in self.explicit]

  def call(self, bits, group_size, seed, probe, batch, weight):
    return _call(self, bits, group_size, seed, probe, batch, weight)


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


def _call(region: _Region, bits, group_size, seed, probe, batch, weight):
  cell: dict[str, Any] = {}

  @jax.custom_vjp
  def run(leaves, seed, probe, weight):
    del seed, probe, weight
    return region.fn_flat(*leaves)

  def fwd(leaves, seed, probe, weight):
    del probe
    plan = region.trace(leaves, group_size)
    out_leaves, res = run_forward(plan, leaves)
    kept = [res[k] for k in plan.stored(False)]
    cell["ct"] = _cotangent_specs(out_leaves)
    back = _backward(plan, cell["ct"])
    cell["plan"], cell["back"] = plan, back
    to_store = back.stored([res[k] for k in plan.stored(True)], kept)
    if isinstance(bits, tuple) and len(bits) != len(to_store):
      raise ValueError(
          f"bits has {len(bits)} entries but the function has {len(to_store)} compressed "
          f"residuals, shapes {[tuple(r.shape) for r in to_store]}")
    specs = bits if isinstance(bits, tuple) else (bits,) * len(to_store)
    w_only = [False] * len(to_store)
    if batch is not None and has_sample_bits(bits):
      w_only = weight_only(back.plain().jaxpr, len(to_store), region.weight_outputs())
    compressed = [
        _compress_leaf(r, b, group_size,
                       None if seed is None else numerics.derive_seed(seed, j), batch,
                       weight, wo)
        for j, (r, b, wo) in enumerate(zip(to_store, specs, w_only))]
    # fn's output depends (by an exact - (+0)) on the packed residuals: the next layer then
    # starts only once these are packed, and the float residuals die here.
    if compressed:
      dep = jnp.minimum(jnp.isnan(_parts(compressed[-1])[-1].lo[0]).astype(jnp.float32),
                        0.0)
      out_leaves = [o - dep.astype(o.dtype) if is_float(o) else o for o in out_leaves]
    compressed = checkpoint_name(compressed, PACKED_NAME)
    kept = checkpoint_name(kept, KEPT_NAME)
    return jax.tree_util.tree_unflatten(plan.out_tree, out_leaves), (compressed, kept)

  def bwd(res, ct):
    compressed, kept = res
    ct_leaves = jax.tree_util.tree_leaves(ct)
    back = cell["back"]
    if _cotangent_specs(ct_leaves) != cell["ct"]:
      back = _refold(cell["plan"], back, ct_leaves)
    arg_cts = eval_lazily(back.jaxpr, compressed, kept, ct_leaves, _decompress)
    probe_ct = None if probe is None else _stats(compressed, ct_leaves)
    return tuple(arg_cts), None, probe_ct, None

  run.defvjp(fwd, bwd)
  return run(tuple(region.leaves), seed, probe, weight)


def _cotangent_specs(outs) -> list:
  """The cotangents JAX passes for outputs ``outs`` (float0 for non-float ones)."""
  return [jax.ShapeDtypeStruct(tuple(o.shape),
                               o.dtype if is_float(o) or o.dtype == jax.dtypes.float0
                               else jax.dtypes.float0) for o in outs]


def _backward(plan: Forward, ct_specs) -> fold.Folded:
  """fn's backward pass over (stored compressed residuals, kept residuals, cotangents),
  its elementwise derivative factors folded (:mod:`jaxq.act.fold`) and residuals that
  are cheap affine functions of others recomputed (:mod:`jaxq.act.recompute`)."""
  closed = backward_jaxpr(plan, ct_specs)
  comp, kept = plan.stored(True), plan.stored(False)
  return fold.fold(closed, len(comp), len(kept),
                   recompute.recipes(plan.jaxpr, plan.n_out, comp, kept, closed))


def _refold(plan: Forward, back: fold.Folded, ct_leaves) -> fold.Folded:
  """The backward pass for cotangents other than those planned in the forward pass; it
  must read the same stored residuals."""
  new = _backward(plan, _cotangent_specs(ct_leaves))
  avals = lambda b: b.jaxpr.in_avals[:len(b.keep) + b.n_folded]  # noqa: E731
  if new.keep != back.keep or avals(new) != avals(back):
    raise RuntimeError("jaxq.act.compressed_vjp: the backward pass for cotangents "
                       f"{_cotangent_specs(ct_leaves)} reads other residuals than the one "
                       "planned in the forward pass")
  return new


def _stats(compressed, ct_leaves) -> jax.Array:
  """``[sum_g S range_g^2, n compressed, |ct|^2 / rows]`` for :mod:`jaxq.act.adaptive`."""
  parts = [p for c in compressed for p in _parts(c)]
  sr2 = sum((jnp.sum(((2.0**c.bits - 1) / c.scale) ** 2) * c.packed.shape[1] * 8 // c.bits
             for c in parts), jnp.float32(0))
  n = float(sum(int(np.prod(c.shape)) for c in compressed))
  fl = [c for c in ct_leaves if is_float(c)]
  ct2 = sum((jnp.sum(jnp.square(c.astype(jnp.float32))) * c.shape[-1] / max(c.size, 1)
             if c.ndim else jnp.square(c.astype(jnp.float32)) for c in fl), jnp.float32(0))
  return jnp.stack([sr2, jnp.float32(n), ct2]).astype(jnp.float32)


def compressed_residuals(fn: Callable[..., Any], *args, group_size: int = 256,
                         compress_args: Sequence[int] = ()) -> list[Residual]:
  """The residuals :func:`compressed_vjp` compresses for ``fn(*args)``, in the order a
  per-residual ``bits`` tuple refers to (:class:`~jaxq.act.residuals.Residual`: shape,
  dtype, whether the backward pass uses it linearly, whether it feeds only weight
  gradients). Computed abstractly (traces only)."""
  _, group_size, compress_args = _validate(8, group_size, compress_args)
  cell = []

  def f(*a):
    region = _Region.of(fn, a, compress_args)
    plan = region.trace(region.leaves, group_size)
    back = _backward(plan, _cotangent_specs(plan.jaxpr.out_avals[:plan.n_out]))
    cell.extend(describe(back.plain(), len(back.keep) + back.n_folded,
                         region.weight_outputs()))
    return 0

  jax.eval_shape(f, *args)
  return list(cell)


def residual_nbytes(fn: Callable[..., Any], *args, **kwargs) -> int:
  """Bytes that ``jax.vjp(fn, *args)`` keeps for the backward pass, fn's arguments excluded.

  The sum over the distinct residuals of the VJP closure, leaving out those that are
  views of leaves of ``args`` (parameters, inputs: casts, reshapes, slices, names of
  them). Computed abstractly (one trace): nothing is run. ``kwargs`` go to ``fn``.
  """
  leaves, in_tree = jax.tree_util.tree_flatten(args)
  cell = []

  def f(*flat):
    plan = trace_forward(lambda *p: fn(*jax.tree_util.tree_unflatten(in_tree, p), **kwargs),
                         flat, [False] * len(flat), [False] * len(flat), 0)
    cell.append(plan)
    return 0

  jax.eval_shape(f, *leaves)
  plan = cell[0]
  facts = flow.facts(plan.jaxpr.jaxpr, len(leaves))[plan.n_out:]
  total = 0
  for k, (aval, fa) in enumerate(zip(plan.residual_avals(), facts)):
    if plan.first[k] == k and fa.view < 0:
      total += int(np.prod(aval.shape, dtype=np.int64)) * jnp.dtype(aval.dtype).itemsize
  return total
