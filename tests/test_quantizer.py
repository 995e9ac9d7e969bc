"""Spec-driven glue: compute_qparams layouts vs numpy, fake_quantize dispatch and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import estimators
from jaxq.qarray import dequantize, quantize
from jaxq.quantizer import (compute_qparams, fake_quantize, qparams_from_range,
                            quant_axes, quant_view, stat_shape)
from jaxq.spec import QuantSpec

EPS = float(np.finfo(np.float32).eps)
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((6, 4, 10)) * 2, jnp.float32)


@pytest.mark.parametrize("kw,group_axis,shape", [
    (dict(granularity="tensor"), 0, (1, 1, 1)),
    (dict(granularity="channel", axis=0), 0, (6, 1, 1)),
    (dict(granularity="channel", axis=1), 0, (1, 4, 1)),
    (dict(granularity="channel", axis=-1), 0, (1, 1, 10)),
    (dict(granularity="group", group_size=3, axis=-1), 0, (2, 1, 1, 10)),
    (dict(granularity="group", group_size=2, axis=0), 1, (6, 2, 1, 1)),
    (dict(granularity="group", group_size=2, axis=-1), 1, (1, 2, 1, 10)),
    (dict(granularity="group", group_size=5, axis=-1), 2, (1, 1, 2, 1)),
])
def test_compute_qparams_layout_and_values(kw, group_axis, shape):
  for symmetric in (True, False):
    spec = QuantSpec(bits=8, symmetric=symmetric, **kw)
    scale, zp = compute_qparams(X, spec, group_axis=group_axis)
    assert scale.shape == shape == zp.shape == stat_shape(X.shape, spec, group_axis)
    assert scale.dtype == jnp.float32
    # numpy reference from an explicit reshape
    xv = np.asarray(quant_view(X, spec, group_axis), np.float64)
    axes = quant_axes(X.ndim, spec, group_axis)
    lo = xv.min(axis=axes, keepdims=True)
    hi = xv.max(axis=axes, keepdims=True)
    if symmetric:
      ref_s, ref_z = np.maximum(np.abs(lo), np.abs(hi)) / 127, 0 * lo
    else:
      lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
      ref_s = (hi - lo) / 255
      ref_z = np.clip(-128 - np.round(lo / ref_s), -128, 127)
    np.testing.assert_allclose(scale, ref_s, rtol=2e-6)
    np.testing.assert_array_equal(zp, ref_z)


def test_quant_axes_independent_of_spec_axis_sign():
  a = quant_axes(3, QuantSpec(granularity="group", group_size=2, axis=2), 1)
  b = quant_axes(3, QuantSpec(granularity="group", group_size=2, axis=-1), 1)
  assert a == b == (0, 2)  # view (d0, n//g, g, d2): keep the group count and axis 2


def test_qparams_from_range_and_pow2():
  spec = QuantSpec(bits=4, symmetric=False, signed=False)
  s, z = qparams_from_range(jnp.float32(-1.0), jnp.float32(2.0), spec)
  np.testing.assert_allclose(s, 3.0 / 15, rtol=1e-6)
  assert float(z) == 5.0
  s2, _ = qparams_from_range(jnp.float32(-1.0), jnp.float32(3.0), QuantSpec(
      bits=8, granularity="tensor", pow2_scale=True))
  assert float(s2) == 2.0 ** np.round(np.log2(3.0 / 127))


@pytest.mark.parametrize("kw,group_axis", [
    (dict(granularity="tensor", symmetric=False), 0),
    (dict(granularity="channel", axis=1, bits=4), 0),
    (dict(granularity="group", group_size=2, axis=-1, bits=3, symmetric=False), 1),
])
def test_fake_quantize_ste_matches_qarray(kw, group_axis):
  spec = QuantSpec(**kw)
  out = fake_quantize(X, spec, group_axis=group_axis)
  np.testing.assert_allclose(out, dequantize(quantize(X, spec, group_axis=group_axis)),
                             rtol=1e-6, atol=1e-7)
  # gradient: STE, all inside the min-max range, no gradient into the range
  g = jax.grad(lambda x: jnp.sum(fake_quantize(x, spec, group_axis=group_axis) * X))(X)
  np.testing.assert_allclose(g, X)


def test_fake_quantize_explicit_scale_clips_and_zero_grad_outside():
  spec = QuantSpec(bits=4, granularity="tensor")
  x = jnp.array([-3.0, -0.26, 0.1, 0.7, 5.0])
  out = fake_quantize(x, spec, scale=jnp.float32(0.1))
  np.testing.assert_allclose(out, [-0.8, -0.3, 0.1, 0.7, 0.7], rtol=1e-6)
  g = jax.grad(lambda a: jnp.sum(fake_quantize(a, spec, scale=jnp.float32(0.1))))(x)
  np.testing.assert_array_equal(g, [0, 1, 1, 1, 0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_fake_quantize_dtype(dtype):
  spec = QuantSpec(bits=8)
  x = X.astype(dtype)
  out = fake_quantize(x, spec)
  assert out.dtype == dtype and out.shape == x.shape
  ref = fake_quantize(x.astype(jnp.float32), spec).astype(dtype)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


def test_fake_quantize_nan_inf():
  x = jnp.array([jnp.nan, 1.0, -jnp.inf, jnp.inf, -0.5])
  out = np.asarray(fake_quantize(x, QuantSpec(granularity="tensor")))
  assert np.isnan(out[0])
  np.testing.assert_allclose(out[1:], [1.0, -128 / 127, 1.0, -0.5], rtol=1e-2)


def test_lsq_dispatch_and_requires_scale():
  spec = QuantSpec(bits=4, estimator="lsq", granularity="channel")
  with pytest.raises(ValueError, match="scale"):
    fake_quantize(X, spec)
  scale = jnp.full((1, 1, 10), 0.3)
  out = fake_quantize(X, spec, scale=scale)
  ref = estimators.lsq_fake_quant(X, scale, 0.0, -8, 7)
  np.testing.assert_array_equal(out, ref)
  g = jax.grad(lambda s: jnp.sum(fake_quantize(X, spec, scale=s, grad_scale=1.0)))(scale)
  g_ref = jax.grad(lambda s: jnp.sum(estimators.lsq_fake_quant(X, s, 0.0, -8, 7, 1.0)))(scale)
  np.testing.assert_allclose(g, g_ref)
  assert g.shape == scale.shape and np.any(np.asarray(g) != 0)
  # LSQ+: asymmetric needs the zero point as well
  spec_a = spec.replace(symmetric=False)
  with pytest.raises(ValueError, match="zero_point"):
    fake_quantize(X, spec_a, scale=scale)
  out = fake_quantize(X, spec_a, scale=scale, zero_point=jnp.full((1, 1, 10), 1.5))
  np.testing.assert_array_equal(
      out, estimators.lsq_fake_quant(X, scale, jnp.full((1, 1, 10), 1.5), -8, 7))


def test_pact_dispatch():
  spec = QuantSpec(bits=4, estimator="pact", signed=False, granularity="tensor")
  with pytest.raises(ValueError, match="alpha"):
    fake_quantize(X, spec)
  ref = estimators.pact_fake_quant(X, jnp.float32(1.5), 4)
  np.testing.assert_array_equal(fake_quantize(X, spec, alpha=jnp.float32(1.5)), ref)
  np.testing.assert_allclose(fake_quantize(X, spec, scale=jnp.float32(0.1)), ref, rtol=1e-6)
  g = jax.grad(lambda a: jnp.sum(fake_quantize(X, spec, alpha=a)))(jnp.float32(1.5))
  np.testing.assert_allclose(g, np.sum(np.asarray(X) >= 1.5))


def test_log2_and_ptf_dispatch():
  p = jax.nn.softmax(X, axis=-1)
  spec = QuantSpec(scheme="log2", bits=4, signed=False, granularity="tensor")
  np.testing.assert_array_equal(fake_quantize(p, spec), estimators.log2_fake_quant(p, 4))
  spec = QuantSpec(scheme="ptf", bits=8, signed=False, symmetric=False)
  s, z, f = estimators.ptf_calibrate(X, 8)
  ref = estimators.ptf_fake_quant(X, s, z, f, 0, 255)
  np.testing.assert_array_equal(fake_quantize(X, spec), ref)
  np.testing.assert_array_equal(fake_quantize(X, spec, scale=s, zero_point=z, factor_exp=f),
                                ref)
  with pytest.raises(ValueError, match="factor_exp"):
    fake_quantize(X, spec, scale=s)


def test_stochastic_rounding_key_handling():
  spec = QuantSpec(bits=4, granularity="tensor", rounding="stochastic")
  with pytest.raises(ValueError, match="key"):
    fake_quantize(X, spec)
  nearest = fake_quantize(X, spec.replace(rounding="nearest"))
  np.testing.assert_array_equal(fake_quantize(X, spec, require_key=False), nearest)
  a = fake_quantize(X, spec, key=jax.random.key(0))
  b = fake_quantize(X, spec, key=jax.random.key(1))
  assert not np.array_equal(a, b)
  step = float(compute_qparams(X, spec)[0].ravel()[0])
  assert np.all(np.abs(np.asarray(a) - np.asarray(X)) < step * (1 + 1e-5))
  # a key with nearest rounding is ignored
  np.testing.assert_array_equal(
      fake_quantize(X, spec.replace(rounding="nearest"), key=jax.random.key(0)), nearest)


def test_bad_arguments():
  with pytest.raises(ValueError, match="scale"):
    fake_quantize(X, QuantSpec(), scale=jnp.ones((6, 1, 1, 1, 1)))
  with pytest.raises(ValueError, match="scale"):
    fake_quantize(X, QuantSpec(), scale=jnp.ones((3,)))
  with pytest.raises(ValueError, match="grad_scale"):
    fake_quantize(X, QuantSpec(), grad_scale=1.0)
  with pytest.raises(ValueError, match="zero_point"):
    fake_quantize(X, QuantSpec(), zero_point=0.0)
  with pytest.raises(TypeError, match="floating"):
    fake_quantize(jnp.arange(3), QuantSpec())
  with pytest.raises(TypeError, match="QuantSpec"):
    compute_qparams(X, {"bits": 8})


def test_jit_vmap_checkpoint():
  spec = QuantSpec(bits=4, granularity="group", group_size=2, axis=-1)

  def loss(x):
    return jnp.sum(fake_quantize(x, spec) ** 2)

  g_eager = jax.grad(loss)(X)
  g = jax.jit(jax.grad(jax.checkpoint(loss)))(X)
  np.testing.assert_allclose(g, g_eager, rtol=1e-6)
  v = jax.jit(jax.vmap(lambda x: fake_quantize(x, spec)))(X)
  np.testing.assert_allclose(v, jnp.stack([fake_quantize(x, spec) for x in X]), rtol=1e-6)
