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

Non-finite values: a NaN or Inf gives its group a NaN/Inf range, and the whole group
decompresses to NaN. Since a group never spans two rows, this stays within the row (one
token's features, one sample's row of the residual): it never reaches other samples.
Keeping the group's finite values exact-ish next to a NaN (a stand-in value substituted
before packing) made the compiled step's temporaries 15-25% larger (XLA no longer packs
straight from the residual), so it is not done.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import kernels
from jaxq.bitpack import PACK_BITS, check_pack_bits
from jaxq.numerics import hash_uniform

# The one packing-width check of jaxq, under the names this package has always used.
VALID_BITS = PACK_BITS
check_bits = check_pack_bits


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

  Leaves: ``packed`` uint8[G, S*bits/8], ``lo`` f32[G], ``scale`` f32[G]. Static: the original
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
  noise = None if seed is None else hash_uniform(seed, xg.shape)
  packed, lo, scale = kernels.quantize_pack(xg, bits, noise)
  return CompressedArray(packed, lo, scale, shape, dtype, bits,
                         layout(shape, group_size, bits)[0])


def decompress(c: CompressedArray) -> jax.Array:
  """Inverse of :func:`compress` up to quantization error: ``q / scale + lo``; NaN for
  every element of a group that held a NaN or Inf."""
  bad = ~(jnp.isfinite(c.lo) & (c.scale > 0) & jnp.isfinite(c.scale))
  # A NaN offset makes every element of its group NaN (``q / scale + NaN``): one select
  # per group instead of one per element.
  lo = jnp.where(bad, jnp.nan, c.lo)
  x = kernels.unpack_dequantize(c.packed, lo, c.scale, c.bits)
  size = int(np.prod(c.shape, dtype=np.int64))
  x = x.reshape(c.rows, -1)[:, : size // max(c.rows, 1)]
  return x.reshape(c.shape).astype(c.dtype)
