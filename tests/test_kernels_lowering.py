"""Every Pallas kernel lowers for CUDA through the Triton backend, on a CPU-only machine."""

import functools

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk

TRITON_CALL = "__gpu$xla.gpu.triton"
S = jax.ShapeDtypeStruct
f32, i8, u8 = jnp.float32, jnp.int8, jnp.uint8


def _cuda_lowering_unavailable():
  try:
    jax.jit(lambda x: x + 1).trace(S((8,), f32)).lower(lowering_platforms=("cuda",))
  except Exception as e:  # pragma: no cover - depends on the installed jaxlib
    return f"this jaxlib cannot lower for cuda: {type(e).__name__}: {e}"
  return None


_REASON = _cuda_lowering_unavailable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _lower_text(fn, *avals):
  return jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


def _cases():
  for bits in (1, 2, 4, 8):
    yield f"quantize_pack-{bits}", functools.partial(pk.quantize_pack, bits=bits), \
        (S((100, 256), f32),)
    yield f"quantize_pack-noise-{bits}", \
        lambda x, n, bits=bits: pk.quantize_pack(x, bits, n), (S((100, 96), f32),) * 2
    yield f"quantize_pack-two-pass-{bits}", \
        functools.partial(pk.quantize_pack, bits=bits, max_row=64), (S((10, 256), f32),)
    yield f"unpack_dequantize-{bits}", functools.partial(pk.unpack_dequantize, bits=bits), \
        (S((100, 32 * bits), u8), S((100,), f32), S((100,), f32))
  a, b, sa, sb = S((200, 512), i8), S((512, 384), i8), S((200,), f32), S((384,), f32)
  for od, act in ((f32, None), (jnp.bfloat16, "gelu"), (jnp.float16, "relu"),
                  (f32, "silu")):
    yield f"int8_matmul-{jnp.dtype(od).name}-{act}", \
        lambda a, b, sa, sb, bias, od=od, act=act: pk.int8_matmul(
            a, b, sa, sb, bias, od, activation=act), (a, b, sa, sb, sb)
  yield "int8_matmul-decode", pk.int8_matmul, (S((1, 512), i8), b, S((1,), f32), sb)
  yield "int8_matmul-int32", lambda a, b: pk.int8_matmul(
      a, b, None, None, out_dtype=jnp.int32), (a, b)
  yield "int8_matmul_dynamic", lambda x, b, sb: pk.int8_matmul_dynamic(
      x, b, sb, out_dtype=jnp.bfloat16, activation="gelu"), (S((200, 512), jnp.bfloat16), b, sb)
  yield "int4_matmul", pk.int4_matmul, (a, S((256, 384), u8), sa, sb, sb)
  yield "int4_matmul-decode", pk.int4_matmul, (S((4, 512), i8), S((256, 384), u8),
                                               S((4,), f32), sb)
  gs = S((16, 384), f32)
  yield "int4_matmul_grouped-w4a8", lambda a, b, s, sa: pk.int4_matmul_grouped(
      a, b, s, sa, group_size=32), (a, S((256, 384), u8), gs, sa)
  yield "int4_matmul_grouped-bf16", lambda x, b, s, bias: pk.int4_matmul_grouped(
      x, b, s, None, bias, jnp.bfloat16, group_size=32, activation="gelu"), \
      (S((4, 512), jnp.bfloat16), S((256, 384), u8), gs, sb)


CASES = list(_cases())


@pytest.mark.parametrize("name,fn,avals", CASES, ids=[c[0] for c in CASES])
def test_lowers_to_triton(name, fn, avals):
  text = _lower_text(fn, *avals)
  assert TRITON_CALL in text, f"{name}: no Triton custom call in the CUDA lowering"
