"""Serving kernels of one contraction (jaxq.layer.serve, Contract 7): int4_matmul for
<= 4-bit weights, int8_matmul_dynamic for dynamic activations, smoothing fused into the
activation quantization; each against a float64 dequantize-then-matmul reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import kernels
from jaxq import quantizer
from jaxq.layer import serve, smooth
from jaxq.layer.calib import calibration_init, calibration_update
from jaxq.layer.views import dot_general_contraction
from jaxq.qarray import dequantize, quantize
from jaxq.spec import QuantSpec, Rule

A8 = QuantSpec(8, granularity="tensor")
A8_ASYM = QuantSpec(8, granularity="tensor", symmetric=False)
A8_DYN = QuantSpec(8, granularity="tensor", dynamic=True)
W4 = QuantSpec(4)
W4T = QuantSpec(4, granularity="tensor")
W2 = QuantSpec(2)
W3 = QuantSpec(3)
W4G = QuantSpec(4, granularity="group", group_size=8)
W8 = QuantSpec(8)


def _op(x, w):
  return dot_general_contraction(
      x, w, (((x.ndim - 1,), (0,)), ((), ())),
      lambda l, r: jax.lax.dot_general(l, r, (((l.ndim - 1,), (0,)), ((), ())),
                                       precision=jax.lax.Precision.HIGHEST), "layer")


def _data(m=6, k=15, n=7, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(m, k)).astype(np.float32)
  w = (rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(w)


def _act_qparams(x, aspec):
  if aspec is None or aspec.dynamic:
    return None
  s, z = quantizer.compute_qparams(x, aspec)
  return {"scale": s, "zero_point": z}


def _reference(x, qw, aspec, act, s=None):
  """float64 ``quant(x / s) @ dequantize(qw)``."""
  x = np.asarray(x, np.float64)
  if s is not None:
    x = x / np.asarray(s, np.float64)
  if aspec is not None:
    xs = jnp.asarray(x, jnp.float32)
    if aspec.dynamic:
      view = aspec.replace(granularity="channel", axis=0, dynamic=False)
      x = np.asarray(quantizer.fake_quantize(xs, view, group_axis=1), np.float64)
    else:
      x = np.asarray(quantizer.fake_quantize(xs, aspec, scale=act["scale"],
                                             zero_point=act["zero_point"]), np.float64)
  return x @ np.asarray(dequantize(qw), np.float64)


class _Count:
  def __init__(self, monkeypatch, name):
    self.n = 0
    fn = getattr(kernels, name)

    def wrapped(*a, **kw):
      self.n += 1
      return fn(*a, **kw)

    monkeypatch.setattr(kernels, name, wrapped)


@pytest.mark.parametrize("wspec,aspec,k", [
    (W4, A8, 15), (W4, A8_DYN, 16), (W4T, A8_ASYM, 16), (W3, A8, 16), (W2, A8_DYN, 15)],
    ids=["w4-static-oddk", "w4-dynamic", "w4tensor-asym", "w3-static", "w2-dynamic-oddk"])
def test_low_bit_weights_are_served_by_int4_matmul(monkeypatch, wspec, aspec, k):
  """int4 x int8 through int4_matmul (odd K padded) equals the dequantize-then-matmul
  reference, and the previous serving numerics, within float rounding."""
  count = _Count(monkeypatch, "int4_matmul")
  x, w = _data(k=k)
  qw = quantize(w, wspec)
  act = _act_qparams(x, aspec)
  y = serve.quantized_contraction(_op(x, w), "layer", aspec, qw, act)
  assert count.n == 1
  np.testing.assert_allclose(y, _reference(x, qw, aspec, act), rtol=1e-5, atol=1e-5)


def test_int4_serving_is_jittable_and_bf16_inputs_keep_their_dtype(monkeypatch):
  x, w = _data(m=4, k=16, n=5)
  qw = quantize(w, W4)
  act = _act_qparams(x, A8)
  f = jax.jit(lambda x, qw, act: serve.quantized_contraction(_op(x, w), "l", A8, qw, act))
  np.testing.assert_allclose(f(x, qw, act), _reference(x, qw, A8, act), rtol=1e-5,
                             atol=1e-5)
  xb = x.astype(jnp.bfloat16)
  yb = serve.quantized_contraction(_op(xb, w.astype(jnp.bfloat16)), "l", A8, qw, act)
  assert yb.dtype == jnp.bfloat16


@pytest.mark.parametrize("wspec,aspec,k", [
    (W4G, A8, 16), (W4G, A8_ASYM, 16), (W4G, A8_DYN, 24), (W4, None, 15), (W4G, None, 16),
    (W2, None, 16)],
    ids=["w4g-a8", "w4g-asym", "w4g-dynamic", "w4-weight-only-oddk", "w4g-weight-only",
         "w2-weight-only"])
def test_grouped_and_weight_only_low_bit_weights_are_served_by_int4_matmul_grouped(
    monkeypatch, wspec, aspec, k):
  """Group scales and weight-only inputs (dequantization in the kernel) through
  int4_matmul_grouped equal the dequantize-then-matmul reference; NaN rows stay NaN."""
  count = _Count(monkeypatch, "int4_matmul_grouped")
  x, w = _data(k=k)
  qw = quantize(w, wspec)
  act = _act_qparams(x, aspec)
  x = x.at[2, 3].set(jnp.nan)
  y = np.asarray(serve.quantized_contraction(_op(x, w), "layer", aspec, qw, act))
  assert count.n == 1
  ref = _reference(x, qw, aspec, act)
  np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
  np.testing.assert_array_equal(np.isnan(y).any(1), [0, 0, 1, 0, 0, 0])
  np.testing.assert_allclose(np.nan_to_num(y), np.nan_to_num(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("a_dtype", [jnp.int8, jnp.float32, jnp.bfloat16])
def test_int4_matmul_grouped_kernel_matches_float64_reference(a_dtype):
  """The Pallas kernel (interpreted) and its XLA reference against numpy float64."""
  rng = np.random.default_rng(7)
  m, k, n, g = 5, 64, 24, 16
  w = rng.integers(-8, 8, size=(k, n))
  scale = rng.uniform(0.01, 1.0, size=(k // g, n)).astype(np.float32)
  bias = rng.normal(size=n).astype(np.float32)
  if a_dtype == jnp.int8:
    a = rng.integers(-127, 128, size=(m, k)).astype(np.int8)
    a_scale = rng.uniform(0.1, 1.0, size=m).astype(np.float32)
  else:
    a = np.asarray(jnp.asarray(rng.normal(size=(m, k)), a_dtype).astype(jnp.float32))
    a_scale = None
  w_deq = (w.reshape(k // g, g, n) * scale[:, None, :]).reshape(k, n)
  ref = (a.astype(np.float64) * (1.0 if a_scale is None else a_scale[:, None])) @ w_deq
  ref = np.maximum(ref + bias, 0.0)
  args = (jnp.asarray(a, a_dtype), kernels.pack_int4(jnp.asarray(w, jnp.int8)),
          jnp.asarray(scale), None if a_scale is None else jnp.asarray(a_scale),
          jnp.asarray(bias))
  for backend in ("xla", "interpret"):
    y = kernels.int4_matmul_grouped(*args, group_size=g, activation="relu",
                                    backend=backend)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  with pytest.raises(ValueError, match="b_scale must have shape"):
    kernels.int4_matmul_grouped(*args[:2], args[2][:, :5], *args[3:], group_size=g)


def test_dynamic_w8a8_runs_int8_matmul_dynamic_with_fake_quant_numerics(monkeypatch):
  """Per-token activations quantized inside int8_matmul_dynamic equal fake quantization;
  a NaN gives a NaN row, +-Inf saturates (the row's other entries still served)."""
  monkeypatch.setenv(kernels.ENV_VAR, "interpret")  # the Pallas kernel, interpreted
  count = _Count(monkeypatch, "int8_matmul_dynamic")
  x, w = _data(m=5, k=16, n=6, seed=3)
  x = x.at[1, 2].set(jnp.nan).at[3, 0].set(jnp.inf).at[4, 5].set(-jnp.inf)
  qw = quantize(w, W8)
  y = np.asarray(serve.quantized_contraction(_op(x, w), "layer", A8_DYN, qw, None))
  assert count.n == 1
  ref = _reference(x, qw, A8_DYN, None)
  np.testing.assert_array_equal(np.isnan(y).any(1), [0, 1, 0, 0, 0])
  np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
  np.testing.assert_allclose(np.nan_to_num(y), np.nan_to_num(ref), rtol=1e-5, atol=1e-5)
  monkeypatch.setenv(kernels.ENV_VAR, "xla")  # codes computed in XLA: the same numbers
  y_xla = serve.quantized_contraction(_op(x, w), "layer", A8_DYN, qw, None)
  assert count.n == 1
  np.testing.assert_allclose(y_xla, y, rtol=1e-6, atol=1e-6)


def test_nan_input_row_is_nan_through_int4_serving():
  x, w = _data(m=4, k=16, n=5)
  act = _act_qparams(x, A8)
  x = x.at[2, 7].set(jnp.nan).at[0, 1].set(jnp.inf)
  qw = quantize(w, W4)
  y = np.asarray(serve.quantized_contraction(_op(x, w), "layer", A8, qw, act))
  ref = _reference(x, qw, A8, act)
  np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
  np.testing.assert_array_equal(np.isnan(y).any(1), [0, 0, 1, 0])
  np.testing.assert_allclose(np.nan_to_num(y), np.nan_to_num(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wspec,aspec", [(W8, A8), (W4, A8_ASYM), (W8, A8_DYN), (W4G, None),
                                         (None, A8)])
def test_smoothed_serving_divides_the_input_by_s_before_its_quantization(wspec, aspec):
  """quant(x / s) @ quant(s W): stored smoothed kernel and the activation range of x / s
  from calibration statistics; equals the float64 reference of the same formula."""
  x, w = _data(m=32, k=16, n=6, seed=5)
  x = x * jnp.linspace(0.2, 30.0, 16)
  rule = Rule(weight=wspec, act=aspec, smooth=0.5)
  st = calibration_update(calibration_init(rule, 16), x)
  k_s, sm = smooth.convert_weight(w, (0,), rule, st, path="layer")
  s = sm.scale
  act = None
  if aspec is not None and not aspec.dynamic:
    act = smooth.smoothed_act_qparams(st, s, aspec, "layer")
    want = _act_qparams(x / s, aspec)
    np.testing.assert_allclose(act["scale"], want["scale"], rtol=1e-6)
    np.testing.assert_array_equal(act["zero_point"], want["zero_point"])
  op = _op(x, w)
  if wspec is None:
    y = serve.quantized_contraction(_op(x, k_s), "layer", aspec, None, act, smooth=s)
    ref_x = np.asarray(quantizer.fake_quantize(x / s, aspec, scale=act["scale"],
                                               zero_point=act["zero_point"]), np.float64)
    np.testing.assert_allclose(y, ref_x @ np.asarray(k_s, np.float64), rtol=1e-5,
                               atol=1e-5)
    return
  qw = quantize(k_s, wspec)
  y = serve.quantized_contraction(op, "layer", aspec, qw, act, smooth=s)
  np.testing.assert_allclose(y, _reference(x, qw, aspec, act, s), rtol=1e-5, atol=1e-5)


def test_smoothing_scale_of_the_wrong_length_names_the_layer():
  x, w = _data(k=16)
  with pytest.raises(ValueError, match="layer 'enc/q'.*smoothing"):
    serve.quantized_contraction(_op(x, w), "enc/q", None, None, None,
                                smooth=jnp.ones((15,)))
