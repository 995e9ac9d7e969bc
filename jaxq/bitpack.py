"""Bit packing: integers of width 1, 2, 4 or 8 bits stored in ``uint8`` bytes.

The one packing layout of jaxq: along one axis, ``8 // bits`` consecutive elements a
byte, element ``j`` in bits ``[j*bits, (j+1)*bits)`` (little end first, as the Pallas
kernels of Contract 5). Only the axis differs by user: a :class:`jaxq.QArray` (and
:mod:`jaxq.nf4` codes) packs its last axis, whatever its rank; the int4 matmul kernels
read two rows of K a byte, ``kernels.pack_int4(w) == pack_bits(w, 4, axis=0)`` for
``w[K, N]`` (the K-major operand a matmul tile streams), so serving re-packs once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxq import numerics

__all__ = ["PACK_BITS", "check_pack_bits", "pack_bits", "unpack_bits"]

#: Widths that divide a byte: the ones bit packing (and activation compression) stores.
PACK_BITS = (1, 2, 4, 8)


def check_pack_bits(bits, name: str = "bits") -> int:
  """Validates a packing width, one of :data:`PACK_BITS` (:func:`jaxq.numerics.check_bits`)."""
  return numerics.check_bits(bits, name, PACK_BITS)


def pack_bits(q: jax.Array, bits: int, axis: int = -1) -> jax.Array:
  """Packs integers of width ``bits`` (1, 2, 4, 8) into ``uint8`` along ``axis``.

  Each value contributes its low ``bits`` bits (two's complement for negative
  values); ``8 // bits`` consecutive elements share a byte, element ``j`` at bits
  ``[j*bits, (j+1)*bits)``. ``axis`` (length ``n``) is zero-padded to a multiple of
  ``8 // bits`` and becomes ``ceil(n * bits / 8)`` long.
  """
  bits = check_pack_bits(bits)
  q = jnp.asarray(q)
  if not jnp.issubdtype(q.dtype, jnp.integer):
    raise TypeError(f"pack_bits needs an integer array; got dtype {q.dtype}")
  if q.ndim == 0:
    raise ValueError("pack_bits needs an array of rank >= 1; got a scalar")
  axis = numerics.normalize_axis(axis, q.ndim)
  per = 8 // bits
  u = jnp.moveaxis(q, axis, -1).astype(jnp.uint8) & jnp.uint8(2**bits - 1)
  n = u.shape[-1]
  pad = -n % per
  if pad:
    u = jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, pad)])
  u = u.reshape(u.shape[:-1] + ((n + pad) // per, per)).astype(jnp.uint32)
  shifts = jnp.arange(per, dtype=jnp.uint32) * bits
  packed = jnp.sum(u << shifts, axis=-1).astype(jnp.uint8)  # disjoint bits: sum == or
  return jnp.moveaxis(packed, -1, axis)


def unpack_bits(packed: jax.Array, bits: int, n: int, axis: int = -1, *,
                signed: bool = False) -> jax.Array:
  """Inverse of :func:`pack_bits`: the first ``n`` elements along ``axis``.

  Returns ``int8`` (sign-extended from ``bits`` bits) when ``signed`` else ``uint8``.
  """
  bits = check_pack_bits(bits)
  packed = jnp.asarray(packed)
  if packed.dtype != jnp.uint8:
    raise TypeError(f"unpack_bits needs a uint8 array; got dtype {packed.dtype}")
  if packed.ndim == 0:
    raise ValueError("unpack_bits needs an array of rank >= 1; got a scalar")
  axis = numerics.normalize_axis(axis, packed.ndim)
  per = 8 // bits
  m = packed.shape[axis]
  if not (m - 1) * per < n <= m * per and not (m == 0 and n == 0):
    raise ValueError(
        f"n={n} elements do not fit {m} packed bytes of {per} {bits}-bit values along "
        f"axis {axis} (need ceil(n / {per}) == {m})")
  p = jnp.moveaxis(packed, axis, -1)
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  u = (p[..., None] >> shifts) & jnp.uint8(2**bits - 1)
  u = u.reshape(p.shape[:-1] + (m * per,))[..., :n]
  if signed:
    v = u.astype(jnp.int16)
    u = jnp.where(v >= 2 ** (bits - 1), v - 2**bits, v).astype(jnp.int8)
  return jnp.moveaxis(u, -1, axis)
