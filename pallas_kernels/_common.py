"""Shared helpers for the Pallas kernels: validation, padding, block sizing, Triton params,
and the ``pallas_call`` and output tile of the matmul family.

``pallas_kernels`` imports nothing from ``jaxq`` (the kernels stand alone), so its width
check :func:`check_bits` mirrors ``jaxq.bitpack.check_pack_bits`` rather than calling it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax.experimental import pallas as pl

try:  # Triton compiler params select Pallas' Triton backend on GPU (the default is Mosaic GPU).
  from jax.experimental.pallas import triton as plt
except ImportError:  # pragma: no cover - jax builds without the Triton module
  plt = None

#: ``lax.dot_general`` dimension numbers of a plain (M, K) x (K, N) matmul.
MATMUL_DIMS = (((1,), (0,)), ((), ()))

#: Lower bound of a group's range in ``quantize_pack``. The contract writes
#: ``max(max - lo, tiny)``; ``tiny`` must keep ``(2^bits - 1) / tiny`` finite in f32 for every
#: ``bits <= 8`` (``finfo(f32).tiny`` does not: ``255 / 1.18e-38`` overflows), so a constant
#: row gets a large finite scale, all-zero codes and dequantizes exactly to its value.
TINY = 1e-30

VALID_BITS = (1, 2, 4, 8)
ACTIVATIONS = (None, "relu", "gelu", "silu")


def check_bits(bits) -> int:
  if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
    raise ValueError(f"bits must be one of {VALID_BITS}, got {bits!r}")
  return bits


def check_activation(activation):
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
  return activation


def check_out_dtype(out_dtype, allowed=(jnp.float32, jnp.bfloat16, jnp.float16)):
  dt = jnp.dtype(out_dtype)
  if dt not in [jnp.dtype(a) for a in allowed]:
    raise ValueError(
        f"out_dtype must be one of {[jnp.dtype(a).name for a in allowed]}, got {dt.name}")
  return dt


def check_rank(name, x, rank):
  if x.ndim != rank:
    raise ValueError(f"{name} must have rank {rank}, got shape {x.shape}")


def check_dtype(name, x, dtypes):
  if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in dtypes]:
    raise TypeError(
        f"{name} must have dtype in {[jnp.dtype(d).name for d in dtypes]}, got {x.dtype}")


def apply_activation(y, activation):
  """Epilogue activation; formulas chosen to lower on Triton (tanh-GELU, logistic SiLU)."""
  if activation is None:
    return y
  if activation == "relu":
    return jnp.maximum(y, 0.0)
  if activation == "gelu":
    return jax.nn.gelu(y, approximate=True)
  if activation == "silu":
    return y / (1.0 + jnp.exp(-y))
  raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def round_half_even(v):
  """``jnp.round`` (half to even) built from floor, so it also lowers on Triton."""
  r = jnp.floor(v)
  d = v - r  # exact for floats
  odd = (r - 2.0 * jnp.floor(r * 0.5)) == 1.0
  up = (d > 0.5) | ((d == 0.5) & odd)
  return jnp.where(up, r + 1.0, r)


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def pad_axis(x, axis: int, size: int, mode: str = "constant"):
  """Pad ``x`` along ``axis`` up to ``size`` (no-op when already that size)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, mode=mode)


@functools.lru_cache(maxsize=None)
def triton_params(num_warps: int = 4, num_stages: int = 2):
  """Compiler params that select the Pallas Triton backend on GPU (not Mosaic GPU)."""
  if plt is None:  # pragma: no cover
    return None
  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def epilogue(acc, a_scale, b_scale, bias, activation, out_dtype):
  """Dequant epilogue shared by kernels and references: ``act(acc * sa * sb + bias)``."""
  y = acc.astype(jnp.float32) * a_scale[:, None] * b_scale[None, :]
  if bias is not None:
    y = y + bias[None, :]
  return apply_activation(y, activation).astype(out_dtype)


def matmul_blocks(m: int, n: int, k: int, interpret: bool, k_min: int = 32):
  """Default (bm, bn, bk, num_warps, num_stages) for an [m, k] x [k, n] int8 matmul.

  GPU: small M (decode) is bandwidth bound on B, so narrow bm and wide bk keep many programs
  streaming B; large M uses 128x128 tiles (int32 accumulator in registers, 8 warps).
  Interpret mode: few, large blocks (each interpreted grid step copies the operands).
  """
  if interpret:
    return (min(next_pow2(m), 512), min(next_pow2(n), 512), max(k_min, min(next_pow2(k), 512)),
            4, 1)
  if m <= 64:
    return max(16, next_pow2(m)), 64, max(k_min, min(next_pow2(k), 256)), 4, 4
  return 128, 128, max(k_min, min(next_pow2(k), 64)), 8, 3


def store_tile(o_ref, acc, refs, has_bias: bool, activation, out_dtype):
  """Writes one int32 accumulator tile: raw when ``refs`` is empty (``out_dtype=int32``),
  else :func:`epilogue` with ``refs = (a_scale, b_scale[, bias])``."""
  if not refs:
    o_ref[...] = acc
    return
  bias = refs[2][...] if has_bias else None
  o_ref[...] = epilogue(acc, refs[0][...], refs[1][...], bias, activation, out_dtype)


def matmul_call(kernel, a, b, row_vecs, col_vecs, out_dtype, *, m, n, bm, bn, bk, warps,
                stages, interpret, name, b_like=(), **kernel_kw):
  """The ``pallas_call`` of the matmul family, on a ``(M / bm, N / bn)`` grid.

  ``a: [Mp, Kp]`` and ``b: [Kb, Np]`` are already padded to block multiples; ``b_like``
  (``[R, Np]`` each, e.g. per-group scales) are blocked like ``b``'s columns; ``row_vecs``
  (``[M]`` each) and ``col_vecs`` (``[N]`` each, None entries dropped) are padded here.
  The kernel receives ``(a_ref, b_ref, *b_like_refs, *row_refs, *col_refs, o_ref)`` and
  ``nk = Kp // bk``, ``bk``, ``out_dtype`` and ``kernel_kw``; ``a``/``b`` blocks span the
  whole K extent and the kernel loops over it in ``bk`` slices. Returns ``out[:m, :n]``.
  """
  mp, kp = a.shape
  kb, np_ = b.shape
  col_vecs = [v for v in col_vecs if v is not None]
  args = [a, b, *b_like]
  in_specs = [pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
              pl.BlockSpec((kb, bn), lambda i, j: (0, j))]
  in_specs += [pl.BlockSpec((v.shape[0], bn), lambda i, j: (0, j)) for v in b_like]
  for v in row_vecs:
    args.append(pad_axis(v.astype(jnp.float32), 0, mp))
    in_specs.append(pl.BlockSpec((bm,), lambda i, j: (i,)))
  for v in col_vecs:
    args.append(pad_axis(v.astype(jnp.float32), 0, np_))
    in_specs.append(pl.BlockSpec((bn,), lambda i, j: (j,)))
  out = pl.pallas_call(
      functools.partial(kernel, nk=kp // bk, bk=bk, out_dtype=out_dtype, **kernel_kw),
      grid=(mp // bm, np_ // bn),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      interpret=interpret,
      compiler_params=triton_params(num_warps=warps, num_stages=stages),
      name=name,
  )(*args)
  return out[:m, :n]
