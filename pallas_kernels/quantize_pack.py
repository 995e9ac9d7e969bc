"""Per-group min/scale quantization with bit packing (ActNN-style activation compression).

Contract (DESIGN.md, Contract 5), for ``x: f32[G, S]`` and ``bits`` in {1, 2, 4, 8}::

    lo    = min(x, axis=1)
    scale = (2^bits - 1) / max(max(x, axis=1) - lo, TINY)
    q     = clip(floor((x - lo) * scale + noise), 0, 2^bits - 1)    # noise None -> 0.5

and ``q`` packed little-end first: element ``j`` of a byte occupies bits
``[j * bits, (j + 1) * bits)``, so ``packed: uint8[G, S * bits / 8]``. With ``noise`` uniform in
[0, 1) the rounding is stochastic and unbiased (ActNN, Chen et al. 2021, sec. 3).

The Pallas kernel reads each row once: one program holds ``block_rows`` whole rows (padded to a
power of two with the row's last value, which leaves min and max unchanged), reduces min/max,
quantizes and packs by shift-then-sum (Triton lowers neither value slicing nor ``reduce_or``).
Rows longer than ``max_row`` elements take two passes: min/scale by an XLA reduction, then a
kernel tiled over rows and columns.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    TINY, check_bits, check_rank, next_pow2, pad_axis, round_up, triton_params)

_MAX_ROW = 8192  # longest row that one program reduces in a single pass


def _check_inputs(x, bits, noise):
  bits = check_bits(bits)
  check_rank("x", x, 2)
  ppb = 8 // bits
  if x.shape[1] == 0 or x.shape[1] % ppb:
    raise ValueError(
        f"x.shape[1] (group size S) must be a positive multiple of 8 / bits = {ppb}, "
        f"got shape {x.shape}")
  if noise is not None and tuple(noise.shape) != tuple(x.shape):
    raise ValueError(f"noise must have x's shape {x.shape}, got {noise.shape}")
  return bits, ppb


def _pack_bytes_via_words(q):
  """``uint8[G, S]`` codes, ``S % 4 == 0`` (or 2), written as whole little-endian words.

  Same bytes as ``q.astype(uint8)``. A bare ``convert(f32 -> u8)`` is elementwise, so XLA:CPU
  fuses it into its consumer: the unpacking ``convert(u8 -> f32)`` in the backward pass
  (inside a YNNPACK fusion), and what stays alive from forward to backward is the float
  ``clip(floor(.))`` (4 bytes per element, not 1), recomputed there with its noise. A
  shift-and-sum into words ends in a reduction, which XLA does not fuse into consumers, so
  the one-byte-per-element words are what it materializes (as at 1, 2 and 4 bits).
  """
  g, s = q.shape
  width = 4 if s % 4 == 0 else 2
  wtype = jnp.uint32 if width == 4 else jnp.uint16
  shifts = jnp.arange(width, dtype=wtype) * 8
  words = jnp.sum(q.astype(wtype).reshape(g, s // width, width) << shifts, axis=-1,
                  dtype=wtype)
  # bitcast to bytes splits each word least significant byte first (little-endian devices).
  return lax.bitcast_convert_type(words, jnp.uint8).reshape(g, s)


def pack_ref(q, bits: int):
  """Pack integer codes ``q: [G, S]`` (values < 2^bits) into ``uint8[G, S * bits / 8]``."""
  bits = check_bits(bits)
  ppb = 8 // bits
  q = q.astype(jnp.uint8)
  if ppb == 1:
    if q.ndim == 2 and q.shape[1] % 2 == 0 and sys.byteorder == "little":
      return _pack_bytes_via_words(q)
    return q
  g, s = q.shape
  shifts = (jnp.arange(ppb, dtype=jnp.uint8) * bits)
  return jnp.sum(q.reshape(g, s // ppb, ppb) << shifts, axis=-1, dtype=jnp.uint8)


def _row_range(x):
  """Per-row (min, max) of f32[G, n], NaN where the row holds a NaN: ``jnp.min`` /
  ``jnp.max`` over 64+ rows skip NaN on XLA:CPU (jax 0.10.2), which would give such a row
  a finite range and decompress its NaN finite. (One variadic ``lax.reduce`` propagates
  NaN too, but its reducer is a jaxpr that ``jaxq.act``'s analysis cannot read.)"""
  nan = jnp.isnan(x).any(axis=1)
  return (jnp.where(nan, jnp.nan, jnp.min(x, axis=1)),
          jnp.where(nan, jnp.nan, jnp.max(x, axis=1)))


def quantize_pack_ref(x, bits: int, noise=None):
  """Pure-jnp (XLA) reference of :func:`quantize_pack`; identical results, fast on CPU."""
  bits, _ = _check_inputs(x, bits, noise)
  qmax = float(2**bits - 1)
  x = x.astype(jnp.float32)
  lo, hi = _row_range(x)
  scale = qmax / jnp.maximum(hi - lo, TINY)
  n = 0.5 if noise is None else noise.astype(jnp.float32)
  q = jnp.clip(jnp.floor((x - lo[:, None]) * scale[:, None] + n), 0.0, qmax)
  return pack_ref(q, bits), lo, scale


def _quantize_block(x, lo, scale, noise, bits):
  """x: f32[bg, nb, ppb] -> packed int32[bg, nb] (shift-then-sum)."""
  qmax = float(2**bits - 1)
  n = 0.5 if noise is None else noise
  r = (x - lo[:, None, None]) * scale[:, None, None] + n
  q = jnp.clip(jnp.floor(r), 0.0, qmax).astype(jnp.int32)
  shifts = lax.broadcasted_iota(jnp.int32, (1, 1, x.shape[2]), 2) * bits
  return jnp.sum(q << shifts, axis=2)


def _fused_kernel(*refs, bits, has_noise):
  if has_noise:
    x_ref, n_ref, p_ref, lo_ref, s_ref = refs
  else:
    (x_ref, p_ref, lo_ref, s_ref), n_ref = refs, None
  x = x_ref[...].astype(jnp.float32)
  lo = jnp.min(jnp.min(x, axis=2), axis=1)
  hi = jnp.max(jnp.max(x, axis=2), axis=1)
  scale = float(2**bits - 1) / jnp.maximum(hi - lo, TINY)
  noise = None if n_ref is None else n_ref[...].astype(jnp.float32)
  p_ref[...] = _quantize_block(x, lo, scale, noise, bits).astype(jnp.uint8)
  lo_ref[...] = lo
  s_ref[...] = scale


def _tiled_kernel(*refs, bits, has_noise):
  if has_noise:
    x_ref, lo_ref, s_ref, n_ref, p_ref = refs
  else:
    (x_ref, lo_ref, s_ref, p_ref), n_ref = refs, None
  x = x_ref[...].astype(jnp.float32)
  noise = None if n_ref is None else n_ref[...].astype(jnp.float32)
  p_ref[...] = _quantize_block(x, lo_ref[...], s_ref[...], noise, bits).astype(jnp.uint8)


@functools.partial(
    jax.jit, static_argnames=("bits", "interpret", "block_rows", "block_cols", "max_row"))
def quantize_pack(x, bits: int, noise=None, *, interpret: bool = False,
                  block_rows: int | None = None, block_cols: int | None = None,
                  max_row: int = _MAX_ROW):
  """Pallas kernel: quantize each row of ``x: f32[G, S]`` to ``bits`` and bit-pack it.

  Args:
    x: ``f32[G, S]`` (other float dtypes are upcast), S a multiple of ``8 / bits``; finite
      values (a NaN/Inf in a row makes that row's codes undefined, as in any min/max
      quantizer).
    bits: 1, 2, 4 or 8.
    noise: optional ``f32[G, S]`` uniform in [0, 1) for stochastic rounding; None rounds to
      nearest (noise 0.5).
    interpret: run the kernel body with the Pallas interpreter (CPU testing).
    block_rows: rows per program (power of two); default sized for ~8K elements per program
      on GPU, larger in interpret mode (each interpreted grid step copies the operands).
    block_cols: columns per program on the two-pass path (power of two, multiple of 8/bits).
    max_row: rows padded beyond this many elements take the two-pass path.

  Returns:
    ``(packed uint8[G, S*bits/8], lo f32[G], scale f32[G])``.
  """
  bits, ppb = _check_inputs(x, bits, noise)
  g, s = x.shape
  x = x.astype(jnp.float32)
  target = (1 << 16) if interpret else (1 << 13)
  sp = next_pow2(s)
  has_noise = noise is not None
  if sp <= max_row:
    bg = block_rows or max(1, min(next_pow2(g), target // sp))
    gp = round_up(g, bg)
    # Edge padding keeps every row's min and max; padded rows are dropped below.
    xp = pad_axis(pad_axis(x, 1, sp, mode="edge"), 0, gp).reshape(gp, sp // ppb, ppb)
    args = [xp]
    blk3 = pl.BlockSpec((bg, sp // ppb, ppb), lambda i: (i, 0, 0))
    in_specs = [blk3]
    if has_noise:
      args.append(pad_axis(pad_axis(noise.astype(jnp.float32), 1, sp), 0, gp)
                  .reshape(gp, sp // ppb, ppb))
      in_specs.append(blk3)
    packed, lo, scale = pl.pallas_call(
        functools.partial(_fused_kernel, bits=bits, has_noise=has_noise),
        grid=(gp // bg,),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((bg, sp // ppb), lambda i: (i, 0)),
                   pl.BlockSpec((bg,), lambda i: (i,)),
                   pl.BlockSpec((bg,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct((gp, sp // ppb), jnp.uint8),
                   jax.ShapeDtypeStruct((gp,), jnp.float32),
                   jax.ShapeDtypeStruct((gp,), jnp.float32)],
        interpret=interpret,
        compiler_params=triton_params(num_warps=4, num_stages=1),
        name=f"quantize_pack_{bits}b",
    )(*args)
    return packed[:g, : s // ppb], lo[:g], scale[:g]

  # Two passes: row statistics by XLA, then quantize + pack tiled over rows and columns.
  lo = jnp.min(x, axis=1)
  scale = float(2**bits - 1) / jnp.maximum(jnp.max(x, axis=1) - lo, TINY)
  bs = block_cols or 4096
  if bs % ppb or bs & (bs - 1):
    raise ValueError(f"block_cols must be a power of two multiple of {ppb}, got {bs}")
  bg = block_rows or max(1, min(next_pow2(g), target // bs))
  gp, spp = round_up(g, bg), round_up(s, bs)
  xp = pad_axis(pad_axis(x, 1, spp), 0, gp).reshape(gp, spp // ppb, ppb)
  blk3 = pl.BlockSpec((bg, bs // ppb, ppb), lambda i, j: (i, j, 0))
  row = pl.BlockSpec((bg,), lambda i, j: (i,))
  args, in_specs = [xp, pad_axis(lo, 0, gp), pad_axis(scale, 0, gp)], [blk3, row, row]
  if has_noise:
    args.append(pad_axis(pad_axis(noise.astype(jnp.float32), 1, spp), 0, gp)
                .reshape(gp, spp // ppb, ppb))
    in_specs.append(blk3)
  packed = pl.pallas_call(
      functools.partial(_tiled_kernel, bits=bits, has_noise=has_noise),
      grid=(gp // bg, spp // bs),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bg, bs // ppb), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((gp, spp // ppb), jnp.uint8),
      interpret=interpret,
      compiler_params=triton_params(num_warps=4, num_stages=1),
      name=f"quantize_pack_tiled_{bits}b",
  )(*args)
  return packed[:g, : s // ppb], lo, scale
