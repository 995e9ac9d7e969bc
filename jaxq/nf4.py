"""NormalFloat-4 (NF4): QLoRA's 4-bit codebook with per-group absmax scaling.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", Sec. 3
(4-bit NormalFloat, Double Quantization); the levels are printed in its appendix.

Levels. NF4 is a quantile quantizer for zero-mean normal weights with an exact zero.
With ``Phi^-1`` the standard normal quantile function and
``delta = 1 - (1/30 + 1/32) / 2 = 0.9677083`` (the outermost quantile probability, the
mean of those of 15 and 16 equal-mass bins, so the extreme levels stay finite), the 8
positive levels are ``Phi^-1(p)`` for the first 8 points ``p`` of
``linspace(delta, 0.5, 9)`` and the 7 negative ones ``-Phi^-1(p)`` for the first 7 of
``linspace(delta, 0.5, 8)`` (``p = 0.5``, the zero, is dropped from both and added once);
all 16 are divided by ``Phi^-1(delta)`` so they span ``[-1, 1]``. Code ``c`` (0..15)
stands for the ``c``-th smallest level (code 0 = -1, code 7 = 0, code 15 = 1), as in
bitsandbytes.

Quantization of a ``(K, N)`` kernel view ``w`` along its contraction axis: the
``group_size`` consecutive elements ``w[i*g:(i+1)*g, n]`` share

    absmax[i, n] = max_j |w[i*g + j, n]|          (float32)
    code[k, n]   = argmin_c |w[k, n] / absmax - level[c]|
    w_hat[k, n]  = level[code] * absmax           (float32, then the requested dtype)

Rounding compares ``w / absmax`` (float32) with the 15 float32 midpoints of adjacent
levels; a value exactly on a midpoint takes the LOWER level (deterministic, and the
same in :func:`nf4_quantize` and :func:`nf4_fake_quant`). ``w = level * absmax`` comes
back bit-exactly, since ``w / absmax`` is within a rounding error of ``level`` and the
dequantized value is the same float32 product. An all-zero group has ``absmax = 0`` and
dequantizes to zeros.

Non-finite input: 16 codes cannot hold NaN or Inf, so a group holding any NaN or +-Inf
gets ``absmax = NaN`` (its codes are the zero level): the whole group dequantizes to
NaN, in :func:`nf4_dequantize` and :func:`nf4_fake_quant` alike. Nothing is clipped
silently.

Storage: codes are packed two per byte with :func:`jaxq.qarray.pack_bits` (the layout
of a 4-bit :class:`jaxq.QArray`: along the last logical axis, element ``j`` of a byte in
bits ``[4j, 4j+4)``, the last axis zero-padded to even length); ``absmax`` has the
keepdims layout of a group-granularity QArray scale (``(K/g, 1, N)`` for ``axis=0``).

Double quantization (QLoRA Sec. 3, optional): the flattened float32 absmaxes (one per
group, ``G`` of them) lose their mean ``m`` and are quantized symmetrically to int8 in
blocks of 256 consecutive values, one float32 scale per block:
``code2 = round((absmax - m) / s_b)``, ``s_b = max_block |absmax - m| / 127``. QLoRA
uses bitsandbytes' dynamic 8-bit float code here; this module uses linear int8. A
non-finite absmax is stored as the reserved code -128 and recovered as NaN, so it still
poisons only its own group. Bytes per group drop from 4 to ``1 + 4/256`` (plus 4 for
``m``); the price is a rounding error of at most ``s_b / 2`` on each absmax, so the
round trip of ``level * absmax`` is exact only with float32 scales.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import ndtri

from jaxq import numerics
from jaxq.bitpack import pack_bits, unpack_bits

#: Probability of the largest NF4 quantile: ``1 - (1/30 + 1/32) / 2``.
NF4_OFFSET = 0.9677083


def _normal_float_levels(offset: float) -> np.ndarray:
  """The 16 NF4 levels in float64, ascending, in ``[-1, 1]`` with an exact zero."""
  positive = ndtri(np.linspace(offset, 0.5, 9)[:-1])
  negative = -ndtri(np.linspace(offset, 0.5, 8)[:-1])
  levels = np.sort(np.concatenate([negative, [0.0], positive]))
  return levels / levels[-1]


_LEVELS64 = _normal_float_levels(NF4_OFFSET)

#: The 16 NF4 levels (float32, ascending); code ``c`` stands for ``NF4_LEVELS[c]``.
NF4_LEVELS = np.asarray(_LEVELS64, np.float32)
#: Float32 midpoints of adjacent levels: the rounding thresholds.
NF4_MIDPOINTS = np.asarray((_LEVELS64[:-1] + _LEVELS64[1:]) / 2, np.float32)
#: Code of the level 0.0.
ZERO_CODE = int(np.flatnonzero(NF4_LEVELS == 0.0)[0])

#: Consecutive absmaxes sharing one second-level scale under double quantization.
DOUBLE_QUANT_BLOCK = 256
_NONFINITE_CODE = -128


class DoubleQuantAbsmax(NamedTuple):
  """Double-quantized absmaxes (see the module docstring); a pytree of arrays.

  Attributes:
    codes: int8, shape ``(G,)``: the flattened absmaxes minus ``mean``, in int8 steps
      of their block's scale; -128 marks a non-finite absmax.
    block_scale: float32, shape ``(ceil(G / 256),)``.
    mean: float32 scalar: mean of the finite absmaxes.
  """
  codes: jax.Array
  block_scale: jax.Array
  mean: jax.Array


def check_nf4_fields(bits, granularity, group_size, signed=True, symmetric=True,
                     owner: str = "QuantSpec") -> None:
  """Raises ValueError unless the fields describe NF4: 4 bits, "group", a group size.

  NF4 is signed and symmetric by definition; its absmax is taken per group along the
  contraction axis, so it needs ``granularity="group"`` and a positive ``group_size``.
  """
  for name, value in (("signed", signed), ("symmetric", symmetric)):
    if value is not True:
      raise ValueError(f"{owner}.{name} must be True for scheme='nf4' (a signed, "
                       f"symmetric codebook); got {value!r}")
  if bits != 4 or isinstance(bits, bool):
    raise ValueError(f"{owner}.bits must be 4 for scheme='nf4' (16 NF4 levels); "
                     f"got {bits!r}")
  if granularity != "group":
    raise ValueError(f"{owner}.granularity must be 'group' for scheme='nf4' (absmax per "
                     f"group of the contraction axis); got {granularity!r}")
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"{owner}.group_size must be a positive int for scheme='nf4'; "
                     f"got {group_size!r}")


def _check_grouping(shape, group_size, axis) -> int:
  """Validates the grouping of an array of any rank >= 1; returns the grouped axis."""
  if not shape:
    raise ValueError("NF4 needs an array of rank >= 1; got a scalar")
  if isinstance(axis, bool) or not isinstance(axis, int) or not -len(shape) <= axis < len(
      shape):
    raise ValueError(f"axis must be an axis of an array of shape {tuple(shape)}; got "
                     f"{axis!r}")
  axis %= len(shape)
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"group_size must be a positive int; got {group_size!r}")
  if shape[axis] % group_size:
    raise ValueError(f"group_size={group_size} must divide the length {shape[axis]} of "
                     f"the grouped axis {axis} (shape {tuple(shape)})")
  return axis


def _check_view(shape, group_size, axis, name: str = "w") -> int:
  """Validates a 2-D kernel view and its grouping; returns the grouped axis (0 or 1)."""
  if len(shape) != 2:
    raise ValueError(f"{name} must be a 2-D (K, N) kernel view for NF4; got shape "
                     f"{tuple(shape)}")
  if isinstance(axis, bool) or not isinstance(axis, int) or axis not in (-2, -1, 0, 1):
    raise ValueError(f"axis must be the contraction axis of the 2-D view, one of "
                     f"0, 1, -1, -2; got {axis!r}")
  return _check_grouping(shape, group_size, axis)


def _check_float(w) -> jax.Array:
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"w must be a floating array for NF4; got dtype {w.dtype}")
  return w


def nf4_codes(w: jax.Array, group_size: int, axis: int = 0):
  """``(codes, absmax)`` of ``w`` (any rank >= 1) grouped along ``axis``.

  One absmax per ``group_size`` consecutive elements of ``axis`` and per index of every
  other axis. ``codes``: uint8 in ``[0, 16)`` of ``w``'s shape (unpacked); ``absmax``:
  float32 in the keepdims layout of the grouped view
  (:func:`jaxq.numerics.to_groups`: ``axis`` split into ``(n / g, 1)``).
  """
  w = _check_float(w)
  axis = _check_grouping(w.shape, group_size, axis)
  return _codes_and_absmax(w, group_size, axis)


def nf4_values(codes: jax.Array, absmax: jax.Array, group_size: int, axis: int = 0
               ) -> jax.Array:
  """Inverse of :func:`nf4_codes`: ``level[code] * absmax`` in float32."""
  codes = jnp.asarray(codes)
  axis = _check_grouping(codes.shape, group_size, axis)
  return _levels_times_absmax(codes, jnp.asarray(absmax, jnp.float32), group_size, axis)


def _codes_and_absmax(w: jax.Array, group_size: int, axis: int):
  """Codes (uint8, logical shape) and float32 absmax (keepdims group layout)."""
  wv = numerics.to_groups(w.astype(jnp.float32), group_size, axis)
  # XLA:CPU's max reduction does not always propagate NaN: flag non-finite groups apart.
  nonfinite = jnp.any(~jnp.isfinite(wv), axis=axis + 1, keepdims=True)
  absmax = jnp.where(nonfinite, jnp.nan, jnp.max(jnp.abs(wv), axis=axis + 1, keepdims=True))
  usable = jnp.isfinite(absmax) & (absmax > 0)
  xn = jnp.where(usable, wv / jnp.where(usable, absmax, 1.0), 0.0)
  codes = jnp.sum(xn[..., None] > jnp.asarray(NF4_MIDPOINTS), axis=-1, dtype=jnp.int32)
  return numerics.from_groups(codes.astype(jnp.uint8), axis), absmax


def _levels_times_absmax(codes: jax.Array, absmax: jax.Array, group_size: int, axis: int
                         ) -> jax.Array:
  levels = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)]
  wv = numerics.to_groups(levels, group_size, axis) * absmax
  return numerics.from_groups(wv, axis)


def absmax_shape(shape, group_size: int, axis: int = 0) -> tuple[int, ...]:
  """Shape of the float32 absmax for a 2-D view of ``shape``: ``(K/g, 1, N)`` for axis 0."""
  axis = _check_view(shape, group_size, axis)
  out = [shape[0], shape[1]]
  out[axis:axis + 1] = [shape[axis] // group_size, 1]
  return tuple(out)


def nf4_quantize(w: jax.Array, group_size: int, axis: int = 0, *,
                 double_quant: bool = False):
  """Quantizes a 2-D kernel view to NF4: ``(packed codes, absmax)``.

  Args:
    w: float array of shape ``(K, N)`` (any float dtype; quantized in float32).
    group_size: elements of the contraction axis sharing one absmax; divides its length.
    axis: the contraction axis (0 for a ``(K, N)`` Dense kernel).
    double_quant: return the absmaxes as a :class:`DoubleQuantAbsmax` instead of float32.

  Returns:
    ``packed``: uint8 of shape ``(K, ceil(N / 2))``, two codes a byte
    (:func:`jaxq.qarray.pack_bits` layout); ``absmax``: float32 of shape
    :func:`absmax_shape`, or its :class:`DoubleQuantAbsmax`.
  """
  w = _check_float(w)
  axis = _check_view(w.shape, group_size, axis)
  codes, absmax = _codes_and_absmax(w, group_size, axis)
  packed = pack_bits(codes, 4, axis=-1)
  return packed, (double_quantize_absmax(absmax) if double_quant else absmax)


def nf4_dequantize(packed: jax.Array, absmax, shape, group_size: int, axis: int = 0,
                   dtype=jnp.float32) -> jax.Array:
  """Inverse of :func:`nf4_quantize`: ``level[code] * absmax`` of ``shape`` in ``dtype``.

  ``absmax`` is the float32 array or a :class:`DoubleQuantAbsmax`.
  """
  shape = tuple(int(d) for d in shape)
  axis = _check_view(shape, group_size, axis, "shape")
  packed = jnp.asarray(packed)
  want = (shape[0], -(-shape[1] // 2))
  if packed.dtype != jnp.uint8 or packed.shape != want:
    raise ValueError(f"packed must be uint8 of shape {want} for shape {shape}; got "
                     f"{packed.dtype}{tuple(packed.shape)}")
  stat = absmax_shape(shape, group_size, axis)
  if isinstance(absmax, DoubleQuantAbsmax):
    absmax = recover_absmax(absmax)
    if absmax.size != int(np.prod(stat)):
      raise ValueError(f"absmax holds {absmax.size} double-quantized groups; shape "
                       f"{shape} with group_size={group_size} has {int(np.prod(stat))}")
    absmax = absmax.reshape(stat)
  absmax = jnp.asarray(absmax)
  if absmax.shape != stat:
    raise ValueError(f"absmax must have shape {stat} for shape {shape}, "
                     f"group_size={group_size}, axis={axis}; got {tuple(absmax.shape)}")
  codes = unpack_bits(packed, 4, shape[1], axis=-1)
  return _levels_times_absmax(codes, absmax.astype(jnp.float32), group_size,
                              axis).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _fake_quant(w: jax.Array, group_size: int, axis: int) -> jax.Array:
  codes, absmax = _codes_and_absmax(w, group_size, axis)
  return _levels_times_absmax(codes, absmax, group_size, axis).astype(w.dtype)


def _fake_quant_fwd(w, group_size, axis):
  return _fake_quant(w, group_size, axis), None


def _fake_quant_bwd(group_size, axis, residual, g):
  del group_size, axis, residual
  return (g,)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def nf4_fake_quant(w: jax.Array, group_size: int, axis: int = 0) -> jax.Array:
  """``nf4_values(*nf4_codes(w, ...))`` in ``w``'s dtype, straight-through.

  ``w`` has any rank >= 1, grouped along ``axis`` (:func:`nf4_codes`); for a 2-D view
  the forward equals ``nf4_dequantize(*nf4_quantize(w, ...))`` bit for bit (float32
  scales). The gradient is the identity (``d w_hat / d w = 1``, Bengio et al. 2013),
  for QAT of the base weights.
  """
  w = _check_float(w)
  axis = _check_grouping(w.shape, group_size, axis)
  return _fake_quant(w, group_size, axis)


def double_quantize_absmax(absmax: jax.Array) -> DoubleQuantAbsmax:
  """QLoRA's double quantization of float32 absmaxes (see the module docstring)."""
  flat = jnp.asarray(absmax, jnp.float32).reshape(-1)
  finite = jnp.isfinite(flat)
  count = jnp.maximum(jnp.sum(finite), 1)
  mean = jnp.sum(jnp.where(finite, flat, 0.0)) / count
  centred = jnp.where(finite, flat - mean, 0.0)
  pad = -flat.size % DOUBLE_QUANT_BLOCK
  blocks = jnp.pad(centred, (0, pad)).reshape(-1, DOUBLE_QUANT_BLOCK)
  block_scale = jnp.max(jnp.abs(blocks), axis=1) / 127.0
  safe = jnp.where(block_scale > 0, block_scale, 1.0)
  codes = jnp.clip(jnp.round(blocks / safe[:, None]), -127, 127).reshape(-1)[:flat.size]
  codes = jnp.where(finite, codes, _NONFINITE_CODE).astype(jnp.int8)
  return DoubleQuantAbsmax(codes, block_scale.astype(jnp.float32), mean)


def recover_absmax(dq: DoubleQuantAbsmax) -> jax.Array:
  """The flat float32 absmaxes ``mean + code * block_scale`` (NaN where code is -128);
  leading (stacking) axes of all three arrays are kept."""
  codes = jnp.asarray(dq.codes)
  n = codes.shape[-1]
  scale = jnp.repeat(jnp.asarray(dq.block_scale, jnp.float32), DOUBLE_QUANT_BLOCK,
                     axis=-1)[..., :n]
  absmax = jnp.asarray(dq.mean, jnp.float32)[..., None] + codes.astype(jnp.float32) * scale
  return jnp.where(codes == _NONFINITE_CODE, jnp.nan, absmax)


def nf4_nbytes(packed: jax.Array, absmax) -> int:
  """Storage bytes of an :func:`nf4_quantize` result (codes plus scales)."""
  return sum(int(np.prod(jnp.shape(a), dtype=np.int64)) * jnp.dtype(a.dtype).itemsize
             for a in jax.tree_util.tree_leaves((packed, absmax)))
