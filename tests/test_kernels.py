"""Pallas kernels (interpret mode) vs their jnp references, and both vs numpy formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pallas_kernels as pk
from jaxq import kernels as K

BITS = (1, 2, 4, 8)
TINY = np.float32(pk.TINY)

qp_ref = jax.jit(pk.quantize_pack_ref, static_argnames="bits")
ud_ref = jax.jit(pk.unpack_dequantize_ref, static_argnames="bits")
mm_ref = jax.jit(pk.int8_matmul_ref, static_argnames=("out_dtype", "activation"))
dyn_ref = jax.jit(pk.int8_matmul_dynamic_ref, static_argnames=("out_dtype", "activation"))
i4_ref = jax.jit(pk.int4_matmul_ref, static_argnames=("out_dtype", "activation"))


def _eq(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert u.dtype == v.dtype and u.shape == v.shape
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _rand(shape, seed, dtype=np.float32, scale=1.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(dtype)


def _int8(shape, seed, lo=-128, hi=128):
  return np.random.default_rng(seed).integers(lo, hi, shape).astype(np.int8)


# ---------------------------------------------------------------- numpy versions of Contract 5
def np_quantize(x, bits, noise=None):
  """Contract 5 formulas in numpy float32: returns (codes, lo, scale, pre-floor values)."""
  qmax = np.float32(2**bits - 1)
  lo = x.min(1)
  scale = qmax / np.maximum(x.max(1) - lo, TINY)
  n = np.float32(0.5) if noise is None else noise
  r = (x - lo[:, None]) * scale[:, None] + n
  return np.clip(np.floor(r), 0, qmax).astype(np.int64), lo, scale, r


def np_unpack(packed, bits, s):
  """Element j of a byte occupies bits [j*bits, (j+1)*bits) (little end first)."""
  packed = np.asarray(packed).astype(np.int64)
  q = np.zeros((packed.shape[0], s), np.int64)
  for e in range(s):
    byte, j = divmod(e * bits, 8)
    q[:, e] = (packed[:, byte] >> j) & (2**bits - 1)
  return q


# ---------------------------------------------------------------- quantize_pack / unpack
QP_CASES = [  # (G, S, kwargs): pow2 / odd S, G not a block multiple, the two-pass path
    (37, 40, {}),
    (64, 256, {"block_rows": 16}),
    (5, 24, {"max_row": 8, "block_cols": 8}),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_quantize_pack_kernel_matches_reference(bits, stochastic):
  for i, (g, s, kw) in enumerate(QP_CASES):
    x = jnp.asarray(_rand((g, s), i, scale=3.0))
    noise = jnp.asarray(np.random.default_rng(99 + i).random((g, s), np.float32)) \
        if stochastic else None
    got = pk.quantize_pack(x, bits, noise, interpret=True, **kw)
    _eq(got, qp_ref(x, bits, noise))
    assert got[0].shape == (g, s * bits // 8) and got[0].dtype == jnp.uint8
    if not stochastic:  # ... and the inverse kernel, on the same data (several byte blocks)
      bb = {"block_bytes": 2, "block_rows": 8} if kw else {}
      _eq(pk.unpack_dequantize(*got, bits, interpret=True, **bb), ud_ref(*got, bits))


@pytest.mark.parametrize("bits", BITS)
def test_quantize_pack_contract_numpy(bits):
  g, s = 16, 64
  x = _rand((g, s), bits, scale=2.0)
  noise = np.random.default_rng(7).random((g, s), np.float32)
  for nz in (None, noise):
    packed, lo, scale = qp_ref(jnp.asarray(x), bits, None if nz is None else jnp.asarray(nz))
    q_np, lo_np, scale_np, r = np_quantize(x, bits, nz)
    np.testing.assert_array_equal(np.asarray(lo), lo_np)
    np.testing.assert_array_equal(np.asarray(scale), scale_np)
    q = np_unpack(packed, bits, s)
    # XLA may fuse the multiply-add (FMA); codes may then differ only where r is within
    # rounding of an integer.
    near = np.abs(r - np.round(r)) < 1e-4 * np.maximum(1, np.abs(r))
    np.testing.assert_array_equal(q[~near], q_np[~near])
    assert np.all(np.abs(q - q_np) <= 1)
    # dequantization: q / scale + lo, error within half a step (nearest) / one step (noise)
    deq = np.asarray(ud_ref(packed, lo, scale, bits))
    # (computed as q * (1 / scale) + lo: within 1 ulp of q / scale + lo)
    np.testing.assert_allclose(deq, q.astype(np.float32) / scale_np[:, None] + lo_np[:, None],
                               rtol=0, atol=4e-7 * np.abs(x).max())
    step = 1.0 / scale_np[:, None]
    tol = (0.5 if nz is None else 1.0) * step * (1 + 1e-5) + 1e-6
    assert np.all(np.abs(deq - x) <= tol)


_pack_j = jax.jit(pk.pack_ref, static_argnames="bits")
_unpack_j = jax.jit(pk.unpack_ref, static_argnames="bits")


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from(BITS), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip_property(bits, seed):
  g, nbytes = 3, 5
  s = nbytes * 8 // bits
  q = np.random.default_rng(seed).integers(0, 2**bits, (g, s))
  packed = _pack_j(jnp.asarray(q), bits)
  assert packed.shape == (g, nbytes) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(np_unpack(packed, bits, s), q)
  np.testing.assert_array_equal(_unpack_j(packed, bits), q)


@pytest.mark.parametrize("s", [1, 2, 3, 4, 6, 8, 10, 64])  # plain, 16-bit and 32-bit words
def test_pack_8bit_words_same_bytes(s):
  q = np.random.default_rng(s).integers(0, 256, (5, s))
  q[0, 0], q[-1, -1] = 0, 255
  packed = _pack_j(jnp.asarray(q), 8)
  assert packed.shape == (5, s) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(packed), q)
  np.testing.assert_array_equal(_unpack_j(packed, 8), q)


def test_8bit_compressed_step_keeps_codes_not_floats():
  """Regression: a bare convert(f32 -> u8) in the 8-bit packer was fused by XLA:CPU into the
  backward pass's unpacking, so the float codes (4 bytes each) stayed alive from forward to
  backward and the compiled temp of an 8-bit compressed step exceeded the float step's."""
  from jaxq import act  # pylint: disable=g-import-not-at-top

  def block(p, x):
    return x + jax.nn.gelu(x @ p["w1"]) @ p["w2"]

  k = jax.random.split(jax.random.key(0), 3)
  p = {"w1": jax.random.normal(k[0], (64, 256)) / 8,
       "w2": jax.random.normal(k[1], (256, 64)) / 16}
  x = jax.random.normal(k[2], (1024, 64))

  def temp(fn):
    def loss(ps, x):
      for q in ps:
        x = fn(q, x)
      return jnp.sum(x ** 2)
    c = jax.jit(jax.grad(loss)).lower([p] * 3, x).compile()
    return c.memory_analysis().temp_size_in_bytes

  t_float = temp(block)
  t8 = temp(act.compressed_vjp(block, bits=8, compress_args=(1,)))
  assert t8 < 0.95 * t_float, (t8, t_float)


