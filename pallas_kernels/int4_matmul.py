"""W4A8 matmul: int8 activations x packed int4 weights -> int32, unpacked inside the kernel.

Int4 packing layout (``pack_int4``): weights ``w: int[K, N]`` with values in [-8, 7] are stored
as ``uint8[K/2, N]``; byte ``[i, n]`` holds ``w[2i, n]`` in its low nibble (bits 0-3) and
``w[2i+1, n]`` in its high nibble (bits 4-7), two's complement; i.e. two signed 4-bit values
per byte along K, low nibble first (the same little-end-first rule as ``quantize_pack``).
``int8`` storage of the same bytes is accepted too.

Semantics: ``int4_matmul(a_q, b_packed, a_scale, b_scale, bias) ==
int8_matmul(a_q, unpack_int4(b_packed), a_scale, b_scale, bias)``, exact int32 accumulation.

Kernel: for each K slice it loads ``bk/2`` packed rows of B once, sign-extends both nibbles with
shifts on int32 (``(p << 28) >> 28`` and ``(p << 24) >> 28``), and splits A's slice into its
even and odd columns with strided ref loads, so ``acc += a_even @ w_low + a_odd @ w_high``
needs no interleave (Triton lowers no value slicing or concatenation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    MATMUL_DIMS, check_dtype, check_rank, matmul_blocks, matmul_call, pad_axis, round_up,
    store_tile)
from pallas_kernels.int8_matmul import check_matmul_args, int8_matmul_ref


def pack_int4(w):
  """Pack ``int[K, N]`` values in [-8, 7] (K even) into ``uint8[K/2, N]`` (low nibble = even k).

  The bit order of ``jaxq.bitpack.pack_bits(w, 4, axis=0)``, done here so that the kernels
  need nothing from jaxq; packed along K, which a matmul tile streams.

  Values outside [-8, 7] are rejected when concrete; under tracing they wrap modulo 16.
  """
  check_rank("w", w, 2)
  if not jnp.issubdtype(w.dtype, jnp.integer):
    raise TypeError(f"w must have an integer dtype, got {w.dtype}")
  if w.shape[0] % 2:
    raise ValueError(f"w.shape[0] (K) must be even to pack two int4 per byte, got {w.shape}")
  if not isinstance(w, jax.core.Tracer):
    lo, hi = int(jnp.min(w)) if w.size else 0, int(jnp.max(w)) if w.size else 0
    if lo < -8 or hi > 7:
      raise ValueError(f"int4 values must lie in [-8, 7], got range [{lo}, {hi}]")
  w = w.astype(jnp.int32).reshape(w.shape[0] // 2, 2, w.shape[1])
  return ((w[:, 0] & 0xF) | ((w[:, 1] & 0xF) << 4)).astype(jnp.uint8)


def unpack_int4(p):
  """Inverse of :func:`pack_int4`: ``uint8/int8[K/2, N]`` -> ``int8[K, N]``."""
  check_rank("b_packed", p, 2)
  check_dtype("b_packed", p, (jnp.uint8, jnp.int8))
  p = p.astype(jnp.int32)
  low = (p << 28) >> 28
  high = (p << 24) >> 28
  return jnp.stack([low, high], axis=1).reshape(2 * p.shape[0], p.shape[1]).astype(jnp.int8)


def int4_matmul_ref(a_q, b_packed, a_scale, b_scale, bias=None, out_dtype=jnp.float32, *,
                    activation=None):
  """Pure-jnp (XLA) reference of :func:`int4_matmul`."""
  check_dtype("a_q", a_q, (jnp.int8,))
  return int8_matmul_ref(a_q, unpack_int4(b_packed), a_scale, b_scale, bias, out_dtype,
                         activation=activation)


def int4_slices(a_ref, b_ref, i, bk):
  """K slice ``i`` (``bk`` unpacked rows) of a packed-int4 matmul, inside a kernel:
  ``(a_even, a_odd, w_low, w_high)``, the even and odd K columns of ``a`` and the int8
  weights of the low and high nibbles (rows ``2r`` and ``2r + 1``) of ``b``'s bytes."""
  hk = bk // 2
  k0 = pl.multiple_of(i * bk, bk)
  a_even = a_ref[:, pl.ds(k0, hk, stride=2)]
  a_odd = a_ref[:, pl.ds(k0 + 1, hk, stride=2)]
  p = b_ref[pl.ds(pl.multiple_of(i * hk, hk), hk), :].astype(jnp.int32)
  return a_even, a_odd, ((p << 28) >> 28).astype(jnp.int8), ((p << 24) >> 28).astype(jnp.int8)


def _kernel(a_ref, b_ref, *refs, nk, bk, has_bias, activation, out_dtype):
  o_ref = refs[-1]
  bm, bn = o_ref.shape

  def body(i, acc):
    a_even, a_odd, w_low, w_high = int4_slices(a_ref, b_ref, i, bk)
    acc = acc + lax.dot_general(a_even, w_low, MATMUL_DIMS, preferred_element_type=jnp.int32)
    return acc + lax.dot_general(a_odd, w_high, MATMUL_DIMS, preferred_element_type=jnp.int32)

  acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.int32))
  store_tile(o_ref, acc, refs[:-1], has_bias, activation, out_dtype)


@functools.partial(
    jax.jit,
    static_argnames=("out_dtype", "activation", "interpret", "block_m", "block_n", "block_k"))
def int4_matmul(a_q, b_packed, a_scale, b_scale, bias=None, out_dtype=jnp.float32, *,
                activation=None, interpret: bool = False, block_m: int | None = None,
                block_n: int | None = None, block_k: int | None = None):
  """Pallas kernel: ``int8[M, K] x int4[K, N]`` (packed ``[K/2, N]``) with fused epilogue.

  Args:
    a_q: ``int8[M, K]``, K even.
    b_packed: ``uint8[K/2, N]`` (or int8) from :func:`pack_int4`.
    a_scale: ``f32[M]``; b_scale: ``f32[N]``; bias: optional ``f32[N]``.
    out_dtype, activation, interpret, block_m, block_n, block_k: as in :func:`int8_matmul`
      (``block_k`` counts unpacked K and must be even; ``>= 64`` on GPU).
  """
  check_dtype("a_q", a_q, (jnp.int8,))
  check_dtype("b_packed", b_packed, (jnp.uint8, jnp.int8))
  check_rank("b_packed", b_packed, 2)
  m, k, n, out_dtype = check_matmul_args(a_q, b_packed, a_scale, b_scale, bias, out_dtype,
                                         activation, b_name="b_packed",
                                         k_b=2 * b_packed.shape[0])
  bm, bn, bk, warps, stages = matmul_blocks(m, n, k, interpret, k_min=64)
  bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
  if bk % 2:
    raise ValueError(f"block_k must be even, got {bk}")
  mp, np_, kp = round_up(m, bm), round_up(n, bn), round_up(k, bk)
  a = pad_axis(pad_axis(a_q, 0, mp), 1, kp)
  b = pad_axis(pad_axis(b_packed.astype(jnp.uint8), 0, kp // 2), 1, np_)
  raw = out_dtype == jnp.int32
  return matmul_call(_kernel, a, b, [] if raw else [a_scale], [] if raw else [b_scale, bias],
                     out_dtype, m=m, n=n, bm=bm, bn=bn, bk=bk, warps=warps, stages=stages,
                     interpret=interpret, name="int4_matmul", has_bias=bias is not None,
                     activation=activation)
