"""A frozen NF4 base kernel whose float copy is not kept for the backward pass.

A QLoRA layer computes ``y = x @ W`` with ``W = dequant(q)`` (:mod:`jaxq.nf4`), and the
backward pass needs ``dx = dy @ W^T``. Dequantizing whole kernels, XLA:CPU schedules
every layer's dequantization (it depends on parameters only) at the start of the step
and keeps each ``W`` until its backward step: the float base's bytes again, in
temporaries. ``jax.checkpoint`` does not prevent it: XLA:CPU removes the optimization
barriers and common-subexpression elimination merges the recomputed ``W`` back into the
forward one. Here both passes dequantize ``W`` in blocks of columns inside a loop (a
separate computation, neither hoisted nor merged):

    y[:, c] = x @ W[:, c],   dx = sum_c dy[:, c] @ W[:, c]^T,
    W[:, c] = level[code[:, c]] * absmax[:, c]

so at most one block of ``W`` is in memory at a time, at the cost of a second
dequantization per step (bitsandbytes' QLoRA also dequantizes in the backward pass).
The products use the default matmul precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxq.layer.views import Contraction
from jaxq.nf4 import nf4_dequantize
from jaxq.qarray import QArray, nf4_absmax

__all__ = ["column_block", "applies", "nf4_base_compute"]

#: Largest block of columns dequantized at once.
MAX_BLOCK = 256


def column_block(n: int) -> int | None:
  """The column block for a kernel of ``n`` columns: the largest even divisor of ``n``
  that is at most ``min(MAX_BLOCK, n // 2)`` (two codes a byte, two blocks at least:
  a one-trip loop would be inlined and merged), or None."""
  widths = [w for w in range(2, min(MAX_BLOCK, n // 2) + 1, 2) if n % w == 0]
  return max(widths) if widths else None


def applies(op: Contraction, q: QArray) -> bool:
  """A 2-D NF4 kernel ``(K, N)`` grouped along ``K``, contracted over axis 0 by a
  matmul-shaped op (Dense), with a column block (:func:`column_block`)."""
  return (op.matmul_ok and q.spec.scheme == "nf4" and q.ndim == 2
          and tuple(op.rhs_contract) == (0,) and q.group_axis % q.ndim == 0
          and column_block(q.shape[1]) is not None)


def _dequant(values, absmax, q: QArray, n: int) -> jax.Array:
  return nf4_dequantize(values, absmax, (q.shape[0], n), q.spec.group_size, 0, q.dtype)


def nf4_base_compute(op: Contraction, q: QArray):
  """``compute(x, _) = op``'s result on ``x`` and ``dequant(q)`` (the second operand,
  a placeholder, is ignored), computed blockwise in both passes (module docstring),
  with no gradient for ``q``. Requires :func:`applies`."""
  (k, n), g = q.shape, q.spec.group_size
  w = column_block(n)
  c = n // w

  def blocks(values, absmax):  # (c, K, w / 2) codes, (c, K / g, 1, w) absmaxes
    return (values.reshape(k, c, w // 2).swapaxes(0, 1),
            absmax.reshape(k // g, 1, c, w).transpose(2, 0, 1, 3))

  @jax.custom_vjp
  def matmul(x2, values, absmax):
    ys = lax.map(lambda b: x2 @ _dequant(*b, q, w).astype(x2.dtype), blocks(values, absmax))
    return ys.swapaxes(0, 1).reshape(x2.shape[0], n)

  def fwd(x2, values, absmax):
    return matmul(x2, values, absmax), (values, absmax)

  def bwd(res, dy):
    m, dtype = dy.shape[0], dy.dtype

    def step(dx, block):
      v, a, d = block
      return dx + d @ _dequant(v, a, q, w).astype(dtype).T, None

    dy_blocks = dy.reshape(m, c, w).swapaxes(0, 1)
    dx, _ = lax.scan(step, jnp.zeros((m, k), dtype), blocks(*res) + (dy_blocks,))
    return dx, None, None

  matmul.defvjp(fwd, bwd)

  def compute(x, _):
    x2, _ = Contraction(op.kind, x, op.rhs, op.lhs_contract, op.rhs_contract, op.compute,
                        op.matmul_ok, op.out_shape).lhs_matrix()
    return op.out_from_matrix(matmul(x2, q.values, lax.stop_gradient(nf4_absmax(q))))

  return compute