def test_stochastic_rounding_is_unbiased():
  x = jnp.asarray(_rand((4, 256), 3))
  keys = jax.random.split(jax.random.PRNGKey(0), 400)

  @jax.jit
  def mean_deq(keys):
    def one(k):
      p, lo, sc = K.quantize_pack(x, 2, jax.random.uniform(k, x.shape), backend="xla")
      return K.unpack_dequantize(p, lo, sc, 2, backend="xla")
    return jax.vmap(one)(keys).mean(0)

  step = float(1.0 / jnp.min(qp_ref(x, 2)[2]))
  err = np.asarray(mean_deq(keys) - x)
  assert np.abs(err).max() < 0.2 * step  # nearest rounding has bias up to 0.5 step
  assert abs(err.mean()) < 0.02 * step


@pytest.mark.parametrize("bits", BITS)
def test_constant_rows(bits):
  x = np.stack([np.full(16, 3.25, np.float32), np.zeros(16, np.float32),
                np.full(16, -1e30, np.float32), _rand(16, 1)])
  for backend in ("xla", "interpret"):
    packed, lo, scale = K.quantize_pack(jnp.asarray(x), bits, backend=backend)
    assert np.all(np.isfinite(np.asarray(scale)))
    np.testing.assert_array_equal(np_unpack(packed, bits, 16)[:3], 0)
    deq = np.asarray(K.unpack_dequantize(packed, lo, scale, bits, backend=backend))
    np.testing.assert_array_equal(deq[:3], x[:3])


