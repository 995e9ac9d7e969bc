"""Int4 weights with one scale per group of K rows and output column (GPTQ / AWQ layout),
times int8 activations (W4A8) or float activations (weight-only W4), unpacked and
dequantized inside the kernel.

Weights are packed as :func:`pallas_kernels.int4_matmul.pack_int4` (``uint8[K/2, N]``, two
signed nibbles per byte along K, low nibble = even k); ``b_scale: f32[K/g, N]`` scales
rows ``[j g, (j + 1) g)`` of column n. Semantics, with ``w = unpack_int4(b_packed)``::

    int8 a_q (a_scale f32[M]):  out = act(a_scale[:, None] *
                                    sum_j (a_q[:, G_j] @ w[G_j] in int32) * b_scale[j] + bias)
    float a  (a_scale None):    out = act(sum_j (a[:, G_j] @ w[G_j]) * b_scale[j] + bias)

(``G_j`` the rows of group j). Each group's partial product is exact (int32) for int8
activations; float activations multiply the int4 codes converted to their dtype with
float32 accumulation. The kernel loops over K one group per step, so ``group_size`` is
its K block (even; 32 or more on GPU), and splits A's group into even and odd columns
with strided ref loads like ``int4_matmul``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    MATMUL_DIMS, apply_activation, check_activation, check_dtype, check_out_dtype, check_rank,
    matmul_blocks, matmul_call, pad_axis, round_up)
from pallas_kernels.int4_matmul import int4_slices, unpack_int4

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check(a, b_packed, b_scale, a_scale, bias, out_dtype, activation, group_size):
  check_rank("a", a, 2)
  check_rank("b_packed", b_packed, 2)
  check_rank("b_scale", b_scale, 2)
  check_dtype("b_packed", b_packed, (jnp.uint8, jnp.int8))
  check_dtype("a", a, (jnp.int8,) + _FLOATS)
  out_dtype = check_out_dtype(out_dtype)
  check_activation(activation)
  m, k = a.shape
  n = b_packed.shape[1]
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or (
      group_size % 2):
    raise ValueError(f"group_size must be an even int >= 2; got {group_size!r}")
  if 2 * b_packed.shape[0] != k or k % group_size:
    raise ValueError(f"contraction sizes differ or group_size={group_size} does not divide "
                     f"K: a {a.shape}, b_packed {b_packed.shape}")
  if tuple(b_scale.shape) != (k // group_size, n):
    raise ValueError(f"b_scale must have shape (K / group_size, N) = ({k // group_size}, "
                     f"{n}); got {b_scale.shape}")
  int_a = a.dtype == jnp.int8
  if int_a != (a_scale is not None) or (int_a and tuple(a_scale.shape) != (m,)):
    raise ValueError(f"a_scale must be f32[M] = ({m},) for int8 activations and None for "
                     f"float ones; got {None if a_scale is None else a_scale.shape} with "
                     f"a of dtype {a.dtype}")
  if bias is not None and tuple(bias.shape) != (n,):
    raise ValueError(f"bias must have shape ({n},), got {bias.shape}")
  return m, k, n, out_dtype


def int4_matmul_grouped_ref(a, b_packed, b_scale, a_scale=None, bias=None,
                            out_dtype=jnp.float32, *, group_size: int, activation=None):
  """Pure-jnp (XLA) reference of :func:`int4_matmul_grouped`: the kernel dequantized in
  float32, then one float32 matmul (full precision). Equal to the kernel up to float32
  rounding (each group's int32 partial sum is exact in float32 below 2^24); a batched
  per-group integer product measured 5-10x slower than this on the CPU."""
  m, k, n, out_dtype = _check(a, b_packed, b_scale, a_scale, bias, out_dtype, activation,
                              group_size)
  w = unpack_int4(b_packed).astype(jnp.float32).reshape(k // group_size, group_size, n)
  w = (w * b_scale.astype(jnp.float32)[:, None, :]).reshape(k, n)
  y = jnp.matmul(a.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
  if a_scale is not None:
    y = y * a_scale.astype(jnp.float32)[:, None]
  if bias is not None:
    y = y + bias.astype(jnp.float32)[None, :]
  return apply_activation(y, activation).astype(out_dtype)


def _kernel(a_ref, b_ref, bs_ref, *refs, nk, bk, int_a, has_bias, activation, out_dtype):
  o_ref = refs[-1]
  bm, bn = o_ref.shape

  def body(i, acc):
    a_even, a_odd, w_low, w_high = int4_slices(a_ref, b_ref, i, bk)
    if int_a:
      part = (lax.dot_general(a_even, w_low, MATMUL_DIMS, preferred_element_type=jnp.int32)
              + lax.dot_general(a_odd, w_high, MATMUL_DIMS,
                                preferred_element_type=jnp.int32)).astype(jnp.float32)
    else:
      part = (lax.dot_general(a_even, w_low.astype(a_even.dtype), MATMUL_DIMS,
                              preferred_element_type=jnp.float32)
              + lax.dot_general(a_odd, w_high.astype(a_odd.dtype), MATMUL_DIMS,
                                preferred_element_type=jnp.float32))
    return acc + part * bs_ref[pl.ds(i, 1), :]

  y = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
  rest = refs[:-1]
  if int_a:
    y = y * rest[0][...][:, None]
    rest = rest[1:]
  if has_bias:
    y = y + rest[0][...][None, :]
  o_ref[...] = apply_activation(y, activation).astype(out_dtype)


@functools.partial(
    jax.jit, static_argnames=("group_size", "out_dtype", "activation", "interpret",
                              "block_m", "block_n"))
def int4_matmul_grouped(a, b_packed, b_scale, a_scale=None, bias=None,
                        out_dtype=jnp.float32, *, group_size: int, activation=None,
                        interpret: bool = False, block_m: int | None = None,
                        block_n: int | None = None):
  """Pallas kernel: ``[M, K] x int4[K, N]`` (packed ``[K/2, N]``) with group scales.

  Args:
    a: ``int8[M, K]`` (with ``a_scale: f32[M]``) or float ``[M, K]`` (``a_scale`` None).
    b_packed: ``uint8[K/2, N]`` (or int8) from ``pack_int4``.
    b_scale: ``f32[K / group_size, N]``; bias: optional ``f32[N]``.
    group_size: rows per scale (even; the kernel's K block).
    out_dtype, activation, interpret, block_m, block_n: as in ``int8_matmul``.
  """
  m, k, n, out_dtype = _check(a, b_packed, b_scale, a_scale, bias, out_dtype, activation,
                              group_size)
  bm, bn, _, warps, stages = matmul_blocks(m, n, k, interpret)
  bm, bn = block_m or bm, block_n or bn
  mp, np_ = round_up(m, bm), round_up(n, bn)
  return matmul_call(
      _kernel, pad_axis(a, 0, mp), pad_axis(b_packed.astype(jnp.uint8), 1, np_),
      [] if a_scale is None else [a_scale], [bias], out_dtype, m=m, n=n, bm=bm, bn=bn,
      bk=group_size, warps=warps, stages=stages, interpret=interpret,
      name="int4_matmul_grouped", b_like=[pad_axis(b_scale.astype(jnp.float32), 1, np_)],
      int_a=a_scale is not None, has_bias=bias is not None, activation=activation)
