"""Compressed storage of one activation tensor: per-group min/scale, bit-packed codes.

ActNN (Chen et al. 2021, "ActNN: Reducing Training Memory Footprint via 2-Bit Activation
Compressed Training") stores each saved activation ``x`` as groups of ``S`` consecutive
elements, each group ``g`` with its own ``lo_g = min(x_g)`` and
``scale_g = (2^b - 1) / (max(x_g) - lo_g)``, and ``b``-bit codes

    q = clip(floor((x - lo_g) * scale_g + u), 0, 2^b - 1),    x_hat = q / scale_g + lo_g.

With ``u ~ U[0, 1)`` (stochastic rounding) ``E[x_hat] = x``: the compressed gradient is
unbiased. With ``u = 1/2`` it rounds to nearest. The arithmetic itself is
``jaxq.kernels.quantize_pack`` / ``unpack_dequantize`` (Contract 5); this module adds the
layout (any shape and float dtype <-> ``f32[G, S]``) and cheap noise.

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressedArray:
  """A tensor stored as ``bits``-bit codes with per-group ``lo`` and ``scale``.

  Leaves: ``packed`` uint8[G, S*bits/8], ``lo`` f32[G], ``scale`` f32[G]. Static: the
  original ``shape`` and ``dtype``, ``bits``, and ``rows``: the tensor is viewed as
  ``rows`` rows, each padded (edge value, so no group's range grows) to whole groups.
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


def _layout(shape: tuple[int, ...], group_size: int) -> tuple[int, int]:
  """``(rows, row_len)``: keep the leading axis (often the sharded batch axis) when its rows
  hold whole groups, else one flat row."""
  size = int(np.prod(shape, dtype=np.int64))
  if len(shape) >= 2 and shape[0] > 1 and (size // shape[0]) % group_size == 0:
    return shape[0], size // shape[0]
  return 1, size


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
  rows, row_len = _layout(shape, group_size)
  padded = -(-row_len // group_size) * group_size
  xr = x.reshape(rows, row_len).astype(jnp.float32)
  if padded != row_len:
    xr = jnp.pad(xr, ((0, 0), (0, padded - row_len)), mode="edge")
  xg = xr.reshape(rows * padded // group_size, group_size)
  noise = None if seed is None else hash_uniform(seed, xg.shape)
  packed, lo, scale = kernels.quantize_pack(xg, bits, noise)
  return CompressedArray(packed, lo, scale, shape, dtype, bits, rows)


def decompress(c: CompressedArray) -> jax.Array:
  """Inverse of :func:`compress` up to quantization error: ``q / scale + lo``."""
  x = kernels.unpack_dequantize(c.packed, c.lo, c.scale, c.bits)
  size = int(np.prod(c.shape, dtype=np.int64))
  x = x.reshape(c.rows, -1)[:, : size // max(c.rows, 1)]
  return x.reshape(c.shape).astype(c.dtype)
