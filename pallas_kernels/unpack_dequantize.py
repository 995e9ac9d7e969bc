"""Unpack bit-packed codes and dequantize per group: the inverse of ``quantize_pack``.

Contract (DESIGN.md, Contract 5): ``packed: uint8[G, S*bits/8]``, ``lo, scale: f32[G]``;
element ``j`` of a byte sits in bits ``[j*bits, (j+1)*bits)``; result ``f32[G, S] = q / scale
+ lo``. The kernel is tiled over rows and bytes; each byte is broadcast against the shifts
``j * bits`` and masked, producing the ``[rows, bytes, 8/bits]`` block that the wrapper views as
``[G, S]`` for free (Triton lowers no value slicing or concatenation).

The division is computed as ``q * (1 / scale)`` (one reciprocal per group), within 1 ulp of
``q / scale``; XLA rewrites a division by a broadcast that way anyway, and writing it out keeps
kernel and reference bit-identical however XLA fuses the surrounding program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    check_bits, check_dtype, check_rank, next_pow2, pad_axis, round_up, triton_params)


def _check_inputs(packed, lo, scale, bits):
  bits = check_bits(bits)
  check_rank("packed", packed, 2)
  check_dtype("packed", packed, (jnp.uint8,))
  g = packed.shape[0]
  for name, v in (("lo", lo), ("scale", scale)):
    if tuple(v.shape) != (g,):
      raise ValueError(f"{name} must have shape ({g},), got {v.shape}")
  return bits, 8 // bits


def unpack_ref(packed, bits: int):
  """Unpack ``uint8[G, B]`` into codes ``uint8[G, B * 8 / bits]`` (little end first)."""
  bits = check_bits(bits)
  ppb = 8 // bits
  if ppb == 1:
    return packed
  g, nb = packed.shape
  shifts = jnp.arange(ppb, dtype=jnp.uint8) * bits
  q = (packed[:, :, None] >> shifts) & jnp.uint8(2**bits - 1)
  return q.reshape(g, nb * ppb)


def unpack_dequantize_ref(packed, lo, scale, bits: int):
  """Pure-jnp (XLA) reference of :func:`unpack_dequantize`."""
  bits, _ = _check_inputs(packed, lo, scale, bits)
  q = unpack_ref(packed, bits).astype(jnp.float32)
  inv = 1.0 / scale.astype(jnp.float32)
  return q * inv[:, None] + lo.astype(jnp.float32)[:, None]


def _kernel(p_ref, lo_ref, s_ref, o_ref, *, bits):
  ppb = o_ref.shape[2]
  p = p_ref[...].astype(jnp.int32)[:, :, None]
  shifts = lax.broadcasted_iota(jnp.int32, (1, 1, ppb), 2) * bits
  q = ((p >> shifts) & (2**bits - 1)).astype(jnp.float32)
  inv = 1.0 / s_ref[...]
  o_ref[...] = q * inv[:, None, None] + lo_ref[...][:, None, None]


@functools.partial(jax.jit, static_argnames=("bits", "interpret", "block_rows", "block_bytes"))
def unpack_dequantize(packed, lo, scale, bits: int, *, interpret: bool = False,
                      block_rows: int | None = None, block_bytes: int | None = None):
  """Pallas kernel: ``f32[G, S] = unpack(packed) / scale[:, None] + lo[:, None]``.

  Args:
    packed: ``uint8[G, S*bits/8]`` from :func:`quantize_pack`.
    lo, scale: ``f32[G]``.
    bits: 1, 2, 4 or 8.
    interpret: run the kernel body with the Pallas interpreter (CPU testing).
    block_rows, block_bytes: block shape (powers of two); default ~8K output elements per
      program on GPU, more in interpret mode.
  """
  bits, ppb = _check_inputs(packed, lo, scale, bits)
  g, nb = packed.shape
  target = (1 << 16) if interpret else (1 << 13)
  bn = block_bytes or min(next_pow2(nb), max(1, target // ppb))
  bg = block_rows or max(1, min(next_pow2(g), target // (bn * ppb)))
  gp, nbp = round_up(g, bg), round_up(nb, bn)
  row = pl.BlockSpec((bg,), lambda i, j: (i,))
  out = pl.pallas_call(
      functools.partial(_kernel, bits=bits),
      grid=(gp // bg, nbp // bn),
      in_specs=[pl.BlockSpec((bg, bn), lambda i, j: (i, j)), row, row],
      out_specs=pl.BlockSpec((bg, bn, ppb), lambda i, j: (i, j, 0)),
      out_shape=jax.ShapeDtypeStruct((gp, nbp, ppb), jnp.float32),
      interpret=interpret,
      compiler_params=triton_params(num_warps=4, num_stages=1),
      name=f"unpack_dequantize_{bits}b",
  )(pad_axis(pad_axis(packed, 1, nbp), 0, gp),
    pad_axis(lo.astype(jnp.float32), 0, gp),
    pad_axis(scale.astype(jnp.float32), 0, gp, mode="edge" if g else "constant"))
  return out[:g, :nb].reshape(g, nb * ppb)
