"""Compressed storage of one activation tensor: per-group min/scale, bit-packed codes.

ActNN (Chen et al. 2021, "ActNN: Reducing Training Memory Footprint via 2-Bit Activation
Compressed Training") stores each saved activation ``x`` as groups of ``S`` consecutive
elements, each group ``g`` with its own ``lo_g = min(x_g)`` and
``scale_g = (2^b - 1) / (max(x_g) - lo_g)``, and ``b``-bit codes

    q = clip(floor((x - lo_g) * scale_g + u), 0, 2^b - 1),    x_hat = q / scale_g + lo_g.

With ``u ~ U[0, 1)`` (stochastic rounding) ``E[x_hat] = x``: the compressed gradient is
unbiased. With ``u = 1/2`` it rounds to nearest. The arithmetic itself is
``jaxq.kernels.quantize_pack`` / ``unpack_dequantize`` (Contract 5); this module adds the
layout (any shape and float dtype <-> ``f32[G, S]``), non-finite values and cheap noise.

Layout: a group never spans two *rows* (the last axis, e.g. one token's features or one
query's attention probabilities; trailing axes shorter than :data:`MIN_ROW` are merged).
Rows of very different scale (a blank image patch's token next to an ordinary one) would
otherwise share one range, and the small row's values round away entirely: LayerNorm's
backward pass then divides that error by the small row's deviation. A row longer than
``group_size`` is split into equal groups of at most ``group_size`` elements; each group is
edge-padded to whole bytes.

Non-finite values: ``lo``/``scale`` come from a group's finite values only. A group holding
NaN/Inf uses the codes ``0 .. 2^b - 2`` for its finite values and ``2^b - 1`` for the
non-finite ones, and is marked by a negative ``scale``; those elements decompress to NaN
(a group without any finite value stores ``lo = NaN``).
So a NaN or Inf stays where it was (as NaN) and never turns its group's other values, or
other samples, into NaN.

Noise: ``jax.random.uniform`` over every element of every activation costs more than the
packing itself on the CPU (threefry is ~20 integer ops per 32 bits, and the key splitting
is sequential), so the noise is :func:`jaxq.numerics.hash_uniform`, a counter-based integer
hash of the element index and a 32-bit seed, one fused elementwise pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import kernels
from jaxq.numerics import hash_uniform

VALID_BITS = (1, 2, 4, 8)

def check_bits(bits: Any, name: str = "bits") -> int:
  """Validates a packing width: one of 1, 2, 4, 8 (widths that divide a byte)."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in VALID_BITS:
    raise ValueError(f"{name} must be one of {VALID_BITS}, got {bits!r}")
  return int(bits)


def check_group_size(group_size: Any, bits: int, name: str = "group_size") -> int:
  """``group_size`` must be a positive multiple of ``8 // bits`` (whole bytes per group)."""
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
    raise TypeError(f"{name} must be a positive int, got {group_size!r}")
  per_byte = 8 // bits
  if group_size <= 0 or group_size % per_byte:
    raise ValueError(
        f"{name} must be a positive multiple of 8 // bits = {per_byte} for bits={bits}, "
        f"got {group_size}")
  return int(group_size)


#: Trailing axes are merged into one row until it holds at least this many elements.
MIN_ROW = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressedArray:
  """A tensor stored as ``bits``-bit codes with per-group ``lo`` and ``scale``.

  Leaves: ``packed`` uint8[G, S*bits/8], ``lo`` f32[G], ``scale`` f32[G] (negative: the
  group holds non-finite values, see the module docstring). Static: the original
  ``shape`` and ``dtype``, ``bits``, and ``rows``: the tensor is viewed as ``rows`` rows,
  each split into groups of ``S`` elements (edge-padded).
  """

  packed: jax.Array
  lo: jax.Array
  scale: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))
  bits: int = dataclasses.field(metadata=dict(static=True))
  rows: int = dataclasses.field(metadata=dict(static=True))

  @property
  def nbytes(self) -> int:
    return int(self.packed.size + 4 * self.lo.size + 4 * self.scale.size)


