"""Per-sample storage of a residual (ActNN's per-sample widths, :class:`~jaxq.act.SampleBits`).

Each sample ``n`` of a residual gets a width from its sensitivity ``G_n R_n``: ``R_n``
(:func:`sample_sensitivity`) the sum of its groups' squared ranges, to which its rounding
variance is proportional, and ``G_n`` its gradient-norm estimate
(:func:`output_grad_sqnorm`, kept per training example from its last visit). The
samples are sorted by it and stored in consecutive blocks of equal width
(:class:`SampleCompressed`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxq import numerics
from jaxq.act import pack


def output_grad_sqnorm(loss_fn: Callable[..., jax.Array], outputs: Any, *args) -> jax.Array:
  """``G_n = |d loss_n / d outputs_n|^2``: each sample's squared gradient norm at the model
  output (``f32[B]``), the per-sample gradient estimate ``sample_weight`` of
  :class:`SampleBits`.

  ``loss_fn(outputs, *args)`` returns the per-sample losses ``f32[B]`` (e.g.
  ``optax.softmax_cross_entropy_with_integer_labels(logits, labels)``); sample ``n``'s loss
  must depend only on row ``n`` of the outputs (leading axis: the batch). For softmax
  cross-entropy, ``G_n = |softmax(z_n) - onehot(y_n)|^2``. Not differentiated.
  """
  outputs = jax.lax.stop_gradient(outputs)
  grads = jax.grad(lambda o: jnp.sum(loss_fn(o, *args)))(outputs)
  leaves = jax.tree_util.tree_leaves(grads)
  return sum(jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
             for g in leaves)


def sample_sensitivity(x: jax.Array, group_size: int = 256) -> jax.Array:
  """``R_n = sum_g S range_g^2`` over the compression groups of each sample ``x[n]``
  (``f32[B]``; groups as :func:`~jaxq.act.pack.compress` lays out one sample: within rows,
  edge-padded). NaN/Inf elements are ignored."""
  xg = jax.vmap(lambda s: pack.groups(s, group_size, 8))(x)
  fin = jnp.isfinite(xg)
  hi = jnp.max(jnp.where(fin, xg, -jnp.inf), axis=2)
  lo = jnp.min(jnp.where(fin, xg, jnp.inf), axis=2)
  r = jnp.where(hi >= lo, hi - lo, 0.0)
  return jnp.sum(r * r, axis=1) * xg.shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleCompressed:
  """A residual stored per sample: ``parts[k]`` holds the samples ``perm[o_k:o_k + n_k]``
  (``o_k`` the running offset) at ``parts[k].bits`` bits.

  Leaves: ``parts`` (CompressedArrays), ``perm`` (``uint8``/``uint16``/``int32[B]``: the
  samples in order of decreasing sensitivity). Static: ``shape``, ``dtype``.
  """

  parts: tuple
  perm: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))

  @property
  def nbytes(self) -> int:
    return sum(p.nbytes for p in self.parts) + int(self.perm.size * self.perm.dtype.itemsize)


def _perm_dtype(batch: int):
  return jnp.uint8 if batch <= 256 else jnp.uint16 if batch <= 65536 else jnp.int32


def compress_samples(x: jax.Array, counts: Sequence[tuple[int, int]], group_size: int = 256,
                     seed: jax.Array | None = None,
                     weight: jax.Array | None = None) -> SampleCompressed:
  """Stores ``x`` (leading axis: ``B = sum n_b`` samples) with ``n_b`` samples at ``b``
  bits, the most sensitive (:func:`sample_sensitivity` times ``weight``, the samples'
  gradient-norm estimates, when given) at the widest. ``counts`` as from
  :meth:`SampleBits.counts`; ``seed`` as in :func:`~jaxq.act.pack.compress` (one derived
  seed per width)."""
  batch = x.shape[0]
  if sum(n for _, n in counts) != batch:
    raise ValueError(f"counts {counts} must add up to the leading size {batch} of x")
  key = sample_sensitivity(x, group_size)
  if weight is not None:
    key = key * weight
  order = jnp.argsort(-key, stable=True)
  xs = jnp.take(x, order, axis=0)
  parts, start = [], 0
  for k, (b, n) in enumerate(counts):
    s = None if seed is None else numerics.derive_seed(seed, k)
    parts.append(pack.compress(xs[start:start + n], b, group_size, s))
    start += n
  return SampleCompressed(tuple(parts), order.astype(_perm_dtype(batch)), tuple(x.shape),
                          x.dtype)


def decompress_samples(c: SampleCompressed) -> jax.Array:
  """Inverse of :func:`compress_samples` up to quantization error."""
  xs = jnp.concatenate([pack.decompress(p) for p in c.parts], axis=0)
  return jnp.zeros(c.shape, c.dtype).at[c.perm.astype(jnp.int32)].set(
      xs, unique_indices=True)
