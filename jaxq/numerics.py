"""Integer ranges, scales and zero points, rounding and the tensor layouts of scales.

Uniform quantization maps a real ``x`` to an integer
``q = clip(round(x / s) + z, qmin, qmax)`` and back to ``x_hat = (q - z) * s``
(Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference"; Nagel et al. 2021, "A White Paper on Neural Network
Quantization"). This module holds the arithmetic shared by every quantizer:

* :func:`int_range` -- ``(qmin, qmax)`` for a bit width and signedness;
* :func:`scale_zero_point` -- ``(s, z)`` from a real range ``[lo, hi]``;
* :func:`round_nearest` / :func:`round_stochastic` -- the two rounding modes
  (:func:`round_with` picks one by whether a key is given);
* :func:`check_bits`, :func:`check_float`, :func:`check_broadcast` -- the input checks
  every quantizer shares; :func:`compute_dtype` -- the dtype it computes in;
* :func:`pow2` -- power-of-two scales ``2^round(log2 s)``;
* :func:`reduction_axes`, :func:`to_groups`, :func:`from_groups` -- the axes a
  per-tensor / per-channel / per-group scale is shared over.

Non-finite values: range estimation (:func:`minmax`) ignores NaN and +-Inf; quantizers
propagate NaN and saturate +-Inf to the ends of the integer range.

Edge cases: an empty array has the range ``[0, 0]`` (as a slice with no finite value);
ranges up to the float32 limits (``[-3.4e38, 3.4e38]``) give finite scales; float64
arrays (with ``jax_enable_x64``) get float64 ranges and scales, so values beyond the
float32 range are quantized, not taken for +-Inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

#: Smallest scale ever produced: an all-zero (or constant-zero) range would otherwise
#: give ``s = 0`` and ``x / s = NaN``. Same floor as PyTorch's observers.
SCALE_EPS = float(np.finfo(np.float32).eps)

MIN_BITS, MAX_BITS = 1, 8


def check_bits(bits: int, name: str = "bits", allowed: tuple[int, ...] | None = None) -> int:
  """Validates an integer bit width: in ``[1, 8]``, or one of ``allowed`` when given.

  The one bit-width check of jaxq (packing widths pass ``allowed=bitpack.PACK_BITS``).
  ValueError for anything else, a non-integer such as ``2.5`` or ``True`` included: a
  bad value, whatever its type.
  """
  want = (f"one of {', '.join(map(str, allowed))}" if allowed is not None
          else f"an int in [{MIN_BITS}, {MAX_BITS}]")
  if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
    raise ValueError(f"{name} must be {want}, got {bits!r}")
  if allowed is not None and bits not in allowed:
    raise ValueError(f"{name} must be {want}, got {bits}")
  if not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"{name} must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
  return int(bits)


def check_float(x, name: str = "x") -> jax.Array:
  """``x`` as an array; TypeError unless its dtype is floating (bf16, f16, f32, f64)."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array (bfloat16, float16, float32); "
                    f"got dtype {x.dtype}")
  return x


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype quantization arithmetic runs in: float32, or float64 for float64 inputs
  (bf16/f16 are quantized in float32 and cast back)."""
  return jnp.promote_types(dtype, jnp.float32)


def check_broadcast(name: str, value, shape: tuple[int, ...]) -> None:
  """ValueError unless ``value`` broadcasts against ``shape`` without enlarging it (a
  scale, zero point or range end against the array it quantizes)."""
  vshape = tuple(jnp.shape(value))
  shape = tuple(shape)
  if len(vshape) > len(shape) or any(
      v not in (1, s) for v, s in zip(vshape[::-1], shape[::-1])):
    raise ValueError(f"{name} of shape {vshape} must broadcast against the quantized "
                     f"array of shape {shape} without enlarging it")


def int_range(bits: int, signed: bool) -> tuple[int, int]:
  """Returns ``(qmin, qmax)``: ``[-2^(b-1), 2^(b-1)-1]`` signed, ``[0, 2^b-1]`` unsigned."""
  bits = check_bits(bits)
  if signed:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  return 0, 2**bits - 1


def check_symmetric_range(bits: int, signed: bool) -> None:
  """Symmetric signed quantization needs a positive ``qmax``, i.e. ``bits >= 2``."""
  if signed and bits < 2:
    raise ValueError(
        "bits=1 with signed=True and symmetric=True leaves qmax=0; use bits >= 2, "
        "signed=False, or symmetric=False")


def exp2_int(e: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Exact ``2^e`` for integer(-valued) ``e``, built from the float32 exponent bits.

  ``jnp.exp2`` is not exact on integer arguments on every backend (XLA:CPU gives
  ``exp2(-15) = 3.0517593e-05``, not ``2^-15``), which breaks power-of-two scales and
  log2 codes. Here ``2^e`` is exact for ``-149 <= e <= 127`` (subnormals below -126),
  ``0`` below and ``inf`` above, NaN for NaN, then cast to ``dtype``.
  """
  e = jnp.asarray(e)
  nan = None
  if not jnp.issubdtype(e.dtype, jnp.integer):
    nan = jnp.isnan(e)
    e = jnp.where(nan, 0, jnp.round(e))
  e = jnp.clip(e, -150, 128).astype(jnp.int32)
  normal = jnp.left_shift(jnp.clip(e, -126, 127) + 127, 23)
  subnormal = jnp.where(e >= -149, jnp.left_shift(1, jnp.clip(e + 149, 0, 22)), 0)
  out = jax.lax.bitcast_convert_type(jnp.where(e >= -126, normal, subnormal), jnp.float32)
  out = jnp.where(e > 127, jnp.inf, out)
  if nan is not None:
    out = jnp.where(nan, jnp.nan, out)
  return out.astype(dtype)


