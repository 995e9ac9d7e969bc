"""Property-based tests (hypothesis) of the fake-quant ops.

Shapes are fixed and scalars are passed as arrays so that every example reuses one
compiled program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxq
from jaxq import estimators as E
from jaxq import numerics, quantizer
from jaxq.spec import QuantSpec

N = 32
SETTINGS = settings(max_examples=60, deadline=None)

xs = hnp.arrays(np.float32, (N,), elements=st.floats(-1e3, 1e3, width=32))
scales = st.floats(2.0**-10, 10.0, width=32)
ranges = st.sampled_from([(bits, signed) for bits in (2, 3, 4, 8) for signed in (True, False)])


@jax.jit
def _fq(x, s, z, qmin, qmax):
  return E.fake_quant(x, s, z, qmin, qmax)


@jax.jit
def _fq_twice(x, s, z, qmin, qmax):
  return E.fake_quant(E.fake_quant(x, s, z, qmin, qmax), s, z, qmin, qmax)


def _qparams(data, bits, signed):
  qmin, qmax = numerics.int_range(bits, signed)
  s = np.float32(data.draw(scales))
  z = np.float32(data.draw(st.integers(qmin, qmax)))
  return s, z, qmin, qmax


@SETTINGS
@given(x=xs, r=ranges, data=st.data())
def test_fake_quant_idempotent(x, r, data):
  s, z, qmin, qmax = _qparams(data, *r)
  np.testing.assert_array_equal(_fq_twice(x, s, z, qmin, qmax), _fq(x, s, z, qmin, qmax))


@SETTINGS
@given(x=xs, r=ranges, data=st.data())
def test_fake_quant_monotone(x, r, data):
  s, z, qmin, qmax = _qparams(data, *r)
  out = np.asarray(_fq(np.sort(x), s, z, qmin, qmax))
  assert np.all(np.diff(out) >= 0), (np.sort(x), out)


@SETTINGS
@given(u=hnp.arrays(np.float64, (N,), elements=st.floats(0.0, 1.0)), r=ranges,
       data=st.data())
def test_fake_quant_error_within_half_step_inside_range(u, r, data):
  s, z, qmin, qmax = _qparams(data, *r)
  # x spread over the representable real range [(qmin - z) s, (qmax - z) s].
  lo, hi = (qmin - float(z)) * float(s), (qmax - float(z)) * float(s)
  x = (lo + u * (hi - lo)).astype(np.float32)
  x = np.clip(x, np.float32(lo), np.float32(hi))
  err = np.abs(np.asarray(_fq(x, s, z, qmin, qmax), np.float64) - x.astype(np.float64))
  # Half a step, plus float32 rounding of x / s and of (q - z) * s.
  tol = float(s) / 2 * (1 + 1e-5) + 1e-6 * np.abs(x)
  assert np.all(err <= tol), (x, err, s)


@SETTINGS
@given(x=xs, r=ranges, data=st.data())
def test_fake_quant_output_on_grid(x, r, data):
  s, z, qmin, qmax = _qparams(data, *r)
  s = numerics.pow2(s)  # power-of-two scale: codes are exactly recoverable
  codes = np.asarray(_fq(x, s, z, qmin, qmax), np.float64) / float(s) + float(z)
  np.testing.assert_array_equal(codes, np.round(codes))
  assert codes.min() >= qmin and codes.max() <= qmax


_MAGNITUDE_SPECS = [QuantSpec(bits=b, symmetric=s, granularity="tensor")
                    for b in (8, 4) for s in (True, False)]


@functools.partial(jax.jit, static_argnums=1)
def _minmax_fq(x, spec):
  scale, zp = quantizer.compute_qparams(x, spec)
  return quantizer.fake_quantize(x, spec), jaxq.dequantize(jaxq.quantize(x, spec)), scale


@SETTINGS
@given(u=hnp.arrays(np.float32, (N,), elements=st.floats(-3.5, 3.5, width=32)),
       exponent=st.integers(-30, 38), spec=st.sampled_from(_MAGNITUDE_SPECS))
@example(u=np.array([3.5, -3.5] + [0.5] * (N - 2), np.float32), exponent=38,
         spec=_MAGNITUDE_SPECS[1])
def test_minmax_quantization_at_any_magnitude(u, exponent, spec):
  """Data of any magnitude up to the float32 limit (issue 17: +-3.4e38 gave NaN):
  finite results within half a step (plus the float's rounding) of the data."""
  x = np.clip(u.astype(np.float64) * 10.0**exponent, -3.4e38, 3.4e38).astype(np.float32)
  fq, dq, scale = _minmax_fq(jnp.asarray(x), spec)
  step = float(np.asarray(scale).reshape(()))
  assert np.isfinite(step)
  for y in (fq, dq):
    y = np.asarray(y, np.float64)
    assert np.all(np.isfinite(y))
    assert np.all(np.abs(y - x) <= 0.5 * step * (1 + 1e-5) + 1e-6 * np.abs(x))
