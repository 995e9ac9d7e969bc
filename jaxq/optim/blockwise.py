"""Block-wise absmax quantization of one array with a :class:`jaxq.optim.codes.Code`.

The flattened array is cut into blocks of ``block_size`` consecutive elements (the last
one zero-padded), each with its own scale ``s_b = max_{i in b} |x_i|`` (Dettmers et al.
2022): an outlier only costs the precision of its own block. Stored:

* ``codes``: uint8 with the array's shape; 4-bit codes are packed two per byte along the
  last axis (``(..., ceil(d / 2))``, low nibble first);
* ``scales``: float32, one per block, shaped ``(..., d // block_size)`` when the last axis
  ``d`` is a multiple of ``block_size`` (blocks never cross a row: the same blocks,
  reshaped) and ``(ceil(n / block_size),)`` otherwise.

Both keep the array's leading axes, so codes (always) and scales (when the blocks are
row-aligned) can be sharded like the array itself
(:func:`jaxq.sharding.opt_state_shardings`).
``dequantize(*quantize(x))`` is elementwise except for the per-block max, which XLA fuses
with the producer of ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxq.optim.codes import Code

__all__ = ["row_aligned", "scales_shape", "codes_shape", "pack4", "unpack4",
           "quantize", "dequantize"]


def row_aligned(shape: Sequence[int], block_size: int) -> bool:
  """Whether blocks of ``block_size`` consecutive elements stay inside the last axis."""
  return len(shape) >= 1 and shape[-1] % block_size == 0


def scales_shape(shape: Sequence[int], block_size: int) -> tuple[int, ...]:
  shape = tuple(shape)
  if row_aligned(shape, block_size):
    return (*shape[:-1], shape[-1] // block_size)
  return (-(-math.prod(shape) // block_size),)


def codes_shape(shape: Sequence[int], bits: int) -> tuple[int, ...]:
  shape = tuple(shape)
  if bits == 4:
    return (*shape[:-1], -(-shape[-1] // 2))
  return shape


def _to_blocks(x: jax.Array, block_size: int) -> jax.Array:
  if row_aligned(x.shape, block_size):
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
  flat = x.reshape(-1)
  pad = -flat.size % block_size
  return jnp.pad(flat, (0, pad)).reshape(-1, block_size)


def _from_blocks(blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  if row_aligned(shape, blocks.shape[-1]):
    return blocks.reshape(shape)
  return blocks.reshape(-1)[:math.prod(shape)].reshape(shape)


def pack4(codes: jax.Array) -> jax.Array:
  """uint8 codes in [0, 16), shape ``(..., d)`` -> two per byte, ``(..., ceil(d/2))``."""
  if codes.shape[-1] % 2:
    codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
  pairs = codes.reshape(*codes.shape[:-1], -1, 2)
  return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack4(packed: jax.Array, last: int) -> jax.Array:
  """Inverse of :func:`pack4` for a last axis of length ``last``."""
  # Each byte repeated twice, shifted by 0 / 4: a broadcast XLA fuses (a stack of the two
  # nibbles would be a concatenate, several times slower on CPU).
  shifts = (jnp.arange(2 * packed.shape[-1]) % 2 * 4).astype(jnp.uint8)
  return ((jnp.repeat(packed, 2, axis=-1) >> shifts) & 15)[..., :last]


def quantize(x: jax.Array, code: Code, block_size: int) -> tuple[jax.Array, jax.Array]:
  """float ``x`` -> ``(codes, scales)``: ``x ~= code.decode(codes) * scale``."""
  x = x.astype(jnp.float32)
  blocks = _to_blocks(x, block_size)
  scales = jnp.max(jnp.abs(blocks), axis=-1)
  inverse = jnp.where(scales > 0, 1.0 / jnp.where(scales > 0, scales, 1.0), 0.0)
  codes = code.encode(_from_blocks(blocks * inverse[..., None], x.shape))
  if code.bits == 4:
    codes = pack4(codes)
  return codes, scales.reshape(scales_shape(x.shape, block_size))


def dequantize(codes: jax.Array, scales: jax.Array, code: Code, shape: Sequence[int],
               block_size: int) -> jax.Array:
  """float32 array of ``shape`` from :func:`quantize`'s ``(codes, scales)``."""
  shape = tuple(shape)
  if code.bits == 4:
    codes = unpack4(codes, shape[-1])
  blocks = _to_blocks(code.decode(codes), block_size)
  per_block = scales.reshape(blocks.shape[:-1])
  return _from_blocks(blocks * per_block[..., None], shape)
