"""Range observers against float64 numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.calibration import (_binned_error, _histogram, _rebin, mse_range, observer_init,
                              observer_qparams, observer_range, observer_update)
from jaxq.quantizer import qparams_from_range
from jaxq.spec import QuantSpec

_RNG = np.random.default_rng(0)
BATCHES = [(_RNG.standard_normal((16, 5)) * (1 + i) + i).astype(np.float32)
           for i in range(4)]
BATCHES[1][3, 2] = np.nan
BATCHES[2][0, 0] = np.inf
BATCHES[2][5, 4] = -np.inf

update = jax.jit(observer_update, static_argnums=(2, 3))


def run(spec, batches, stat_shape=(5,), axes=(0,)):
  state = observer_init(spec, stat_shape)
  for b in batches:
    state = update(state, jnp.asarray(b), spec, axes)
  return state


def finite(b):
  return np.where(np.isfinite(b), b, np.nan).astype(np.float64)


def test_minmax_running():
  spec = QuantSpec(calibration="minmax")
  lo, hi = observer_range(run(spec, BATCHES), spec)
  allx = np.concatenate([finite(b) for b in BATCHES])
  np.testing.assert_array_equal(lo, np.nanmin(allx, 0))
  np.testing.assert_array_equal(hi, np.nanmax(allx, 0))


def test_ema_bias_corrected_like_distiller():
  spec = QuantSpec(calibration="ema", ema_decay=0.8)
  state = observer_init(spec, (5,))
  biased_lo = biased_hi = np.zeros(5)
  for step, b in enumerate(BATCHES, start=1):
    state = update(state, jnp.asarray(b), spec, (0,))
    # Distiller range_linear.update_ema
    d = 0.8
    biased_lo = biased_lo * d + (1 - d) * np.nanmin(finite(b), 0)
    biased_hi = biased_hi * d + (1 - d) * np.nanmax(finite(b), 0)
    lo, hi = observer_range(state, spec)
    np.testing.assert_allclose(lo, biased_lo / (1 - d**step), rtol=1e-5)
    np.testing.assert_allclose(hi, biased_hi / (1 - d**step), rtol=1e-5)
  # after one step the corrected EMA is exactly the batch range
  lo1, _ = observer_range(run(spec, BATCHES[:1]), spec)
  np.testing.assert_allclose(lo1, BATCHES[0].min(0), rtol=1e-6)


@pytest.mark.parametrize("signed,symmetric", [(True, True), (True, False), (False, True)])
def test_percentile_mean_over_batches(signed, symmetric):
  spec = QuantSpec(calibration="percentile", percentile=90.0, signed=signed,
                   symmetric=symmetric)
  lo, hi = observer_range(run(spec, BATCHES), spec)
  if signed and symmetric:
    his = [np.nanpercentile(np.abs(finite(b)), 90.0, axis=0) for b in BATCHES]
    los = [-h for h in his]
  else:
    los = [np.nanpercentile(finite(b), 10.0, axis=0) for b in BATCHES]
    his = [np.nanpercentile(finite(b), 90.0, axis=0) for b in BATCHES]
  np.testing.assert_allclose(lo, np.mean(los, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(hi, np.mean(his, 0), rtol=1e-5, atol=1e-6)


def _np_mse(x, lo, hi, spec):
  s, z = (np.asarray(a, np.float64) for a in qparams_from_range(lo, hi, spec))
  q = np.clip(np.round(x / s) + z, spec.qmin, spec.qmax)
  return np.mean(((q - z) * s - x) ** 2)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_beats_minmax_with_outliers(symmetric):
  spec = QuantSpec(bits=4, granularity="tensor", symmetric=symmetric, calibration="mse")
  x = np.random.default_rng(1).standard_normal(2000).astype(np.float32)
  x[:3] = [12.0, -10.0, 15.0]
  lo, hi = mse_range(jnp.asarray(x), spec)
  mm_lo, mm_hi = x.min(), x.max()
  assert lo.shape == hi.shape == (1,)  # keepdims
  assert float(hi[0]) < mm_hi
  mse_opt = _np_mse(x.astype(np.float64), lo, hi, spec)
  mse_mm = _np_mse(x.astype(np.float64), mm_lo, mm_hi, spec)
  assert mse_opt < 0.8 * mse_mm
  # brute force over the same grid in float64
  if symmetric:
    a = np.abs(x).max()
    cands = [(-a * k / 100, a * k / 100) for k in range(1, 101)]
  else:
    cands = [(mm_lo * k / 100, mm_hi * k / 100) for k in range(1, 101)]
  best = min(_np_mse(x.astype(np.float64), c_lo, c_hi, spec) for c_lo, c_hi in cands)
  assert mse_opt <= best * (1 + 1e-4)


def test_mse_observer_searches_everything_seen_per_channel():
  spec = QuantSpec(bits=4, calibration="mse")
  # one batch: the exact search on the batch
  lo1, hi1 = observer_range(run(spec, BATCHES[:1]), spec)
  ref_lo, ref_hi = mse_range(jnp.asarray(BATCHES[0]), spec, (0,))
  np.testing.assert_array_equal(hi1, ref_hi[0])
  np.testing.assert_array_equal(lo1, ref_lo[0])
  # several: per channel, the candidate best on all the data seen (float64 brute force)
  lo, hi = observer_range(run(spec, BATCHES), spec)
  allx = np.concatenate([finite(b) for b in BATCHES])
  np.testing.assert_allclose(lo, -hi)
  assert len(np.unique(np.asarray(hi))) == 5  # each channel chooses its own clipping
  for c in range(5):
    xc = allx[:, c][np.isfinite(allx[:, c])]
    a = np.abs(xc).max()
    errs = [_np_mse(xc, -a * k / 100, a * k / 100, spec) for k in range(1, 101)]
    got = _np_mse(xc, lo[c], hi[c], spec)
    assert got <= min(errs) * 1.02 and got <= errs[-1]


def test_binned_error_matches_numeric_integral():
  rng = np.random.default_rng(0)
  s, lo_q, hi_q = 0.25, -8 * 0.25, 7 * 0.25
  u = np.sort(rng.uniform(-4, 4, 64)).astype(np.float64)
  v = u + rng.uniform(0, 1.5, 64)
  got = np.asarray(_binned_error(jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32),
                                 s, lo_q, hi_q))
  for a, b, g in zip(u, v, got):
    t = np.linspace(a, b, 200001)
    e = (t - np.clip(s * np.round(t / s), lo_q, hi_q)) ** 2
    np.testing.assert_allclose(g, np.trapezoid(e, t), rtol=1e-3, atol=1e-6)


def test_histogram_rebin_keeps_counts_and_places_them():
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1000, 2)), jnp.float32)
  lo, hi = jnp.array([-1.0, -1.0]), jnp.array([1.0, 1.0])
  h = _histogram(x, (1, 2), lo, hi, 256)
  np.testing.assert_allclose(h.sum(-1), [1000, 1000])
  wide = _rebin(h, lo, hi, lo * 3, hi * 3)
  np.testing.assert_allclose(wide.sum(-1), [1000, 1000], rtol=1e-6)
  direct = _histogram(x, (1, 2), lo * 3, hi * 3, 256)
  # the mass sits in the same bins as a direct histogram, up to one bin of spread
  np.testing.assert_allclose(np.cumsum(wide, -1), np.cumsum(direct, -1), atol=15)
  assert np.all(wide[:, :80] == 0) and np.all(wide[:, 177:] == 0)


@pytest.mark.parametrize("method", ["minmax", "ema", "percentile", "mse"])
def test_empty_state_and_nan_slices(method):
  spec = QuantSpec(calibration=method)
  state = observer_init(spec, (5,))
  hist = {"hist_lo", "hist_hi", "hist"} if method == "mse" else set()
  assert set(state) == {"lo", "hi", "n"} | hist and all(v.dtype == jnp.float32
                                                        for v in state.values())
  lo, hi = observer_range(state, spec)
  np.testing.assert_array_equal(lo, 0.0)
  np.testing.assert_array_equal(hi, 0.0)
  scale, zp = observer_qparams(state, spec)
  assert np.all(np.isfinite(scale)) and np.all(np.asarray(scale) > 0)
  assert np.all(np.isfinite(zp))
  # a channel with no finite value leaves its statistics untouched
  b = np.array(BATCHES[0])
  b[:, 1] = np.nan
  state = update(state, jnp.asarray(b), spec, (0,))
  np.testing.assert_array_equal(state["n"], [1, 0, 1, 1, 1])
  lo, hi = observer_range(state, spec)
  assert float(lo[1]) == 0.0 and float(hi[1]) == 0.0
  assert np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))
  state = update(state, jnp.asarray(BATCHES[3]), spec, (0,))
  np.testing.assert_array_equal(state["n"], [2, 1, 2, 2, 2])


def test_keepdims_stat_shape_and_errors():
  spec = QuantSpec(calibration="minmax")
  s1 = run(spec, BATCHES[:2], stat_shape=(1, 5))
  s2 = run(spec, BATCHES[:2], stat_shape=(5,))
  np.testing.assert_array_equal(observer_range(s1, spec)[1].ravel(),
                                observer_range(s2, spec)[1])
  st = observer_init(spec, (4,))
  with pytest.raises(ValueError, match="does not match"):
    observer_update(st, jnp.asarray(BATCHES[0]), spec, (0,))
  with pytest.raises(TypeError, match="floating"):
    observer_update(observer_init(spec, (5,)), jnp.ones((3, 5), jnp.int32), spec, (0,))
  with pytest.raises(ValueError, match="num_candidates"):
    mse_range(jnp.ones(4), spec, num_candidates=0)


def test_tensor_range_and_qparams():
  spec = QuantSpec(calibration="minmax", granularity="tensor", symmetric=False)
  state = run(spec, BATCHES, stat_shape=(), axes=None)
  allx = np.concatenate([finite(b) for b in BATCHES])
  scale, zp = observer_qparams(state, spec)
  ref_s, ref_z = qparams_from_range(np.nanmin(allx), np.nanmax(allx), spec)
  np.testing.assert_allclose(scale, ref_s, rtol=1e-6)
  np.testing.assert_array_equal(zp, ref_z)
