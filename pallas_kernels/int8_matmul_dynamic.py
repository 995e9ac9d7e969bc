"""W8A8 matmul with per-token activation quantization fused into the kernel's prologue.

For ``x: float[M, K]`` (f32/bf16/f16), ``b_q: int8[K, N]``, ``b_scale: f32[N]``::

    a_scale = max(max(|x|, axis=1), TINY) / 127                     # per-token, symmetric
    a_q     = clip(round_half_even(x / a_scale[:, None]), -127, 127)  # int8
    out     = int8_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype, activation=...)

(dynamic per-token quantization as in LLM.int8 / SmoothQuant serving). The kernel makes one
pass over its row block of ``x`` to find the row absmax, then quantizes each K slice in
registers just before the int8 dot, so ``a_q`` never goes to memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    MATMUL_DIMS, TINY, check_dtype, epilogue, matmul_blocks, matmul_call, pad_axis,
    round_half_even, round_up)
from pallas_kernels.int8_matmul import check_matmul_args, int8_matmul_ref

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def quantize_rows_ref(x):
  """Per-row symmetric int8 quantization: returns ``(a_q int8[M, K], a_scale f32[M])``."""
  x = x.astype(jnp.float32)
  a_scale = jnp.maximum(jnp.max(jnp.abs(x), axis=1), TINY) / 127.0
  a_q = jnp.clip(round_half_even(x / a_scale[:, None]), -127.0, 127.0).astype(jnp.int8)
  return a_q, a_scale


def int8_matmul_dynamic_ref(x, b_q, b_scale, bias=None, out_dtype=jnp.float32, *,
                            activation=None):
  """Pure-jnp (XLA) reference of :func:`int8_matmul_dynamic`."""
  check_dtype("x", x, _FLOATS)
  check_dtype("b_q", b_q, (jnp.int8,))
  a_q, a_scale = quantize_rows_ref(x)
  return int8_matmul_ref(a_q, b_q, a_scale, b_scale, bias, out_dtype, activation=activation)


def _kernel(x_ref, b_ref, bs_ref, *rest, nk, bk, has_bias, activation, out_dtype):
  o_ref = rest[-1]
  bm, bn = o_ref.shape

  def absmax(i, amax):
    xs = x_ref[:, pl.ds(pl.multiple_of(i * bk, bk), bk)].astype(jnp.float32)
    return jnp.maximum(amax, jnp.max(jnp.abs(xs), axis=1))

  amax = lax.fori_loop(0, nk, absmax, jnp.zeros((bm,), jnp.float32))
  a_scale = jnp.maximum(amax, TINY) / 127.0

  def body(i, acc):
    k0 = pl.multiple_of(i * bk, bk)
    xs = x_ref[:, pl.ds(k0, bk)].astype(jnp.float32)
    a = jnp.clip(round_half_even(xs / a_scale[:, None]), -127.0, 127.0).astype(jnp.int8)
    b = b_ref[pl.ds(k0, bk), :]
    return acc + lax.dot_general(a, b, MATMUL_DIMS, preferred_element_type=jnp.int32)

  acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.int32))
  bias = rest[0][...] if has_bias else None
  o_ref[...] = epilogue(acc, a_scale, bs_ref[...], bias, activation, out_dtype)


@functools.partial(
    jax.jit,
    static_argnames=("out_dtype", "activation", "interpret", "block_m", "block_n", "block_k"))
def int8_matmul_dynamic(x, b_q, b_scale, bias=None, out_dtype=jnp.float32, *,
                        activation=None, interpret: bool = False, block_m: int | None = None,
                        block_n: int | None = None, block_k: int | None = None):
  """Pallas kernel: per-token int8 quantization of ``x`` fused into an int8 matmul.

  Args:
    x: ``float[M, K]`` activations (f32, bf16 or f16).
    b_q: ``int8[K, N]``; b_scale: ``f32[N]``; bias: optional ``f32[N]``.
    out_dtype: float32, bfloat16 or float16.
    activation: None, "relu", "gelu" (tanh form) or "silu".
    interpret, block_m, block_n, block_k: as in :func:`int8_matmul`.
  """
  check_dtype("x", x, _FLOATS)
  check_dtype("b_q", b_q, (jnp.int8,))
  if jnp.dtype(out_dtype) == jnp.int32:
    raise ValueError("out_dtype must be one of ['float32', 'bfloat16', 'float16'], got int32")
  m, k, n, out_dtype = check_matmul_args(
      x, b_q, None, b_scale, bias, out_dtype, activation, a_name="x", has_a_scale=False)
  bm, bn, bk, warps, stages = matmul_blocks(m, n, k, interpret)
  bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
  mp, np_, kp = round_up(m, bm), round_up(n, bn), round_up(k, bk)
  a = pad_axis(pad_axis(x, 0, mp), 1, kp)
  b = pad_axis(pad_axis(b_q, 0, kp), 1, np_)
  return matmul_call(_kernel, a, b, [], [b_scale, bias], out_dtype, m=m, n=n, bm=bm, bn=bn,
                     bk=bk, warps=warps, stages=stages, interpret=interpret,
                     name="int8_matmul_dynamic", has_bias=bias is not None,
                     activation=activation)