def floor_scale(scale: jax.Array) -> jax.Array:
  """``scale`` with its magnitude floored at :data:`SCALE_EPS`, in its dtype.

  A scale of 0 (or below ``SCALE_EPS`` in magnitude) would give ``x / s = NaN``; it is
  used as ``SCALE_EPS`` (``-SCALE_EPS`` when negative). A negative scale is a valid,
  mirrored grid (``fq(x; -s) = -fq(-x; s)``), which learned steps (LSQ) can reach in
  training, and is kept. NaN propagates.
  """
  scale = jnp.asarray(scale)
  eps = jnp.asarray(SCALE_EPS, scale.dtype)
  return jnp.where(jnp.abs(scale) < eps, jnp.where(scale < 0, -eps, eps), scale)


def float_dtype(*arrays) -> jnp.dtype:
  """float64 if any of ``arrays`` is a float64 array (``jax_enable_x64``), else float32.

  Python scalars do not count, so ranges and scales stay float32 unless the data is
  float64.
  """
  wide = any(getattr(a, "dtype", None) == np.float64 for a in arrays)
  return jnp.dtype(jnp.float64 if wide and jax.config.jax_enable_x64 else jnp.float32)


def pow2(scale: jax.Array) -> jax.Array:
  """Rounds a positive scale to the nearest power of two: ``2^round(log2 s)`` (exact)."""
  scale = jnp.asarray(scale)
  return exp2_int(jnp.round(jnp.log2(scale.astype(jnp.float32))), scale.dtype)