def layout(shape: tuple[int, ...], group_size: int, bits: int) -> tuple[int, int, int]:
  """``(rows, row_len, S)``: ``shape`` viewed as ``rows`` rows of ``row_len`` elements
  (the last axis, merged with the axes before it while shorter than :data:`MIN_ROW`),
  each split into ``ceil(row_len / group_size)`` groups of ``S <= group_size`` elements,
  ``S`` a multiple of ``8 // bits`` (the row edge-padded to whole groups)."""
  size = int(np.prod(shape, dtype=np.int64))
  row_len, k = 1, len(shape)
  while k and (row_len < MIN_ROW or k == len(shape)):
    k -= 1
    row_len *= int(shape[k])
  row_len = max(row_len, 1)
  n = -(-row_len // group_size)
  per_byte = 8 // bits
  s = -(-(-(-row_len // n)) // per_byte) * per_byte
  return size // row_len, row_len, s


def groups(x: jax.Array, group_size: int, bits: int) -> jax.Array:
  """``x`` as ``f32[G, S]`` in the layout of :func:`layout` (rows edge-padded)."""
  rows, row_len, s = layout(tuple(x.shape), group_size, bits)
  padded = -(-row_len // s) * s
  xr = x.reshape(rows, row_len).astype(jnp.float32)
  if padded != row_len:
    xr = jnp.pad(xr, ((0, 0), (0, padded - row_len)), mode="edge")
  return xr.reshape(rows * padded // s, s)


def _finite_groups(xg, noise, bits):
  """Groups and noise for the kernel: in a group with non-finite values these become
  ``hi_ext`` (code ``2^b - 1``, rounded to nearest) and the finite values keep codes
  ``<= 2^b - 2`` (at 1 bit all become the finite minimum). Returns the groups, the noise,
  and per group whether it holds non-finite values and whether it holds no finite one
  (its ``lo`` is then stored as NaN)."""
  levels = 2**bits - 1
  finite = jnp.isfinite(xg)
  flag = ~jnp.all(finite, axis=1)
  none = ~jnp.any(finite, axis=1)
  lo = jnp.min(jnp.where(finite, xg, jnp.inf), axis=1, keepdims=True)
  hi = jnp.max(jnp.where(finite, xg, -jnp.inf), axis=1, keepdims=True)
  lo = jnp.where(lo <= hi, lo, 0.0)
  hi = jnp.where(lo <= hi, hi, lo)
  unit = jnp.maximum(jnp.abs(lo), 1.0)
  if levels > 1:
    ext = jnp.where(hi > lo, (hi - lo) * (levels / (levels - 1)) * (1 + 2.0**-10), unit)
    kept = xg
  else:
    ext, kept = unit, lo
  clean = jnp.where(finite, kept, lo + ext)
  xg = jnp.where(flag[:, None], clean, xg)
  if noise is not None:
    noise = jnp.where(finite, noise, 0.5)
  return xg, noise, flag, none


def compress(x: jax.Array, bits: int, group_size: int = 256,
             seed: jax.Array | None = None) -> CompressedArray:
  """Quantizes ``x`` (any shape, float dtype) to :class:`CompressedArray`.

  ``seed`` (uint32 scalar) selects stochastic rounding with :func:`hash_uniform` noise;
  ``None`` rounds to nearest.
  """
  bits = check_bits(bits)
  group_size = check_group_size(group_size, bits)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"compress expects a floating-point array, got dtype {x.dtype}")
  shape, dtype = tuple(x.shape), x.dtype
  xg = groups(x, group_size, bits)
  noise = lambda: None if seed is None else hash_uniform(seed, xg.shape)  # noqa: E731

  def finite(xg):
    return kernels.quantize_pack(xg, bits, noise())

  def with_non_finite(xg):
    xg, u, flag, none = _finite_groups(xg, noise(), bits)
    packed, lo, scale = kernels.quantize_pack(xg, bits, u)
    return packed, jnp.where(none, jnp.nan, lo), jnp.where(flag, -scale, scale)

  # The noise and the cleaned copy of the groups exist only inside the branch taken.
  packed, lo, scale = jax.lax.cond(jnp.all(jnp.isfinite(xg)), finite, with_non_finite, xg)
  return CompressedArray(packed, lo, scale, shape, dtype, bits,
                         layout(shape, group_size, bits)[0])


def decompress(c: CompressedArray) -> jax.Array:
  """Inverse of :func:`compress` up to quantization error: ``q / scale + lo``; NaN where
  ``x`` was not finite."""
  scale = jnp.abs(c.scale)
  x = kernels.unpack_dequantize(c.packed, c.lo, scale, c.bits)
  top = c.lo + (2.0**c.bits - 1.5) / scale
  x = jnp.where((c.scale < 0)[:, None] & (x > top[:, None]), jnp.nan, x)
  size = int(np.prod(c.shape, dtype=np.int64))
  x = x.reshape(c.rows, -1)[:, : size // max(c.rows, 1)]
  return x.reshape(c.shape).astype(c.dtype)
