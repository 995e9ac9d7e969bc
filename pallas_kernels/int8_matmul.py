"""Tiled int8 x int8 -> int32 matmul with the dequant epilogue fused (W8A8 serving).

Contract (DESIGN.md, Contract 5)::

    out = act((a_q @ b_q accumulated exactly in int32) * a_scale[:, None] * b_scale[None, :]
              + bias).astype(out_dtype)

with ``a_q: int8[M, K]``, ``b_q: int8[K, N]``, ``a_scale: f32[M]`` (per-token), ``b_scale: f32[N]``
(per-output-channel), ``bias: f32[N]`` (LLM.int8 / SmoothQuant-style symmetric scheme, Dettmers
et al. 2022; Xiao et al. 2023). ``out_dtype=jnp.int32`` returns the raw accumulator (scales,
bias and activation must then be None).

Kernel: grid over (M/bm, N/bn); each program loops over K in ``bk`` slices of its refs, feeds
int8 tiles to the tensor cores with an int32 accumulator, and applies the epilogue before the
single store. Operands are zero-padded to block multiples in the wrapper (zeros add nothing).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    MATMUL_DIMS, check_activation, check_dtype, check_out_dtype, check_rank, epilogue,
    matmul_blocks, matmul_call, pad_axis, round_up, store_tile)

_OUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32)


def check_matmul_args(a, b, a_scale, b_scale, bias, out_dtype, activation, *, a_name="a_q",
                      b_name="b_q", k_b=None, has_a_scale=True):
  """Validate shapes/dtypes shared by the int8 matmul family; returns (M, K, N, out_dtype)."""
  check_rank(a_name, a, 2)
  check_rank(b_name, b, 2)
  out_dtype = check_out_dtype(out_dtype, _OUT_DTYPES)
  check_activation(activation)
  m, k = a.shape
  kb = b.shape[0] if k_b is None else k_b
  n = b.shape[1]
  if kb != k:
    raise ValueError(f"contraction sizes differ: {a_name} {a.shape}, {b_name} {b.shape}")
  if out_dtype == jnp.int32:
    if a_scale is not None or b_scale is not None or bias is not None or activation:
      raise ValueError("out_dtype=int32 returns the raw accumulator: a_scale, b_scale, bias "
                       "and activation must be None")
    return m, k, n, out_dtype
  for name, v, size in (("a_scale", a_scale, m), ("b_scale", b_scale, n),
                        ("bias", bias, n)):
    if (name == "bias" and v is None) or (name == "a_scale" and not has_a_scale):
      continue
    if v is None or tuple(v.shape) != (size,):
      raise ValueError(f"{name} must have shape ({size},), got "
                       f"{None if v is None else v.shape}")
  return m, k, n, out_dtype


def int8_matmul_ref(a_q, b_q, a_scale, b_scale, bias=None, out_dtype=jnp.float32, *,
                    activation=None):
  """Pure-jnp (XLA) reference of :func:`int8_matmul` (int32 ``dot_general``; fast on CPU)."""
  check_dtype("a_q", a_q, (jnp.int8,))
  check_dtype("b_q", b_q, (jnp.int8,))
  _, _, _, out_dtype = check_matmul_args(a_q, b_q, a_scale, b_scale, bias, out_dtype,
                                         activation)
  acc = lax.dot_general(a_q, b_q, MATMUL_DIMS, preferred_element_type=jnp.int32)
  if out_dtype == jnp.int32:
    return acc
  return epilogue(acc, a_scale.astype(jnp.float32), b_scale.astype(jnp.float32),
                  None if bias is None else bias.astype(jnp.float32), activation, out_dtype)


def _kernel(a_ref, b_ref, *refs, nk, bk, has_bias, activation, out_dtype):
  o_ref = refs[-1]
  bm, bn = o_ref.shape

  def body(i, acc):
    k0 = pl.multiple_of(i * bk, bk)
    a = a_ref[:, pl.ds(k0, bk)]
    b = b_ref[pl.ds(k0, bk), :]
    return acc + lax.dot_general(a, b, MATMUL_DIMS, preferred_element_type=jnp.int32)

  acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.int32))
  store_tile(o_ref, acc, refs[:-1], has_bias, activation, out_dtype)


@functools.partial(
    jax.jit,
    static_argnames=("out_dtype", "activation", "interpret", "block_m", "block_n", "block_k"))
def int8_matmul(a_q, b_q, a_scale, b_scale, bias=None, out_dtype=jnp.float32, *,
                activation=None, interpret: bool = False, block_m: int | None = None,
                block_n: int | None = None, block_k: int | None = None):
  """Pallas kernel: int8 x int8 -> int32 tiled matmul with fused dequant epilogue.

  Args:
    a_q: ``int8[M, K]``; b_q: ``int8[K, N]``.
    a_scale: ``f32[M]``; b_scale: ``f32[N]``; bias: optional ``f32[N]``.
    out_dtype: float32, bfloat16 or float16 (or int32 for the raw accumulator).
    activation: None, "relu", "gelu" (tanh form) or "silu", applied after the bias.
    interpret: run the kernel body with the Pallas interpreter (CPU testing).
    block_m, block_n, block_k: tile sizes (powers of two; ``block_k >= 32`` on GPU); default
      chosen per shape by :func:`pallas_kernels._common.matmul_blocks`.
  """
  check_dtype("a_q", a_q, (jnp.int8,))
  check_dtype("b_q", b_q, (jnp.int8,))
  m, k, n, out_dtype = check_matmul_args(a_q, b_q, a_scale, b_scale, bias, out_dtype,
                                         activation)
  bm, bn, bk, warps, stages = matmul_blocks(m, n, k, interpret)
  bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
  mp, np_, kp = round_up(m, bm), round_up(n, bn), round_up(k, bk)
  a = pad_axis(pad_axis(a_q, 0, mp), 1, kp)
  b = pad_axis(pad_axis(b_q, 0, kp), 1, np_)
  raw = out_dtype == jnp.int32
  return matmul_call(_kernel, a, b, [] if raw else [a_scale], [] if raw else [b_scale, bias],
                     out_dtype, m=m, n=n, bm=bm, bn=bn, bk=bk, warps=warps, stages=stages,
                     interpret=interpret, name="int8_matmul", has_bias=bias is not None,
                     activation=activation)