def scale_zero_point(
    lo: jax.Array,
    hi: jax.Array,
    bits: int,
    *,
    signed: bool,
    symmetric: bool,
    pow2_scale: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Scale and zero point that map the real range ``[lo, hi]`` onto the integer range.

  Symmetric (``z = 0``): signed ``s = max(|lo|, |hi|) / qmax``; unsigned (e.g. after a
  ReLU) ``s = hi / qmax`` with negatives clipped to 0.
  Asymmetric (affine): the range is first widened to contain 0 so that 0 is exactly
  representable, then ``s = (hi - lo) / (qmax - qmin)`` and
  ``z = clip(qmin - round(lo / s), qmin, qmax)``, an integer-valued float.
  ``s`` is floored at :data:`SCALE_EPS`, so zero-range tensors get finite scales. With
  ``pow2_scale`` the scale is rounded to a power of two (before ``z`` is computed).

  Returns float32 arrays (float64 when ``lo`` or ``hi`` is float64) of the broadcast
  shape of ``lo`` and ``hi``. Ranges wider than the largest float (e.g.
  ``[-3.4e38, 3.4e38]`` in float32) still give finite scales.
  """
  qmin, qmax = int_range(bits, signed)
  dtype = float_dtype(lo, hi)
  lo = jnp.asarray(lo, dtype)
  hi = jnp.asarray(hi, dtype)
  if symmetric:
    check_symmetric_range(bits, signed)
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) if signed else jnp.maximum(hi, 0.0)
    scale = jnp.maximum(amax / qmax, SCALE_EPS)
    if pow2_scale:
      scale = pow2(scale)
    return scale, jnp.zeros_like(scale)
  lo = jnp.minimum(lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  levels = qmax - qmin
  width = hi - lo  # overflows for ranges wider than the float's largest value
  scale = jnp.where(jnp.isfinite(width), width / levels, hi / levels - lo / levels)
  scale = jnp.maximum(scale, SCALE_EPS)
  if pow2_scale:
    scale = pow2(scale)
  zero_point = jnp.clip(qmin - jnp.round(lo / scale), qmin, qmax)
  return scale, zero_point


def round_nearest(x: jax.Array) -> jax.Array:
  """Round half to even (IEEE default; ``jnp.round``)."""
  return jnp.round(x)


def round_with(x: jax.Array, key: jax.Array | None) -> jax.Array:
  """:func:`round_nearest` when ``key`` is None, else :func:`round_stochastic`."""
  return round_nearest(x) if key is None else round_stochastic(x, key)


def round_stochastic(x: jax.Array, key: jax.Array) -> jax.Array:
  """Unbiased stochastic rounding: ``floor(x + u)``, ``u ~ U[0, 1)``, so ``E[r(x)] = x``.

  Gupta et al. 2015, "Deep Learning with Limited Numerical Precision". ``u`` is
  :func:`hash_uniform` noise seeded by one draw from ``key``: one fused elementwise pass,
  where ``jax.random.uniform`` over every element costs ~60x an elementwise op on the CPU.
  """
  noise = hash_uniform(seed_from_key(key), jnp.shape(x))
  return jnp.floor(x.astype(jnp.float32) + noise).astype(x.dtype)


_GOLDEN = np.uint32(0x9E3779B9)


def mix32(x: jax.Array) -> jax.Array:
  """Wellons' lowbias32 integer hash: a bijection of uint32 with good avalanche (a
  2-round xorshift-multiply mixer of the family of MurmurHash3's finalizer)."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> 16)


def seed_from_key(key: jax.Array) -> jax.Array:
  """One uint32 seed from a PRNG key (typed or raw ``uint32[2]``)."""
  return jax.random.bits(key, (), jnp.uint32)


def derive_seed(seed: jax.Array, index: int) -> jax.Array:
  """Independent-looking seed number ``index`` from ``seed`` (one per stored tensor)."""
  return mix32(seed.astype(jnp.uint32) + np.uint32((index * 0x9E3779B9 + 1) & 0xFFFFFFFF))


def hash_uniform(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``f32[shape]`` noise in ``[0, 1)`` from a counter-based hash of the flat index.

  ``u_i = (mix32(mix32(i * phi + seed)) >> 8) * 2^-24`` with ``phi`` the 32-bit golden ratio:
  24 uniform bits per element (the f32 mantissa), exactly representable, so ``u < 1``.
  Distinct seeds give (empirically) independent streams; a given ``(seed, i)`` always gives
  the same value, which keeps a forward pass deterministic under remat.
  """
  idx = jax.lax.iota(jnp.uint32, int(np.prod(shape, dtype=np.int64))).reshape(shape)
  x = mix32(mix32(idx * _GOLDEN + jnp.asarray(seed).astype(jnp.uint32)))
  return (x >> 8).astype(jnp.float32) * np.float32(2.0**-24)


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
  """Returns ``axis`` in ``[0, ndim)`` or raises a ValueError naming ``name``."""
  if not -ndim <= axis < ndim:
    raise ValueError(f"{name}={axis} is out of range for an array of rank {ndim}")
  return axis % ndim


def reduction_axes(
    ndim: int, granularity: str, channel_axis: int | Sequence[int] | None
) -> tuple[int, ...]:
  """Axes a scale is shared over: all for "tensor", all but the channel axes for "channel".

  For "group" call :func:`to_groups` first; the group axis (the size-``group_size``
  axis it inserts) is then reduced together with all non-channel axes.
  """
  if granularity == "tensor" or ndim == 0:
    return tuple(range(ndim))
  if channel_axis is None:
    keep = set()
  elif isinstance(channel_axis, int):
    keep = {normalize_axis(channel_axis, ndim, "axis")}
  else:
    keep = {normalize_axis(a, ndim, "axis") for a in channel_axis}
  return tuple(a for a in range(ndim) if a not in keep)


def to_groups(x: jax.Array, group_size: int, group_axis: int) -> jax.Array:
  """Splits ``group_axis`` (length ``n``) into ``(n // group_size, group_size)``.

  The new size-``group_size`` axis sits at ``group_axis + 1``; reduce over it (and over
  the other non-channel axes) to get one scale per group.
  """
  group_axis = normalize_axis(group_axis, x.ndim, "group_axis")
  n = x.shape[group_axis]
  if group_size <= 0 or n % group_size:
    raise ValueError(
        f"group_size={group_size} must divide the length {n} of the grouped axis "
        f"{group_axis} (shape {tuple(x.shape)})")
  shape = x.shape[:group_axis] + (n // group_size, group_size) + x.shape[group_axis + 1:]
  return x.reshape(shape)


def from_groups(xg: jax.Array, group_axis: int) -> jax.Array:
  """Inverse of :func:`to_groups`: merges axes ``group_axis`` and ``group_axis + 1``."""
  group_axis = normalize_axis(group_axis, xg.ndim - 1, "group_axis")
  shape = (xg.shape[:group_axis] + (xg.shape[group_axis] * xg.shape[group_axis + 1],)
           + xg.shape[group_axis + 2:])
  return xg.reshape(shape)


def minmax(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Per-slice ``(min, max)`` over ``axes`` (kept as size-1 dims), in float32 (float64
  for float64 ``x``).

  NaN and +-Inf are ignored; a slice with no finite value, or no value at all (an
  empty ``x``), gives ``(0, 0)``.
  The plain min and max are taken first and the masked reduction runs only when they
  are not finite: on XLA:CPU a pair of masked reductions costs ~100x the plain pair.
  """
  x = jnp.asarray(x)
  x = x.astype(float_dtype(x))
  if x.size == 0:
    red = {a % x.ndim for a in axes}
    zero = jnp.zeros(tuple(1 if a in red else d for a, d in enumerate(x.shape)), x.dtype)
    return zero, zero
  lo = jnp.min(x, axis=axes, keepdims=True)
  hi = jnp.max(x, axis=axes, keepdims=True)
  return jax.lax.cond(
      jnp.all(jnp.isfinite(lo) & jnp.isfinite(hi)),
      lambda: (lo, hi),
      lambda: _finite_minmax(x, axes))


def _finite_minmax(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  finite = jnp.isfinite(x)
  lo = jnp.min(jnp.where(finite, x, jnp.inf), axis=axes, keepdims=True)
  hi = jnp.max(jnp.where(finite, x, -jnp.inf), axis=axes, keepdims=True)
  empty = lo > hi
  return jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)
