"""Tests of jaxq.estimators against numpy references (float64 unless stated)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import estimators as E
from jaxq import numerics

F32 = np.float32


# ----------------------------------------------------------------------- references


def _v32(x, s):
  """``x / s`` as the contract computes it: one IEEE float32 division."""
  return (np.asarray(x, F32) / np.asarray(s, F32)).astype(np.float64)


def fq_ref(x, s, z, qmin, qmax, r=None):
  """Forward of the affine fake quant; ``r`` overrides round(x / s) (stochastic)."""
  v = _v32(x, s)
  r = np.round(v) if r is None else r
  s, z = np.asarray(s, np.float64), np.asarray(z, np.float64)
  return (np.clip(r + z, qmin, qmax) - z) * s


def lsq_grad_ref(x, s, z, qmin, qmax, g, r=None):
  """Element-wise (dx, ds, dz) of the LSQ/LSQ+ contract, without grad_scale."""
  v = _v32(x, s)
  r = np.round(v) if r is None else r
  z = np.broadcast_to(np.asarray(z, np.float64), v.shape)
  s = np.broadcast_to(np.asarray(s, np.float64), v.shape)
  q = r + z
  below, above = q < qmin, q > qmax
  inside = (q >= qmin) & (q <= qmax)
  ds = np.where(below, qmin - z, np.where(above, qmax - z, r - v))
  dz = np.where(below | above, -s, 0.0)
  return g * inside, g * ds, g * dz


def _sum_to(a, shape):
  a = np.asarray(a)
  while a.ndim > len(shape):
    a = a.sum(0)
  axes = tuple(i for i, d in enumerate(shape) if d == 1 and a.shape[i] != 1)
  return a.sum(axes, keepdims=True).reshape(shape)


def _rand(shape, seed=0, scale=4.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(F32)


RANGES = [(-128, 127, 0), (0, 255, 0), (0, 255, 37), (-8, 7, 0), (0, 15, 3), (-2, 1, 0)]

fq_jit = jax.jit(E.fake_quant, static_argnums=(3, 4))


def _grads(fn, x, s, z, g):
  """(dx, ds, dz) of ``sum(fn(x, s, z) * g)``."""
  return jax.jit(jax.grad(lambda x, s, z, g: jnp.sum(fn(x, s, z) * g), argnums=(0, 1, 2)))(
      x, s, z, g)


# ----------------------------------------------------------------------- fake_quant forward


@pytest.mark.parametrize("qmin,qmax,z", RANGES)
def test_fake_quant_per_tensor_matches_reference(qmin, qmax, z):
  x = _rand((64, 9), seed=qmax)
  s = F32(0.13)
  out = fq_jit(jnp.asarray(x), s, z, qmin, qmax)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, fq_ref(x, s, z, qmin, qmax), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_fake_quant_per_channel(axis):
  x = _rand((3, 5, 7), seed=axis)
  shape = [1, 1, 1]
  shape[axis] = x.shape[axis]
  rng = np.random.default_rng(axis)
  s = rng.uniform(0.05, 0.5, size=shape).astype(F32)
  z = rng.integers(-5, 5, size=shape).astype(F32)
  out = E.fake_quant(x, s, z, -16, 15)
  np.testing.assert_allclose(out, fq_ref(x, s, z, -16, 15), rtol=1e-6, atol=1e-7)


def test_fake_quant_per_group():
  x = jnp.asarray(_rand((12, 6), seed=4))
  xg = numerics.to_groups(x, 4, 0)  # (3, 4, 6): one scale per group of 4 rows, per column
  lo, hi = numerics.minmax(xg, (1,))
  s, z = numerics.scale_zero_point(lo, hi, 4, signed=True, symmetric=True)
  assert s.shape == (3, 1, 6)
  out = numerics.from_groups(E.fake_quant(xg, s, z, -8, 7), 0)
  ref = numerics.from_groups(jnp.asarray(fq_ref(xg, s, z, -8, 7), jnp.float32), 0)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
  # Within half a step of x everywhere: the per-group range covers every element.
  err = np.abs(xg - E.fake_quant(xg, s, z, -8, 7))
  assert np.all(err <= np.asarray(s) / 2 + 1e-6)


def test_fake_quant_round_half_to_even():
  s = F32(0.25)  # a power of two: x / s is exact
  halves = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 126.5, -127.5], F32)
  out = E.fake_quant(halves * s, s, 0, -128, 127)
  np.testing.assert_array_equal(out / s, [-2, -2, 0, 0, 2, 2, 4, 126, -128])
  out = E.fake_quant(halves * s, s, 1, -128, 127)  # z shifts codes, not the tie
  np.testing.assert_array_equal(out / s, [-2, -2, 0, 0, 2, 2, 4, 126, -128])


def test_fake_quant_far_outside_and_non_finite():
  x = jnp.array([1e30, -1e30, 1e6, -1e6, jnp.inf, -jnp.inf, jnp.nan, 0.0], jnp.float32)
  out = E.fake_quant(x, 0.5, 3, 0, 255)
  np.testing.assert_array_equal(out[:6], [126.0, -1.5, 126.0, -1.5, 126.0, -1.5])
  assert np.isnan(out[6]) and out[7] == 0.0
  dx = jax.grad(lambda x: jnp.sum(E.fake_quant(x, 0.5, 3, 0, 255)))(x)
  np.testing.assert_array_equal(dx, [0, 0, 0, 0, 0, 0, 0, 1])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_fake_quant_keeps_dtype(dtype):
  x = jnp.asarray(_rand((4, 6), seed=7), dtype)
  s = jnp.full((1, 6), 0.3, dtype)
  for fn in (E.fake_quant, E.lsq_fake_quant):
    out = fn(x, s, 0, -8, 7)
    assert out.dtype == dtype and out.shape == x.shape
    ref = fq_ref(np.asarray(x.astype(jnp.float32)), np.asarray(s.astype(jnp.float32)), 0,
                 -8, 7)
    np.testing.assert_array_equal(out, jnp.asarray(ref, jnp.float32).astype(dtype))
    dx, ds, dz = _grads(lambda x, s, z: fn(x, s, z, -8, 7), x, s, jnp.zeros((), dtype),
                        jnp.ones_like(x))
    assert dx.dtype == dtype and ds.dtype == dtype and ds.shape == (1, 6)
    assert dz.dtype == dtype and dz.shape == ()


def test_fake_quant_scalar_and_odd_shapes():
  out = E.fake_quant(jnp.float32(1.26), 0.5, 0, -8, 7)
  assert out.shape == () and float(out) == 1.5
  x = _rand((3, 5, 7), seed=1)
  s = np.full((5, 1), 0.2, F32)
  np.testing.assert_allclose(E.fake_quant(x, s, 0, -8, 7), fq_ref(x, s, 0, -8, 7),
                             rtol=1e-6, atol=1e-7)
  qmin = np.full((7,), -4)  # array range ends broadcast too
  np.testing.assert_allclose(E.fake_quant(x, 0.2, 0, qmin, 7), fq_ref(x, 0.2, 0, -4, 7),
                             rtol=1e-6, atol=1e-7)


def test_fake_quant_pow2_scale():
  x = _rand((16, 8), seed=2)
  lo, hi = numerics.minmax(x, (0,))
  s, z = numerics.scale_zero_point(lo, hi, 8, signed=True, symmetric=False, pow2_scale=True)
  out = E.fake_quant(x, s, z, -128, 127)
  np.testing.assert_allclose(out, fq_ref(x, s, z, -128, 127), rtol=1e-6, atol=1e-7)
  codes = np.asarray(out, np.float64) / np.asarray(s, np.float64)
  np.testing.assert_array_equal(codes, np.round(codes))
  dx, ds, dz = _grads(lambda x, s, z: E.lsq_fake_quant(x, s, z, -128, 127, 1.0), x, s, z,
                      jnp.ones_like(x))
  _, ds_ref, dz_ref = lsq_grad_ref(x, s, z, -128, 127, 1.0)
  np.testing.assert_allclose(ds, _sum_to(ds_ref, s.shape), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dz, _sum_to(dz_ref, z.shape), rtol=1e-6, atol=1e-6)


def test_fake_quant_bad_inputs():
  x = jnp.ones((4, 3))
  with pytest.raises(TypeError, match="x must be a floating"):
    E.fake_quant(jnp.ones((4, 3), jnp.int32), 1.0, 0, -8, 7)
  with pytest.raises(ValueError, match="scale of shape"):
    E.fake_quant(x, jnp.ones((4, 3, 1)), 0, -8, 7)
  with pytest.raises(ValueError, match="zero_point of shape"):
    E.fake_quant(x, 1.0, jnp.zeros((4,)), -8, 7)
  with pytest.raises(ValueError, match="qmin=7 must be <= qmax=-8"):
    E.fake_quant(x, 1.0, 0, 7, -8)
  with pytest.raises(ValueError, match="grad_scale=None needs qmax > 0"):
    E.lsq_fake_quant(x, 1.0, 0, -1, 0)


# ----------------------------------------------------------------------- STE gradient


def test_ste_mask_boundaries():
  s = F32(0.5)
  for qmin, qmax, z in RANGES:
    v = np.array([qmax - z, qmax - z + 0.5, qmax - z - 0.5, qmax - z + 0.49, qmax - z + 1,
                  qmin - z, qmin - z - 0.5, qmin - z + 0.5, qmin - z - 0.51, qmin - z - 1],
                 F32)
    x = jnp.asarray(v * s)  # exact: s is a power of two
    g = jnp.arange(1.0, v.size + 1)
    dx, ds, dz = _grads(lambda x, s, z: E.fake_quant(x, s, z, qmin, qmax), x, s, F32(z), g)
    code = np.round(v.astype(np.float64)) + z
    np.testing.assert_array_equal(dx, g * ((code >= qmin) & (code <= qmax)))
    assert float(ds) == 0.0 and float(dz) == 0.0
  # The x / s = qmax + 0.5 edge: 127.5 rounds (to even) to 128 -> out; -128.5 -> -128 in.
  x = jnp.array([127.5, 126.5, -128.5, -129.5], jnp.float32)
  dx = jax.grad(lambda x: jnp.sum(E.fake_quant(x, 1.0, 0, -128, 127)))(x)
  np.testing.assert_array_equal(dx, [0, 1, 1, 0])


def test_ste_random_mask_and_zero_param_grads():
  x = _rand((32, 8), seed=9)
  s = np.random.default_rng(9).uniform(0.1, 0.4, size=(1, 8)).astype(F32)
  z = np.arange(8, dtype=F32).reshape(1, 8) - 4
  g = _rand((32, 8), seed=10)
  dx, ds, dz = _grads(lambda x, s, z: E.fake_quant(x, s, z, -16, 15), x, s, z, g)
  dx_ref, _, _ = lsq_grad_ref(x, s, z, -16, 15, g)
  np.testing.assert_array_equal(dx, dx_ref)
  assert 0 < np.count_nonzero(dx) < dx.size
  np.testing.assert_array_equal(ds, np.zeros((1, 8)))
  np.testing.assert_array_equal(dz, np.zeros((1, 8)))


# ----------------------------------------------------------------------- LSQ / LSQ+


@pytest.mark.parametrize("qmin,qmax,z", RANGES)
def test_lsq_gradients_element_by_element(qmin, qmax, z):
  """One scale and zero point per element: parameter grads are the per-element formulas."""
  x = _rand((40, 6), seed=qmax + z, scale=0.3 * (qmax - qmin))
  rng = np.random.default_rng(qmax)
  s = rng.uniform(0.05, 1.0, size=x.shape).astype(F32)
  zz = np.full(x.shape, z, F32)
  g = _rand(x.shape, seed=1)
  fn = lambda x, s, z: E.lsq_fake_quant(x, s, z, qmin, qmax, 1.0)
  out = fn(x, s, zz)
  np.testing.assert_allclose(out, fq_ref(x, s, zz, qmin, qmax), rtol=1e-6, atol=1e-6)
  dx, ds, dz = _grads(fn, x, s, zz, g)
  dx_ref, ds_ref, dz_ref = lsq_grad_ref(x, s, zz, qmin, qmax, g)
  np.testing.assert_array_equal(dx, dx_ref)
  np.testing.assert_allclose(ds, ds_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dz, dz_ref, rtol=1e-6, atol=1e-7)
  inside = dx_ref != 0
  assert inside.any() and (~inside).any()


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_lsq_default_grad_scale_and_reduction(granularity):
  x = _rand((8, 12), seed=5, scale=2.0)
  qmin, qmax = -8, 7
  pshape = {"tensor": (), "channel": (1, 12), "group": (2, 1, 12)}[granularity]
  if granularity == "group":
    x = x.reshape(2, 4, 12)
  rng = np.random.default_rng(0)
  s = rng.uniform(0.1, 0.4, size=pshape).astype(F32)
  z = rng.uniform(-2, 2, size=pshape).astype(F32)  # LSQ+: a float zero point
  g = _rand(x.shape, seed=6)
  n = x.size / max(np.size(s), 1)
  gs = 1.0 / np.sqrt(n * qmax)
  dx, ds, dz = _grads(lambda x, s, z: E.lsq_fake_quant(x, s, z, qmin, qmax), x, s, z, g)
  dx_ref, ds_ref, dz_ref = lsq_grad_ref(x, s, z, qmin, qmax, g)
  np.testing.assert_array_equal(dx, dx_ref)
  assert ds.shape == pshape and dz.shape == pshape
  np.testing.assert_allclose(ds, _sum_to(ds_ref, pshape) * gs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dz, _sum_to(dz_ref, pshape) * gs, rtol=1e-5, atol=1e-6)
  # Explicit grad_scale multiplies both parameter gradients.
  dx2, ds2, dz2 = _grads(lambda x, s, z: E.lsq_fake_quant(x, s, z, qmin, qmax, 0.25),
                         x, s, z, g)
  np.testing.assert_array_equal(dx2, dx)
  np.testing.assert_allclose(ds2, _sum_to(ds_ref, pshape) * 0.25, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dz2, _sum_to(dz_ref, pshape) * 0.25, rtol=1e-5, atol=1e-6)


def test_lsq_float_zero_point_forward():
  x = _rand((50,), seed=3)
  out = E.lsq_fake_quant(x, 0.3, 2.4, 0, 15)
  np.testing.assert_allclose(out, fq_ref(x, 0.3, 2.4, 0, 15), rtol=1e-6, atol=1e-6)


def test_lsq_non_finite():
  x = jnp.array([jnp.inf, -jnp.inf, 1.0], jnp.float32)
  dx, ds, dz = _grads(lambda x, s, z: E.lsq_fake_quant(x, s, z, -8, 7, 1.0), x,
                      jnp.ones(3), jnp.ones(3), jnp.ones(3))
  np.testing.assert_array_equal(dx, [0, 0, 1])
  np.testing.assert_array_equal(ds, [6.0, -9.0, 0.0])
  np.testing.assert_array_equal(dz, [-1.0, -1.0, 0.0])
  out = E.lsq_fake_quant(jnp.array([jnp.nan]), 1.0, 0, -8, 7)
  assert np.isnan(out[0])


def test_lsq_integer_zero_point():
  x = _rand((10, 3), seed=11)
  out = E.lsq_fake_quant(x, 0.5, jnp.int32(2), 0, 15)
  np.testing.assert_allclose(out, fq_ref(x, 0.5, 2, 0, 15), rtol=1e-6, atol=1e-6)
  ds = jax.grad(lambda s: jnp.sum(E.lsq_fake_quant(x, s, jnp.int32(2), 0, 15, 1.0)))(0.5)
  _, ds_ref, _ = lsq_grad_ref(x, 0.5, 2, 0, 15, np.ones_like(x))
  np.testing.assert_allclose(ds, ds_ref.sum(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_forward_and_gradients():
  x = _rand((20, 5), seed=12)
  s, z, qmin, qmax = F32(0.25), F32(1.0), -8, 7
  key = jax.random.key(3)
  noise = np.asarray(numerics.hash_uniform(numerics.seed_from_key(key), x.shape), np.float64)
  r = np.floor(_v32(x, s) + noise)  # numerics.round_stochastic with the same key
  out = E.fake_quant(x, s, z, qmin, qmax, key=key)
  np.testing.assert_allclose(out, fq_ref(x, s, z, qmin, qmax, r=r), rtol=1e-6, atol=1e-7)
  assert not np.array_equal(out, E.fake_quant(x, s, z, qmin, qmax))
  g = _rand(x.shape, seed=13)
  fn = lambda x, s, z: E.lsq_fake_quant(x, s, z, qmin, qmax, 1.0, key=key)
  dx, ds, dz = _grads(fn, x, s, z, g)
  dx_ref, ds_ref, dz_ref = lsq_grad_ref(x, s, z, qmin, qmax, g, r=r)
  np.testing.assert_array_equal(dx, dx_ref)
  np.testing.assert_allclose(ds, ds_ref.sum(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dz, dz_ref.sum(), rtol=1e-5, atol=1e-6)


def test_stochastic_fake_quant_unbiased():
  x = jnp.array([0.1, 0.37, -0.62, 1.9], jnp.float32)
  keys = jax.random.split(jax.random.key(0), 4000)
  out = jax.vmap(lambda k: E.fake_quant(x, 0.5, 0, -8, 7, key=k))(keys)
  p = (np.asarray(x) / 0.5) % 1
  se = 0.5 * np.sqrt(p * (1 - p) / 4000)
  assert np.all(np.abs(np.asarray(out).mean(0) - np.asarray(x)) < 5 * se)


# ----------------------------------------------------------------------- transformations


def test_jit_vmap_checkpoint():
  x = jnp.asarray(_rand((4, 6, 5), seed=14))
  s = jnp.asarray(np.random.default_rng(1).uniform(0.2, 0.6, size=(4, 1, 5)), jnp.float32)
  z = jnp.zeros((4, 1, 5))

  def loss(x, s, z):
    return jnp.sum(jnp.sin(E.lsq_fake_quant(x, s, z, -8, 7, 0.5)))

  ref = jax.grad(loss, argnums=(0, 1, 2))(x, s, z)
  jitted = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, s, z)
  remat = jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2))(x, s, z)
  vmapped = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)))(x, s, z)
  for a, b, c, d in zip(ref, jitted, remat, vmapped):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c, a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d, a, rtol=1e-6, atol=1e-6)
  # A scale shared across the vmapped axis gets the summed gradient.
  s0 = s[0]
  shared = jax.grad(lambda s: jnp.sum(jax.vmap(
      lambda xi: E.lsq_fake_quant(xi, s, 0.0, -8, 7, 1.0))(x)))(s0)
  whole = jax.grad(lambda s: jnp.sum(E.lsq_fake_quant(x, s, 0.0, -8, 7, 1.0)))(s0)
  np.testing.assert_allclose(shared, whole, rtol=1e-5, atol=1e-5)
  # jit with traced qmin/qmax and a key.
  f = jax.jit(lambda x, lo, hi, k: E.fake_quant(x, 0.3, 0, lo, hi, key=k))
  out = f(x, -8, 7, jax.random.key(1))
  np.testing.assert_array_equal(out, E.fake_quant(x, 0.3, 0, -8, 7, key=jax.random.key(1)))
  pf = jax.jit(jax.vmap(jax.grad(lambda x, a: jnp.sum(E.pact_fake_quant(x, a, 4)),
                                 argnums=(0, 1))))
  dx, da = pf(x, jnp.ones(4))
  assert dx.shape == x.shape and da.shape == (4,)


# ----------------------------------------------------------------------- PACT


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pact_forward_and_gradients(bits):
  x = _rand((30, 4), seed=bits, scale=2.0)
  x[0, :] = [0.0, -0.0, 1.5, 3.0]  # 1.5 == alpha of column 2: clipped, dalpha = 1
  alpha = np.array([1.0, 2.0, 1.5, 2.5], F32).reshape(1, 4)
  g = _rand(x.shape, seed=bits + 1)
  out = E.pact_fake_quant(x, alpha, bits)
  s = alpha.astype(np.float64) / (2**bits - 1)
  y = np.clip(x.astype(np.float64), 0, alpha)
  ref = np.round((y.astype(F32) / s.astype(F32)).astype(np.float64)) * s
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  codes = np.asarray(out, np.float64) / s
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
  dx, da = jax.grad(lambda x, a: jnp.sum(E.pact_fake_quant(x, a, bits) * g),
                    argnums=(0, 1))(x, alpha)
  np.testing.assert_array_equal(dx, g * ((x >= 0) & (x < alpha)))
  assert da.shape == (1, 4)
  np.testing.assert_allclose(da, (g * (x >= alpha)).sum(0, keepdims=True), rtol=1e-5)
  assert dx[0, 2] == 0 and dx[0, 0] == g[0, 0]


def test_pact_dtype_non_finite_and_key():
  x = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.7], jnp.bfloat16)
  out = E.pact_fake_quant(x, jnp.bfloat16(1.0), 2)
  assert out.dtype == jnp.bfloat16
  assert np.isnan(float(out[0]))
  expected = jnp.array([1.0, 0.0, 2 / 3], jnp.float32).astype(jnp.bfloat16)
  np.testing.assert_array_equal(out[1:], expected)
  xs = jnp.full((2000,), 0.5)
  sr = E.pact_fake_quant(xs, 1.0, 1, key=jax.random.key(0))
  assert set(np.unique(np.asarray(sr))) == {0.0, 1.0}
  assert abs(float(sr.mean()) - 0.5) < 0.06
  with pytest.raises(ValueError, match="bits"):
    E.pact_fake_quant(xs, 1.0, 9)


# ----------------------------------------------------------------------- LSQ init


def test_lsq_init_scale():
  x = _rand((6, 10), seed=20)
  s = E.lsq_init_scale(x, 127, axes=0)
  assert s.shape == (1, 10) and s.dtype == jnp.float32
  ref = 2 * np.abs(x.astype(np.float64)).mean(0, keepdims=True) / np.sqrt(127)
  np.testing.assert_allclose(s, ref, rtol=1e-6)
  s_all = E.lsq_init_scale(x, 7, None)
  assert s_all.shape == (1, 1)
  np.testing.assert_allclose(s_all, 2 * np.abs(x).mean() / np.sqrt(7), rtol=1e-6)
  np.testing.assert_allclose(E.lsq_init_scale(x, 7, (0, 1)), s_all, rtol=1e-6)
  xn = x.copy()
  xn[0, 0], xn[1, 0] = np.nan, np.inf
  np.testing.assert_allclose(E.lsq_init_scale(xn, 7, 0)[0, 0],
                             2 * np.abs(x[2:, 0]).mean() / np.sqrt(7), rtol=1e-6)
  assert float(E.lsq_init_scale(np.zeros((3, 3), F32), 7).max()) == numerics.SCALE_EPS
  with pytest.raises(ValueError, match="qmax"):
    E.lsq_init_scale(x, 0)


# ----------------------------------------------------------------------- FQ-ViT log2


def test_log2_quantize_and_fake_quant():
  bits = 4
  x = np.concatenate([np.random.default_rng(0).uniform(0, 1, 200),
                      [0.0, 1.0, 0.5, 2.0**-14, 2.0**-15, 2.0**-16, 1e-30]]).astype(F32)
  codes = E.log2_quantize(x, bits)
  assert codes.dtype == jnp.uint8
  with np.errstate(divide="ignore"):
    ref = np.clip(np.round(-np.log2(x.astype(np.float64))), 0, 15)
  np.testing.assert_array_equal(codes, ref)
  assert codes[200] == 15 and codes[201] == 0 and codes[202] == 1
  np.testing.assert_array_equal(E.log2_dequantize(codes), 2.0**-ref)
  out = E.log2_fake_quant(jnp.asarray(x), bits)
  np.testing.assert_array_equal(out, 2.0**-ref)
  g = _rand(x.shape, seed=3)
  dx = jax.grad(lambda x: jnp.sum(E.log2_fake_quant(x, bits) * g))(jnp.asarray(x))
  with np.errstate(divide="ignore"):
    unclipped = np.round(-np.log2(x.astype(np.float64))) <= 15
  np.testing.assert_array_equal(dx, g * unclipped)
  assert dx[200] == 0 and dx[-1] == 0 and dx[-4] == g[-4]


def test_log2_edge_values_and_dtype():
  x = jnp.array([2.0, -0.5, jnp.nan, 0.3], jnp.bfloat16)
  np.testing.assert_array_equal(E.log2_quantize(x, 3), [0, 7, 7, 2])
  out = E.log2_fake_quant(x, 3)
  assert out.dtype == jnp.bfloat16
  assert float(out[0]) == 1.0 and np.isnan(float(out[1])) and np.isnan(float(out[2]))
  assert float(out[3]) == 0.25


def test_log2_matmul_matches_float_product():
  rng = np.random.default_rng(0)
  attn = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, 5, 7)) * 3, jnp.float32), -1)
  q = E.log2_quantize(attn, 4)
  v = jnp.asarray(rng.integers(-128, 128, size=(2, 3, 7, 4)), jnp.int8)
  out = E.log2_matmul(q, v)
  ref = np.einsum("bhij,bhjk->bhik", 2.0 ** -np.asarray(q, np.float64),
                  np.asarray(v, np.float64))
  assert out.dtype == jnp.float32 and out.shape == (2, 3, 5, 4)
  np.testing.assert_array_equal(out, ref)  # exact: terms are shifted int8 values
  vf = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
  ref = 2.0 ** -np.asarray(q, np.float64) @ np.asarray(vf, np.float64)
  np.testing.assert_allclose(E.log2_matmul(q, vf), ref, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------- FQ-ViT PTF


def _ptf_ref(x, bits, num_factors, signed):
  qmin, qmax = numerics.int_range(bits, signed)
  x64 = x.astype(np.float64)
  lo, hi = min(x64.min(), 0.0), max(x64.max(), 0.0)
  top = np.float32(np.float32(hi - lo) / np.float32(qmax - qmin))
  z = np.clip(qmin - np.round(np.float32(lo) / top), qmin, qmax)
  s = top / 2.0 ** (num_factors - 1)
  errs = np.stack([((x64 - fq_ref(x, F32(s * 2.0**a), z, qmin, qmax)) ** 2)
                   .reshape(-1, x.shape[-1]).sum(0) for a in range(num_factors)])
  return s, z, np.argmin(errs, 0)


@pytest.mark.parametrize("signed", [False, True])
def test_ptf_calibrate_and_fake_quant(signed):
  rng = np.random.default_rng(int(signed))
  # LayerNorm-input-like: channels with magnitudes spread over 2^0 .. 2^5.
  mag = 2.0 ** rng.integers(0, 6, size=12)
  x = (rng.normal(size=(4, 16, 12)) * mag + rng.normal(size=12)).astype(F32)
  scale, zp, fe = E.ptf_calibrate(x, 8, num_factors=4, signed=signed)
  assert scale.shape == () and zp.shape == () and fe.shape == (12,) and fe.dtype == jnp.int32
  s_ref, z_ref, fe_ref = _ptf_ref(x, 8, 4, signed)
  np.testing.assert_allclose(scale, s_ref, rtol=1e-6)
  assert float(zp) == z_ref
  np.testing.assert_array_equal(fe, fe_ref)
  assert fe.min() >= 0 and fe.max() <= 3 and len(set(np.asarray(fe))) > 1
  qmin, qmax = numerics.int_range(8, signed)
  out = E.ptf_fake_quant(x, scale, zp, fe, qmin, qmax)
  step = np.float32(scale) * 2.0 ** np.asarray(fe)
  np.testing.assert_allclose(out, fq_ref(x, step, zp, qmin, qmax), rtol=1e-6, atol=1e-6)
  # PTF is at least as accurate as the best single layer-wise scale among its factors.
  err_ptf = np.sum((out - x) ** 2)
  errs = [np.sum((fq_ref(x, F32(s_ref * 2.0**a), z_ref, qmin, qmax) - x) ** 2)
          for a in range(4)]
  assert err_ptf <= min(errs) + 1e-6
  g = _rand(x.shape, seed=2)
  dx = jax.grad(lambda x: jnp.sum(E.ptf_fake_quant(x, scale, zp, fe, qmin, qmax) * g))(
      jnp.asarray(x))
  code = np.round(_v32(x, step)) + float(zp)
  np.testing.assert_array_equal(dx, g * ((code >= qmin) & (code <= qmax)))


def test_ptf_bad_inputs_and_non_finite():
  x = _rand((5, 6), seed=0)
  with pytest.raises(ValueError, match="factor_exp"):
    E.ptf_fake_quant(x, 0.1, 0, jnp.zeros(5, jnp.int32), 0, 255)
  with pytest.raises(ValueError, match="num_factors"):
    E.ptf_calibrate(x, 8, num_factors=0)
  xn = x.copy()
  xn[0, 0], xn[1, 1] = np.nan, np.inf
  scale, zp, fe = E.ptf_calibrate(xn, 8)
  s2, z2, _ = E.ptf_calibrate(np.where(np.isfinite(xn), xn, 0.0).astype(F32), 8)
  assert np.isfinite(scale) and float(scale) == float(s2) and float(zp) == float(z2)
  out = E.ptf_fake_quant(xn, scale, zp, fe, 0, 255, key=jax.random.key(0))
  assert np.isnan(out[0, 0]) and np.isfinite(out[1, 1])
