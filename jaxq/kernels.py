"""Kernel dispatch: Pallas (Triton) kernels on GPU, XLA reference implementations elsewhere.

Every entry point takes ``backend``:

* ``None`` / ``"auto"``: Pallas on GPU, XLA elsewhere (default; the environment variable
  ``JAXQ_KERNEL_BACKEND`` overrides it);
* ``"pallas"``: the Pallas kernel, compiled (GPU);
* ``"interpret"``: the Pallas kernel run by the Pallas interpreter (any device; for testing);
* ``"xla"``: the pure-jnp reference, which gives identical results and is fast on the CPU.

Semantics are DESIGN.md's Contract 5; see :mod:`pallas_kernels` for the math of each kernel.
All entry points are jit-able (``bits``, ``out_dtype``, ``activation`` and ``backend`` static).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

import pallas_kernels as _pk

BACKENDS = ("auto", "pallas", "interpret", "xla")
ENV_VAR = "JAXQ_KERNEL_BACKEND"

__all__ = [
    "BACKENDS", "resolve_backend", "quantize_pack", "unpack_dequantize", "int8_matmul",
    "int8_matmul_dynamic", "int4_matmul", "int4_matmul_grouped", "pack_int4", "unpack_int4",
    "TINY", "epilogue",
]

#: Floor of ``int8_matmul_dynamic``'s per-token absmax (``a_scale = max(amax, TINY) / 127``).
TINY = _pk.TINY
#: The matmul kernels' dequant epilogue ``act(acc * a_scale * b_scale + bias)``, for code
#: that reduces int32 accumulators itself (:func:`jaxq.sharding.int8_matmul_sharded`).
epilogue = _pk.epilogue
pack_int4 = _pk.pack_int4
unpack_int4 = _pk.unpack_int4


def resolve_backend(backend: str | None = None) -> str:
  """Resolve ``backend`` (None -> ``$JAXQ_KERNEL_BACKEND`` or "auto") to pallas/interpret/xla."""
  if backend is None:
    backend = os.environ.get(ENV_VAR) or "auto"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} (or None), got {backend!r}")
  if backend == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return backend


_xla_quantize_pack = jax.jit(_pk.quantize_pack_ref, static_argnames=("bits",))
_xla_unpack_dequantize = jax.jit(_pk.unpack_dequantize_ref, static_argnames=("bits",))
_xla_int8_matmul = jax.jit(_pk.int8_matmul_ref, static_argnames=("out_dtype", "activation"))
_xla_int8_matmul_dynamic = jax.jit(_pk.int8_matmul_dynamic_ref,
                                   static_argnames=("out_dtype", "activation"))
_xla_int4_matmul = jax.jit(_pk.int4_matmul_ref, static_argnames=("out_dtype", "activation"))
_xla_int4_matmul_grouped = jax.jit(_pk.int4_matmul_grouped_ref,
                                   static_argnames=("group_size", "out_dtype", "activation"))


def _pick(xla_fn, pallas_fn, backend):
  b = resolve_backend(backend)
  if b == "xla":
    return xla_fn
  return functools.partial(pallas_fn, interpret=(b == "interpret"))


def quantize_pack(x, bits: int, noise=None, *, backend: str | None = None):
  """Per-row min/scale quantization to ``bits`` in {1, 2, 4, 8} with little-end-first packing.

  ``x: f32[G, S]`` -> ``(packed uint8[G, S*bits/8], lo f32[G], scale f32[G])`` with
  ``lo = min(x, 1)``, ``scale = (2^bits - 1) / max(max(x, 1) - lo, TINY)``,
  ``q = clip(floor((x - lo) * scale + noise), 0, 2^bits - 1)``; ``noise`` (uniform [0, 1),
  ``f32[G, S]``) gives stochastic rounding, None rounds to nearest (noise 0.5).
  """
  return _pick(_xla_quantize_pack, _pk.quantize_pack, backend)(x, bits, noise)


def unpack_dequantize(packed, lo, scale, bits: int, *, backend: str | None = None):
  """Inverse of :func:`quantize_pack`: ``f32[G, S] = q / scale[:, None] + lo[:, None]``."""
  return _pick(_xla_unpack_dequantize, _pk.unpack_dequantize, backend)(packed, lo, scale, bits)


def int8_matmul(a_q, b_q, a_scale, b_scale, bias=None, out_dtype=jnp.float32, *,
                activation: str | None = None, backend: str | None = None):
  """``act((a_q @ b_q in int32) * a_scale[:, None] * b_scale[None, :] + bias)`` as out_dtype.

  ``a_q: int8[M, K]``, ``b_q: int8[K, N]``, ``a_scale: f32[M]``, ``b_scale: f32[N]``,
  ``bias: f32[N]`` or None; ``out_dtype`` float32/bfloat16/float16 (int32: raw accumulator,
  scales/bias None); ``activation`` None, "relu", "gelu" (tanh form) or "silu".
  """
  fn = _pick(_xla_int8_matmul, _pk.int8_matmul, backend)
  return fn(a_q, b_q, a_scale, b_scale, bias, out_dtype, activation=activation)


def int8_matmul_dynamic(x, b_q, b_scale, bias=None, out_dtype=jnp.float32, *,
                        activation: str | None = None, backend: str | None = None):
  """W8A8 with per-token symmetric int8 quantization of float ``x: [M, K]`` fused in.

  ``a_scale = max(|x|, 1) / 127``, ``a_q = clip(round(x / a_scale), -127, 127)``, then
  :func:`int8_matmul`.
  """
  fn = _pick(_xla_int8_matmul_dynamic, _pk.int8_matmul_dynamic, backend)
  return fn(x, b_q, b_scale, bias, out_dtype, activation=activation)


def int4_matmul(a_q, b_packed, a_scale, b_scale, bias=None, out_dtype=jnp.float32, *,
                activation: str | None = None, backend: str | None = None):
  """W4A8: ``int8[M, K]`` x int4 weights packed by :func:`pack_int4` (``uint8[K/2, N]``, two
  signed nibbles per byte along K, low nibble = even k), exact int32 accumulation, then the
  :func:`int8_matmul` epilogue."""
  fn = _pick(_xla_int4_matmul, _pk.int4_matmul, backend)
  return fn(a_q, b_packed, a_scale, b_scale, bias, out_dtype, activation=activation)


def int4_matmul_grouped(a, b_packed, b_scale, a_scale=None, bias=None, out_dtype=jnp.float32,
                        *, group_size: int, activation: str | None = None,
                        backend: str | None = None):
  """Int4 weights packed by :func:`pack_int4` (``uint8[K/2, N]``) with one scale per
  ``group_size`` rows and column (``b_scale: f32[K/group_size, N]``), times ``int8[M, K]``
  activations (``a_scale: f32[M]``; exact int32 per group) or float ``[M, K]`` ones
  (``a_scale`` None: weight-only, dequantized in the kernel)::

      out = act(a_scale[:, None] * sum_j (a[:, G_j] @ w[G_j]) * b_scale[j] + bias)
  """
  fn = _pick(_xla_int4_matmul_grouped, _pk.int4_matmul_grouped, backend)
  return fn(a, b_packed, b_scale, a_scale, bias, out_dtype, group_size=group_size,
            activation=activation)
