"""Codes for block-wise quantized optimizer states: value maps on [-1, 1] or [0, 1].

A code maps a block-normalised value ``y = x / absmax(block)`` to an integer of
``bits`` bits and back; :mod:`jaxq.optim.blockwise` supplies the block scales. Every
code here is analytic (a few integer and float operations per element, no table lookup,
no search), so encoding is one fused elementwise XLA pass, and every encoder returns the
*nearest* code value (ties aside), which ``tests/test_optim_lowbit.py`` checks against a
brute-force search over the decoded table.

* :func:`linear` -- uniform levels. Signed: ``q / L`` for ``q in [-L, L]``,
  ``L = 2^(bits-1) - 1`` (symmetric absmax, exact zero). Unsigned and *zero-point free*
  (Li et al. 2023, "Memory Efficient Optimizers with 4-bit States", Sec. 4.1):
  ``(q + 1) / 2^bits`` for ``q in [0, 2^bits - 1]``, so no value is decoded as 0. For
  Adam's second moment a zero is the failure mode: ``m / (sqrt(0) + eps)`` is an update
  ``1/eps`` times too large.
* :func:`exponent` -- a minifloat relative to the block maximum: ``E`` exponent and
  ``M = bits - E (- 1 if signed)`` mantissa bits, values
  ``2^-e (1 + f / 2^M) / (2 - 2^-M)`` for ``e in [0, 2^E - 1]``, ``f in [0, 2^M - 1]``.
  The relative spacing is ``<= 2^-M`` over ``2^E - 1`` octaves, so small entries of a
  block keep their relative precision, the property of the dynamic (exponent) map of
  8-bit Adam (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization") and
  of the DE map of Li et al. 2023. Unsigned codes are zero-point free (values below the
  smallest decode to the smallest); signed codes spend the smallest magnitude on an exact
  zero. Encoding rounds the float32 mantissa to ``M`` bits on the integer bit pattern
  (``lax.bitcast_convert_type``); a carry into the exponent is the correct rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["Code", "linear", "exponent", "decode_table"]

_F32_MANTISSA = 23
_F32_BIAS = 127


class Code(NamedTuple):
  """A ``bits``-bit value map. ``encode``: normalised float32 (in [-1, 1] when
  ``signed``, else [0, 1]) -> uint8 codes in ``[0, levels)``; ``decode``: back to
  float32, with 1 (and -1 when signed) among the values."""

  name: str
  bits: int
  levels: int
  signed: bool
  encode: Callable[[jax.Array], jax.Array]
  decode: Callable[[jax.Array], jax.Array]


def _check_bits(bits: int, low: int) -> None:
  if not isinstance(bits, int) or isinstance(bits, bool) or not low <= bits <= 8:
    raise ValueError(f"bits must be an int in [{low}, 8]; got {bits!r}")


def linear(bits: int, *, signed: bool) -> Code:
  """Uniform levels: signed symmetric absmax, or unsigned zero-point free."""
  _check_bits(bits, 2)
  if signed:
    top = 2 ** (bits - 1) - 1

    def encode(y):
      return (jnp.clip(jnp.round(y * top), -top, top) + top).astype(jnp.uint8)

    def decode(q):
      return (q.astype(jnp.float32) - top) * (1.0 / top)
  else:
    steps = 2 ** bits

    def encode(y):
      return jnp.clip(jnp.round(y * steps) - 1, 0, steps - 1).astype(jnp.uint8)

    def decode(q):
      return (q.astype(jnp.float32) + 1) * (1.0 / steps)

  kind = "s" if signed else "u"
  levels = 2 * top + 1 if signed else 2 ** bits
  return Code(f"linear{kind}{bits}", bits, levels, signed, encode, decode)


def exponent(bits: int, exp_bits: int, *, signed: bool) -> Code:
  """A minifloat of ``exp_bits`` exponent bits relative to the block maximum."""
  _check_bits(bits, 2)
  man_bits = bits - exp_bits - int(signed)
  if not isinstance(exp_bits, int) or exp_bits < 1 or man_bits < 0:
    raise ValueError(f"exp_bits must be in [1, {bits - int(signed)}] for a "
                     f"{'signed' if signed else 'unsigned'} {bits}-bit code; "
                     f"got {exp_bits!r}")
  e_max = 2 ** exp_bits - 1
  mag_bits = exp_bits + man_bits
  top = 2.0 - 2.0 ** -man_bits  # the largest minifloat magnitude, decoded as 1
  shift = _F32_MANTISSA - man_bits
  man_mask = 2 ** man_bits - 1
  # Signed codes: the magnitude code of the smallest value (e_max, 0) decodes to 0; the
  # next magnitude up is (e_max, 1), or (e_max - 1, 0) without mantissa bits.
  zero = e_max << man_bits
  above_zero = zero + 1 if man_bits else zero - 1
  if man_bits:
    smallest_nonzero = 2.0 ** -e_max * (1 + 2.0 ** -man_bits)
  else:
    smallest_nonzero = 2.0 ** (1 - e_max)

  def encode_magnitude(a):
    a = jnp.minimum(a * top, top)
    pattern = lax.bitcast_convert_type(a, jnp.int32)
    rounded = (pattern + (1 << (shift - 1))) & ~((1 << shift) - 1)
    e = _F32_BIAS - (rounded >> _F32_MANTISSA)
    f = (rounded >> shift) & man_mask
    code = jnp.where(e > e_max, zero, (jnp.minimum(e, e_max) << man_bits) | f)
    if signed:  # nearest of 0 and the smallest nonzero magnitude
      nearest = jnp.where(a < smallest_nonzero / 2, zero, above_zero)
      code = jnp.where(code == zero, nearest, code)
    return code

  def decode_magnitude(code):
    e = code >> man_bits
    pattern = ((_F32_BIAS - e) << _F32_MANTISSA) | ((code & man_mask) << shift)
    value = lax.bitcast_convert_type(pattern, jnp.float32) * (1.0 / top)
    return jnp.where(code == zero, 0.0, value) if signed else value

  if signed:
    def encode(y):
      code = encode_magnitude(jnp.abs(y)) | jnp.where(y < 0, 1 << mag_bits, 0)
      return code.astype(jnp.uint8)

    def decode(q):
      q = q.astype(jnp.int32)
      value = decode_magnitude(q & ((1 << mag_bits) - 1))
      return jnp.where(q >> mag_bits, -value, value)
  else:
    def encode(y):
      return encode_magnitude(y).astype(jnp.uint8)

    def decode(q):
      return decode_magnitude(q.astype(jnp.int32))

  kind = "s" if signed else "u"
  return Code(f"exp{kind}{bits}e{exp_bits}", bits, 2 ** bits, signed, encode, decode)


def decode_table(code: Code) -> jax.Array:
  """Every value of ``code``: ``decode(arange(levels))`` (float32[levels])."""
  return code.decode(jnp.arange(code.levels, dtype=jnp.uint8))
