"""Tests of jaxq.numerics against float64 numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import numerics

EPS = numerics.SCALE_EPS


# ---------------------------------------------------------------- bits and ranges


@pytest.mark.parametrize("bits", range(1, 9))
def test_int_range(bits):
  assert numerics.int_range(bits, signed=True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
  assert numerics.int_range(bits, signed=False) == (0, 2**bits - 1)


@pytest.mark.parametrize("bad", [0, 9, -1])
def test_int_range_rejects_out_of_range_bits(bad):
  with pytest.raises(ValueError, match="bits"):
    numerics.int_range(bad, signed=True)


@pytest.mark.parametrize("bad", [8.0, "8", True, None])
def test_int_range_rejects_non_int_bits(bad):
  with pytest.raises(ValueError, match="bits"):
    numerics.int_range(bad, signed=True)


def test_check_symmetric_range():
  with pytest.raises(ValueError, match="bits=1"):
    numerics.check_symmetric_range(1, True)
  numerics.check_symmetric_range(1, False)
  numerics.check_symmetric_range(2, True)
  with pytest.raises(ValueError, match="bits=1"):
    numerics.scale_zero_point(-1.0, 1.0, 1, signed=True, symmetric=True)


# ---------------------------------------------------------------- scale / zero point


def _ref_scale_zero_point(lo, hi, bits, signed, symmetric, pow2_scale=False,
                          dtype=np.float32):
  """numpy reference of the documented formulas.

  The contract computes in float32, so by default the reference does the same IEEE
  operations in float32 (``lo / s`` can sit exactly on a rounding tie, where float64
  and float32 legitimately differ by one code).
  """
  lo = np.asarray(lo, dtype)
  hi = np.asarray(hi, dtype)
  qmin, qmax = numerics.int_range(bits, signed)
  if symmetric:
    amax = np.maximum(np.abs(lo), np.abs(hi)) if signed else np.maximum(hi, dtype(0))
    s = np.maximum(amax / dtype(qmax), dtype(EPS))
    if pow2_scale:
      s = (2.0 ** np.round(np.log2(s))).astype(dtype)
    return s, np.zeros_like(s)
  lo, hi = np.minimum(lo, dtype(0)), np.maximum(hi, dtype(0))
  s = np.maximum((hi - lo) / dtype(qmax - qmin), dtype(EPS))
  if pow2_scale:
    s = 2.0 ** np.round(np.log2(s))
  z = np.clip(qmin - np.round(lo / s), qmin, qmax)
  return s, z


def _fq64(x, s, z, qmin, qmax):
  return (np.clip(np.round(x / s) + z, qmin, qmax) - z) * s


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_scale_zero_point_matches_reference(signed, symmetric, bits):
  rng = np.random.default_rng(bits + 10 * signed + 100 * symmetric)
  lo = -np.abs(rng.normal(size=(5, 1))) * 3
  hi = np.abs(rng.normal(size=(5, 1))) * 2
  lo[0], hi[0] = 0.5, 1.5  # ranges not containing 0, on each side
  lo[1], hi[1] = -1.25, -0.25
  s, z = numerics.scale_zero_point(lo, hi, bits, signed=signed, symmetric=symmetric)
  assert s.dtype == jnp.float32 and z.dtype == jnp.float32 and s.shape == (5, 1)
  s_ref, z_ref = _ref_scale_zero_point(lo, hi, bits, signed, symmetric)
  np.testing.assert_allclose(s, s_ref, rtol=1e-6)
  np.testing.assert_array_equal(z, z_ref)
  s64, z64 = _ref_scale_zero_point(lo, hi, bits, signed, symmetric, dtype=np.float64)
  np.testing.assert_allclose(s, s64, rtol=1e-6)
  assert np.all(np.abs(np.asarray(z) - z64) <= 1)
  qmin, qmax = numerics.int_range(bits, signed)
  assert np.all((z >= qmin) & (z <= qmax)) and np.all(z == np.round(z))
  # The end points (or 0) of each range quantize to within half a step.
  for v in (np.maximum(lo, 0) if (symmetric and not signed) else lo, hi):
    err = np.abs(_fq64(v, np.float64(s), np.float64(z), qmin, qmax) - v)
    if symmetric and not signed:
      err = np.where(v < 0, 0, err)
    assert np.all(err <= np.float64(s) / 2 + 1e-6)


def test_scale_zero_point_zero_range_and_constant():
  for lo, hi in [(0.0, 0.0), (3.0, 3.0), (-2.0, -2.0)]:
    for symmetric in (True, False):
      for signed in (True, False):
        s, z = numerics.scale_zero_point(lo, hi, 8, signed=signed, symmetric=symmetric)
        assert np.isfinite(s) and s >= EPS and np.isfinite(z)
        qmin, qmax = numerics.int_range(8, signed)
        assert qmin <= z <= qmax
  s, z = numerics.scale_zero_point(0.0, 0.0, 8, signed=True, symmetric=True)
  assert float(s) == pytest.approx(EPS) and float(z) == 0.0
  # A constant positive tensor is represented exactly enough (asymmetric, widened to 0).
  s, z = numerics.scale_zero_point(3.0, 3.0, 8, signed=False, symmetric=False)
  np.testing.assert_allclose(_fq64(3.0, float(s), float(z), 0, 255), 3.0, atol=float(s) / 2)


def test_scale_zero_point_per_channel_broadcast():
  lo = np.array([[-1.0], [-2.0], [0.0]])
  hi = np.array([[1.0, 4.0]])
  s, z = numerics.scale_zero_point(lo, hi, 8, signed=True, symmetric=False)
  assert s.shape == (3, 2) and z.shape == (3, 2)
  s_ref, z_ref = _ref_scale_zero_point(lo, hi, 8, True, False)
  np.testing.assert_allclose(s, s_ref, rtol=1e-6)
  np.testing.assert_array_equal(z, z_ref)


@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_zero_point_pow2(symmetric):
  rng = np.random.default_rng(0)
  lo, hi = -np.abs(rng.normal(size=16)), np.abs(rng.normal(size=16)) * 5
  s, z = numerics.scale_zero_point(lo, hi, 8, signed=True, symmetric=symmetric,
                                   pow2_scale=True)
  log = np.log2(np.asarray(s, np.float64))
  np.testing.assert_array_equal(log, np.round(log))
  s_ref, z_ref = _ref_scale_zero_point(lo, hi, 8, True, symmetric, pow2_scale=True)
  np.testing.assert_array_equal(s, s_ref)
  np.testing.assert_array_equal(z, z_ref)


def test_exp2_int_exact():
  e = np.arange(-160, 140)
  with np.errstate(over="ignore"):
    ref = (2.0**e).astype(np.float32)
  np.testing.assert_array_equal(numerics.exp2_int(jnp.asarray(e)), ref)
  np.testing.assert_array_equal(numerics.exp2_int(jnp.asarray(e, jnp.float32)), ref)
  assert numerics.exp2_int(jnp.array(-3), jnp.bfloat16).dtype == jnp.bfloat16
  assert np.isnan(numerics.exp2_int(jnp.array(np.nan)))


def test_pow2_exact_over_wide_range():
  # Regression: jnp.exp2 is inexact on XLA:CPU (exp2(-15) != 2^-15), so pow2 used to
  # return scales that are not powers of two.
  p = (2.0 ** np.arange(-40, 40)).astype(np.float32)
  for s in (p, p * np.float32(1.3), p * np.float32(0.8)):
    out = np.asarray(numerics.pow2(jnp.asarray(s)))
    np.testing.assert_array_equal(out, p)


def test_pow2():
  s = jnp.array([0.3, 1.0, 1.4, 1.5, 3.0, 1e-3, 100.0], jnp.float32)
  out = numerics.pow2(s)
  assert out.dtype == jnp.float32
  ref = 2.0 ** np.round(np.log2(np.asarray(s, np.float64)))
  np.testing.assert_array_equal(out, ref)
  assert numerics.pow2(jnp.array(0.3, jnp.bfloat16)).dtype == jnp.bfloat16


# ---------------------------------------------------------------- rounding


def test_round_nearest_half_to_even():
  x = jnp.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 0.49999997, 1.2, -1.7])
  np.testing.assert_array_equal(numerics.round_nearest(x),
                                [-2, -2, -0, 0, 2, 2, 4, 0, 1, -2])


def test_round_stochastic_values_and_dtype():
  x = jnp.linspace(-3, 3, 101, dtype=jnp.float32)
  r = numerics.round_stochastic(x, jax.random.key(0))
  assert r.dtype == x.dtype and r.shape == x.shape
  assert np.all((r == np.floor(x)) | (r == np.ceil(x)))
  ints = jnp.arange(-4.0, 5.0)
  np.testing.assert_array_equal(numerics.round_stochastic(ints, jax.random.key(1)), ints)


def test_round_stochastic_unbiased():
  x = jnp.array([0.1, 0.25, 0.5, -0.7, 2.9, -3.3, 7.0], jnp.float32)
  n = 20000
  keys = jax.random.split(jax.random.key(42), n)
  r = jax.jit(jax.vmap(numerics.round_stochastic, in_axes=(None, 0)))(x, keys)
  mean = np.asarray(r, np.float64).mean(0)
  frac = np.asarray(x, np.float64) - np.floor(x)
  std_err = np.sqrt(frac * (1 - frac) / n)
  # 5 standard errors: fails by chance with probability ~1e-6 per element.
  assert np.all(np.abs(mean - np.asarray(x, np.float64)) <= 5 * std_err + 1e-9)
  # Keys matter: different keys give different roundings.
  assert not np.all(r[0] == r[1]) or not np.all(r[1] == r[2])


# ---------------------------------------------------------------- layouts


def test_normalize_axis():
  assert numerics.normalize_axis(-1, 3) == 2
  assert numerics.normalize_axis(0, 3) == 0
  with pytest.raises(ValueError, match="group_axis=3"):
    numerics.normalize_axis(3, 3, "group_axis")


def test_reduction_axes():
  assert numerics.reduction_axes(3, "tensor", -1) == (0, 1, 2)
  assert numerics.reduction_axes(3, "channel", -1) == (0, 1)
  assert numerics.reduction_axes(4, "channel", 1) == (0, 2, 3)
  assert numerics.reduction_axes(4, "channel", (0, -1)) == (1, 2)
  assert numerics.reduction_axes(0, "channel", -1) == ()
  with pytest.raises(ValueError, match="axis"):
    numerics.reduction_axes(2, "channel", 5)


@pytest.mark.parametrize("shape,axis,g", [((12, 5), 0, 4), ((3, 8, 2), 1, 2),
                                          ((3, 8, 6), -1, 3), ((16,), 0, 16)])
def test_to_from_groups_round_trip(shape, axis, g):
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  xg = numerics.to_groups(x, g, axis)
  a = axis % len(shape)
  assert xg.shape == shape[:a] + (shape[a] // g, g) + shape[a + 1:]
  # Consecutive elements along the axis land in one group.
  ref = np.moveaxis(np.asarray(x), a, -1).reshape(
      np.moveaxis(np.asarray(x), a, -1).shape[:-1] + (shape[a] // g, g))
  np.testing.assert_array_equal(np.moveaxis(np.asarray(xg), (a, a + 1), (-2, -1)), ref)
  np.testing.assert_array_equal(numerics.from_groups(xg, axis), x)


@pytest.mark.parametrize("g", [0, -2, 5, 7])
def test_to_groups_bad_group_size(g):
  with pytest.raises(ValueError, match="group_size"):
    numerics.to_groups(jnp.zeros((4, 12)), g, 1)


# ---------------------------------------------------------------- minmax


def test_minmax_ignores_nan_inf():
  x = np.array([[1.0, np.nan, -3.0, np.inf],
                [np.nan, np.nan, np.nan, np.nan],
                [-np.inf, 2.0, 0.5, np.inf],
                [np.inf, -np.inf, np.inf, -np.inf]], np.float32)
  lo, hi = numerics.minmax(jnp.asarray(x), (1,))
  assert lo.shape == (4, 1) and lo.dtype == jnp.float32
  np.testing.assert_array_equal(lo[:, 0], [-3.0, 0.0, 0.5, 0.0])
  np.testing.assert_array_equal(hi[:, 0], [1.0, 0.0, 2.0, 0.0])
  lo, hi = numerics.minmax(jnp.asarray(x), (0, 1))
  assert lo.shape == (1, 1) and float(lo[0, 0]) == -3.0 and float(hi[0, 0]) == 2.0


def test_minmax_bf16_and_random():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(6, 7, 5)).astype(np.float32)
  lo, hi = numerics.minmax(jnp.asarray(x, jnp.bfloat16), (0, 2))
  assert lo.dtype == jnp.float32 and lo.shape == (1, 7, 1)
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_array_equal(lo, xb.min(axis=(0, 2), keepdims=True))
  np.testing.assert_array_equal(hi, xb.max(axis=(0, 2), keepdims=True))