def test_quantize_pack_bad_arguments():
  x = jnp.ones((4, 16))
  for bad in (0, 3, 16, 8.0, True, None):
    with pytest.raises(ValueError, match="bits"):
      pk.quantize_pack(x, bad, interpret=True)
    with pytest.raises(ValueError, match="bits"):
      K.quantize_pack(x, bad, backend="xla")
    with pytest.raises(ValueError, match="bits"):
      K.unpack_dequantize(jnp.zeros((4, 2), jnp.uint8), jnp.zeros(4), jnp.ones(4), bad)
  with pytest.raises(ValueError, match="multiple of 8 / bits"):
    K.quantize_pack(jnp.ones((4, 6)), 1)
  with pytest.raises(ValueError, match="noise"):
    K.quantize_pack(x, 4, jnp.ones((4, 8)))
  with pytest.raises(ValueError, match="rank 2"):
    K.quantize_pack(jnp.ones(16), 4)
  with pytest.raises(TypeError, match="packed"):
    K.unpack_dequantize(jnp.zeros((4, 2), jnp.int8), jnp.zeros(4), jnp.ones(4), 4)


# ---------------------------------------------------------------- int8 matmul family
MM_SHAPES = [  # (M, K, N, blocks): non-multiples of the blocks, several K steps
    (33, 100, 45, {"block_m": 16, "block_n": 32, "block_k": 32}),
    (1, 64, 16, {}),
    (128, 256, 64, {"block_k": 64}),
]
OUT = (jnp.float32, jnp.bfloat16, jnp.float16)


@pytest.mark.parametrize("case", range(len(MM_SHAPES)))
def test_int8_matmul_kernel_matches_reference(case):
  m, k, n, blocks = MM_SHAPES[case]
  a, b = jnp.asarray(_int8((m, k), case)), jnp.asarray(_int8((k, n), case + 10))
  sa, sb = jnp.asarray(_rand(m, 1) ** 2), jnp.asarray(_rand(n, 2) ** 2)
  bias = jnp.asarray(_rand(n, 3))
  for od, act, bi in [(OUT[case], None, bias), (jnp.float32, "relu", None),
                      (jnp.bfloat16, "gelu", bias), (jnp.float16, "silu", bias)]:
    got = pk.int8_matmul(a, b, sa, sb, bi, od, activation=act, interpret=True, **blocks)
    assert got.dtype == od and got.shape == (m, n)
    _eq(got, mm_ref(a, b, sa, sb, bi, od, activation=act))
  want = np.asarray(a, np.int64) @ np.asarray(b, np.int64)
  np.testing.assert_array_equal(
      pk.int8_matmul(a, b, None, None, out_dtype=jnp.int32, interpret=True, **blocks), want)
  # epilogue formula against numpy
  y = (want.astype(np.float32) * np.asarray(sa)[:, None] * np.asarray(sb)[None, :]
       + np.asarray(bias)[None, :])
  np.testing.assert_allclose(np.asarray(mm_ref(a, b, sa, sb, bias)), y, rtol=1e-6, atol=1e-4)


