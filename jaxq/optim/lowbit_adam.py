"""AdamW with 8-bit or 4-bit block-wise quantized moments, as an optax transformation.

Adam (Kingma & Ba 2015) with decoupled weight decay (Loshchilov & Hutter 2019) keeps two
float32 moments per parameter, twice the model's size:

  m_t = b1 m_{t-1} + (1 - b1) g_t,      v_t = b2 v_{t-1} + (1 - b2) g_t^2,
  u_t = -lr_t ( m_t / (1 - b1^t) / (sqrt(v_t / (1 - b2^t)) + eps) + wd * p_t ).

Here both moments of every leaf with at least :data:`MIN_QUANTIZED_SIZE` elements are
stored block-wise quantized (:mod:`jaxq.optim.blockwise`): each step dequantizes them,
applies exactly the update above in float32 and re-quantizes, one fused elementwise pass
per leaf under ``jax.jit`` (8-bit Adam, Dettmers et al. 2022; 4-bit states, Li et al.
2023). Smaller leaves (biases, norms) keep float moments and get optax.adamw's update
bit for bit. The second moment is stored as ``r = sqrt(v)``: ``r`` is what the update
divides by and has the dynamic range of ``|g|`` (half that of ``v`` in octaves).

Codes (:mod:`jaxq.optim.codes`), chosen by measurement (``benchmarks/exp_optim_codes.py``:
distance of the parameter trajectory to optax.adamw's after 200 steps, numbers in
``benchmarks/RESULTS.md``). The second moment must not decode to zero: ``m / (r + eps)``
turns an ``r`` rounded to 0 into a step ``1/eps`` times too large (Li et al. 2023,
Sec. 4.1), so its codes are zero-point free (values below the smallest round *up*: a
smaller step, never a larger one). Storing ``r = sqrt(v)`` makes even a linear code on
``r`` a non-linear (quadratic) code on ``v`` that resolves ``v`` down to ``2^-2b`` of the
block maximum instead of ``2^-b``.

* 8 bits: ``m`` signed linear (absmax int8), ``r`` linear zero-point free,
  ``(q + 1) / 256``. Near the block maximum (the entries that move the parameters most)
  a uniform step of ``1/256`` is finer than any exponent map's relative step, and the
  range ``v_min / v_max = 2^-16`` suffices: it tracked optax.adamw 2-4x closer than the
  exponent (minifloat, dynamic-map-like) codes for ``r`` on both test problems.
* 4 bits: 16 levels cannot cover the range linearly; ``m`` a signed minifloat with
  2 exponent bits (values ``{0, 1/8, 1/6, 1/4, 1/3, 1/2, 2/3, 1}``, exact zero) and ``r``
  an unsigned one (2 exponent and 2 mantissa bits, ``r_min / r_max = 1/14``) -- the
  closest of the linear / 2-, 3-, 4-exponent-bit pairs measured (the DE idea of Li et al.
  2023, without their rank-1 normalisation).

``learning_rate`` may be an optax schedule; the state is a NamedTuple of arrays, so it
composes with ``optax.chain``, ``optax.masked``, ``optax.MultiSteps`` and
:func:`jaxq.optim.quant_aware`, checkpoints through :mod:`jaxq.checkpoint`, and its codes
and scales shard like the parameters (:func:`jaxq.sharding.opt_state_shardings`).
A non-finite gradient entry makes its block's moments non-finite (the block scale is
shared), where float Adam would spoil only that entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxq.optim import blockwise, codes
from jaxq.optim.codes import Code

PyTree = Any

__all__ = ["MIN_QUANTIZED_SIZE", "DEFAULT_CODES", "ScaleByLowBitAdamState",
           "scale_by_lowbit_adam", "adamw"]

#: Leaves with fewer elements keep float moments (their scales would cost more than
#: the bytes saved, and they are typically biases and norm scales).
MIN_QUANTIZED_SIZE = 4096

#: ``state_bits -> (first-moment code, code of sqrt(second moment))``.
DEFAULT_CODES: dict[int, tuple[Code, Code]] = {
    8: (codes.linear(8, signed=True), codes.linear(8, signed=False)),
    4: (codes.exponent(4, 2, signed=True), codes.exponent(4, 2, signed=False)),
}


class ScaleByLowBitAdamState(NamedTuple):
  """State of :func:`scale_by_lowbit_adam`; ``mu``, ``nu``, ``*_scales`` have the
  structure of the params. For a quantized leaf ``mu`` / ``nu`` hold the uint8 codes of
  ``m`` / ``sqrt(v)`` (params' shape; 4-bit: last axis halved, two codes a byte) and
  ``*_scales`` its float32 block scales; for a small leaf ``mu`` / ``nu`` hold ``m`` /
  ``v`` as optax does and ``*_scales`` is None."""

  count: jax.Array
  mu: PyTree
  mu_scales: PyTree
  nu: PyTree
  nu_scales: PyTree


def _check_config(state_bits, block_size, first_code, second_code) -> tuple[Code, Code]:
  if state_bits not in DEFAULT_CODES or isinstance(state_bits, bool):
    raise ValueError(f"state_bits must be one of {sorted(DEFAULT_CODES)}; got "
                     f"{state_bits!r}")
  if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
    raise ValueError(f"block_size must be a positive int; got {block_size!r}")
  default_first, default_second = DEFAULT_CODES[state_bits]
  first = default_first if first_code is None else first_code
  second = default_second if second_code is None else second_code
  for field, code, signed in (("first_code", first, True),
                              ("second_code", second, False)):
    if code.bits != state_bits or code.signed != signed:
      raise ValueError(f"{field} must be a {'signed' if signed else 'unsigned'} "
                       f"{state_bits}-bit Code (state_bits={state_bits}); got "
                       f"{code.name} ({code.bits}-bit, signed={code.signed})")
  return first, second


def _quantized(leaf) -> bool:
  return math.prod(jnp.shape(leaf)) >= MIN_QUANTIZED_SIZE


def scale_by_lowbit_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                         state_bits: int = 8, block_size: int = 256,
                         first_code: Code | None = None,
                         second_code: Code | None = None) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` with block-wise quantized moments (see the module doc).

  ``first_code`` / ``second_code`` override :data:`DEFAULT_CODES` (a signed and an
  unsigned ``state_bits``-bit :class:`~jaxq.optim.codes.Code`).
  """
  first, second = _check_config(state_bits, block_size, first_code, second_code)

  def init_fn(params):
    def moment(code: Code) -> tuple[PyTree, PyTree]:
      def codes_of(p):
        if not _quantized(p):
          return jnp.zeros_like(p)
        zeros = jnp.zeros(jnp.shape(p), jnp.float32)
        return blockwise.quantize(zeros, code, block_size)[0]

      def scales_of(p):
        if not _quantized(p):
          return None
        return jnp.zeros(blockwise.scales_shape(jnp.shape(p), block_size), jnp.float32)

      return jax.tree.map(codes_of, params), jax.tree.map(scales_of, params)

    mu, mu_scales = moment(first)
    nu, nu_scales = moment(second)
    return ScaleByLowBitAdamState(jnp.zeros([], jnp.int32), mu, mu_scales, nu, nu_scales)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    bias_corrections = (1 - b1 ** count, 1 - b2 ** count)
    leaves, treedef = jax.tree.flatten(updates)
    parts = [treedef.flatten_up_to(t) for t in state[1:]]
    out = [_update_leaf(g, *moments, bias_corrections=bias_corrections, b1=b1, b2=b2,
                        eps=eps, first=first, second=second, block_size=block_size)
           for g, *moments in zip(leaves, *parts)]
    new_updates, *new_moments = list(zip(*out)) or [()] * 5
    unflatten = lambda xs: jax.tree.unflatten(treedef, list(xs))  # noqa: E731
    return unflatten(new_updates), ScaleByLowBitAdamState(
        count, *map(unflatten, new_moments))

  return optax.GradientTransformation(init_fn, update_fn)


def _update_leaf(g, mu, mu_scales, nu, nu_scales, *, bias_corrections, b1, b2, eps,
                 first: Code, second: Code, block_size: int):
  """One leaf: ``(update, mu, mu_scales, nu, nu_scales)``; ``bias_corrections`` is
  ``(1 - b1^t, 1 - b2^t)``."""
  bc1, bc2 = bias_corrections
  if mu_scales is None:  # float moments: optax.scale_by_adam's arithmetic
    mu = (1 - b1) * g + b1 * mu
    nu = (1 - b2) * (g ** 2) + b2 * nu
    mu_hat = mu / bc1.astype(mu.dtype)
    nu_hat = nu / bc2.astype(nu.dtype)
    return mu_hat / (jnp.sqrt(nu_hat) + eps), mu, None, nu, None
  shape = jnp.shape(g)
  g32 = g.astype(jnp.float32)
  m = blockwise.dequantize(mu, mu_scales, first, shape, block_size)
  r = blockwise.dequantize(nu, nu_scales, second, shape, block_size)
  m = (1 - b1) * g32 + b1 * m
  r = jnp.sqrt((1 - b2) * (g32 * g32) + b2 * (r * r))
  update = (m / bc1) / (r / jnp.sqrt(bc2) + eps)
  mu, mu_scales = blockwise.quantize(m, first, block_size)
  nu, nu_scales = blockwise.quantize(r, second, block_size)
  return update.astype(g.dtype), mu, mu_scales, nu, nu_scales


def adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 1e-4, *, state_bits: int = 8,
          block_size: int = 256,
          mask: PyTree | Callable[[PyTree], PyTree] | None = None,
          first_code: Code | None = None,
          second_code: Code | None = None) -> optax.GradientTransformation:
  """``optax.adamw`` with ``state_bits``-bit (8 or 4) block-wise quantized moments.

  The same chain as optax.adamw -- :func:`scale_by_lowbit_adam`,
  ``optax.add_decayed_weights(weight_decay, mask)``,
  ``optax.scale_by_learning_rate(learning_rate)`` -- so ``mask`` and schedules behave
  identically. Blocks of ``block_size`` consecutive elements share one float32 scale.

    tx = jaxq.optim.adamw(optax.cosine_decay_schedule(1e-3, 10_000), state_bits=4,
                          mask=jaxq.optim.decay_mask)
  """
  return optax.chain(
      scale_by_lowbit_adam(b1, b2, eps, state_bits=state_bits, block_size=block_size,
                           first_code=first_code, second_code=second_code),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