def test_int8_matmul_exact_int32_accumulation():
  """K = 65536: |sums| reach 2^30, far past f32's 2^24 exact range; rows/cols of -128."""
  m, k, n = 4, 65536, 16
  a, b = _int8((m, k), 0), _int8((k, n), 1)
  a[0] = -128
  b[:, 0] = -128
  b[:, 1] = 127
  want = a.astype(np.int64) @ b.astype(np.int64)
  assert want[0, 0] == 2**30 and np.abs(want).max() < 2**31
  a, b = jnp.asarray(a), jnp.asarray(b)
  for fn in (functools.partial(pk.int8_matmul, interpret=True, block_k=16384), mm_ref):
    np.testing.assert_array_equal(fn(a, b, None, None, out_dtype=jnp.int32), want)
    ones_m, ones_n = jnp.ones(m), jnp.ones(n)
    np.testing.assert_array_equal(fn(a, b, ones_m, ones_n), want.astype(np.float32))
  np.testing.assert_array_equal(
      K.int8_matmul(a, b, None, None, out_dtype=jnp.int32, backend="xla"), want)


def test_int8_matmul_dynamic():
  m, k, n = 20, 96, 40
  x = _rand((m, k), 5, scale=4.0)
  x[3] = 0.0  # zero row -> output is bias
  b, sb, bias = jnp.asarray(_int8((k, n), 6)), jnp.asarray(_rand(n, 7) ** 2), \
      jnp.asarray(_rand(n, 8))
  for dt, od, act in ((np.float32, jnp.float32, None), (jnp.bfloat16, jnp.float16, "relu")):
    xd = jnp.asarray(x).astype(dt)
    got = pk.int8_matmul_dynamic(xd, b, sb, bias, od, activation=act, interpret=True,
                                 block_m=8, block_n=16, block_k=32)
    _eq(got, dyn_ref(xd, b, sb, bias, od, activation=act))
  # per-token symmetric quantization against numpy (round half to even)
  a_q, a_scale = pk.quantize_rows_ref(jnp.asarray(x))
  s_np = np.maximum(np.abs(x).max(1), TINY) / np.float32(127)
  np.testing.assert_array_equal(np.asarray(a_scale), s_np)
  np.testing.assert_array_equal(np.asarray(a_q), np.clip(np.round(x / s_np[:, None]), -127, 127))
  y = np.asarray(dyn_ref(jnp.asarray(x), b, sb, bias))
  np.testing.assert_array_equal(y[3], np.asarray(bias))
  np.testing.assert_allclose(y, x @ (np.asarray(b, np.float32) * np.asarray(sb)) + bias,
                             rtol=0.05, atol=0.05 * np.abs(y).max())


def test_round_half_even():
  v = jnp.asarray([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.49999, -3.50001, 1e8 + 1, 0.0],
                  jnp.float32)
  _eq(jax.jit(pk._common.round_half_even)(v), jnp.round(v))


def test_int4_pack_layout_and_matmul():
  m, k, n = 24, 160, 48
  w = np.random.default_rng(1).integers(-8, 8, (k, n)).astype(np.int8)
  p = np.asarray(pk.pack_int4(jnp.asarray(w)))
  assert p.dtype == np.uint8 and p.shape == (k // 2, n)
  w64 = w.astype(np.int64)
  np.testing.assert_array_equal(p, ((w64[0::2] & 15) | ((w64[1::2] & 15) << 4)).astype(np.uint8))
  np.testing.assert_array_equal(pk.unpack_int4(jnp.asarray(p)), w)
  np.testing.assert_array_equal(pk.unpack_int4(jnp.asarray(p.view(np.int8))), w)
  with pytest.raises(ValueError, match=r"\[-8, 7\]"):
    pk.pack_int4(jnp.asarray(w) * 2)
  a, sa = jnp.asarray(_int8((m, k), 2)), jnp.asarray(_rand(m, 3) ** 2)
  sb, bias = jnp.asarray(_rand(n, 4) ** 2), jnp.asarray(_rand(n, 5))
  pj = jnp.asarray(p)
  for od, act in ((jnp.float32, None), (jnp.float16, "gelu")):
    got = pk.int4_matmul(a, pj, sa, sb, bias, od, activation=act, interpret=True,
                         block_m=16, block_n=32, block_k=64)
    _eq(got, i4_ref(a, pj, sa, sb, bias, od, activation=act))
    _eq(got, mm_ref(a, jnp.asarray(w), sa, sb, bias, od, activation=act))
  np.testing.assert_array_equal(
      pk.int4_matmul(a, pj, None, None, out_dtype=jnp.int32, interpret=True),
      np.asarray(a, np.int64) @ w.astype(np.int64))


def test_matmul_bad_arguments():
  a, b = jnp.zeros((4, 8), jnp.int8), jnp.zeros((8, 16), jnp.int8)
  sa, sb = jnp.ones(4), jnp.ones(16)
  with pytest.raises(ValueError, match="out_dtype"):
    K.int8_matmul(a, b, sa, sb, out_dtype=jnp.int8)
  with pytest.raises(ValueError, match="activation"):
    K.int8_matmul(a, b, sa, sb, activation="tanh")
  with pytest.raises(ValueError, match="contraction"):
    K.int8_matmul(a, b[:4], sa, sb)
  with pytest.raises(ValueError, match="b_scale"):
    pk.int8_matmul(a, b, sa, jnp.ones(3), interpret=True)
  with pytest.raises(TypeError, match="a_q"):
    K.int8_matmul(a.astype(jnp.int32), b, sa, sb)
  with pytest.raises(ValueError, match="int32"):
    K.int8_matmul(a, b, sa, sb, out_dtype=jnp.int32)


# ---------------------------------------------------------------- dispatcher
def test_backend_resolution(monkeypatch):
  monkeypatch.delenv(K.ENV_VAR, raising=False)
  assert K.resolve_backend() == ("pallas" if jax.default_backend() == "gpu" else "xla")
  for b in ("pallas", "interpret", "xla"):
    assert K.resolve_backend(b) == b
  monkeypatch.setenv(K.ENV_VAR, "interpret")
  assert K.resolve_backend() == "interpret" and K.resolve_backend("xla") == "xla"
  monkeypatch.setenv(K.ENV_VAR, "cuda")
  with pytest.raises(ValueError, match="backend must be one of"):
    K.resolve_backend()
  with pytest.raises(ValueError, match="'auto', 'pallas', 'interpret', 'xla'"):
    K.int8_matmul(jnp.zeros((2, 2), jnp.int8), jnp.zeros((2, 2), jnp.int8), jnp.ones(2),
                  jnp.ones(2), backend="gpu")


def test_dispatch_backends_agree_under_jit():
  # One jit per stage: inside a single program XLA may re-associate the quantize/dequantize
  # arithmetic across the two calls (e.g. 1 / (15 / d)), which is 1 ulp, not a kernel bug.
  x = jnp.asarray(_rand((12, 32), 0))
  a, b = jnp.asarray(_int8((8, 64), 1)), jnp.asarray(_int8((64, 16), 2))
  sa, sb = jnp.ones(8), jnp.asarray(_rand(16, 3) ** 2)
  w4 = K.pack_int4(jnp.asarray(_int8((64, 16), 4, -8, 8)))
  xf = jnp.asarray(_rand((8, 64), 5))

  qp = jax.jit(lambda x, backend: K.quantize_pack(x, 4, backend=backend),
               static_argnames="backend")

  @functools.partial(jax.jit, static_argnames="backend")
  def rest(p, backend):
    return (K.unpack_dequantize(*p, 4, backend=backend),
            K.int8_matmul(a, b, sa, sb, backend=backend, activation="relu"),
            K.int8_matmul_dynamic(xf, b, sb, backend=backend),
            K.int4_matmul(a, w4, sa, sb, out_dtype=jnp.bfloat16, backend=backend))

  p = qp(x, "xla")
  _eq(qp(x, "interpret"), p)
  _eq(rest(p, "interpret"), rest(p, "xla"))
