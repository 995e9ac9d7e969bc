"""SmoothQuant / AWQ scaling (jaxq.smoothing) against plain numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import smoothing
from jaxq.qarray import dequantize, quantize
from jaxq.spec import QuantSpec

W8 = QuantSpec(8)  # per output channel
A8 = QuantSpec(8, granularity="tensor")  # static per tensor
W4G = QuantSpec(4, granularity="group", group_size=32, symmetric=False)


def _layer(seed, k=128, n=64, m=768, outliers=()):
  """Correlated tokens with per-channel magnitudes (and injected outlier channels)."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
  x = rng.normal(size=(m, k)) @ mix * rng.lognormal(0.0, 0.7, size=k)
  for c, f in outliers:
    x[:, c] *= f
  w = rng.normal(size=(k, n)) / np.sqrt(k)
  return x.astype(np.float32), w.astype(np.float32)


def _err(x, w, w_hat):
  x, w, w_hat = (np.asarray(a, np.float64) for a in (x, w, w_hat))
  y = x @ w
  return float(np.sum((x @ w_hat - y) ** 2) / np.sum(y ** 2))


def test_scales_match_formulas_and_guard_bad_channels():
  rng = np.random.default_rng(0)
  amax = rng.uniform(0.1, 50.0, size=8).astype(np.float32)
  mean = rng.uniform(0.1, 5.0, size=8).astype(np.float32)
  w = rng.normal(size=(8, 5)).astype(np.float32)
  amax[1], amax[2], amax[3], mean[4], mean[5] = 0.0, np.nan, np.inf, 0.0, np.inf
  w[6] = 0.0
  got = np.asarray(smoothing.smoothquant_scales(amax, w, 0.7))
  with np.errstate(divide="ignore", invalid="ignore"):
    want = amax.astype(np.float64) ** 0.7 / np.abs(w).max(1).astype(np.float64) ** 0.3
  want[[1, 2, 3, 6]] = 1.0
  np.testing.assert_allclose(got, want, rtol=1e-5)
  got = np.asarray(smoothing.awq_scales(mean, 0.4))
  want = mean.astype(np.float64) ** 0.4
  want[[4, 5]] = 1.0
  np.testing.assert_allclose(got, want / np.sqrt(want.max() * want.min()), rtol=1e-5)


def test_channel_stats_running_update():
  x, _ = _layer(1, k=16, m=50)
  update = jax.jit(smoothing.stats_update)
  st = smoothing.stats_init(16)
  for batch in (x[:20], x[20:20], x[20:].reshape(3, 10, 16)):  # an empty batch too
    st = update(st, jnp.asarray(batch))
  np.testing.assert_allclose(np.asarray(st.absmax), np.abs(x).max(0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(smoothing.stats_mean_abs(st)), np.abs(x).mean(0),
                             rtol=1e-5)
  assert int(st.count) == 50


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_without_quantization_smoothing_changes_nothing(alpha):
  x, w = _layer(2, outliers=((3, 60.0), (70, 30.0)))
  s = smoothing.smoothquant_scales(smoothing.stats_update(
      smoothing.stats_init(128), x).absmax, w, alpha)
  xs, ws = smoothing.smooth(jnp.asarray(x), jnp.asarray(w), s)
  y = np.asarray(x, np.float64) @ w
  np.testing.assert_allclose(np.asarray(xs, np.float64) @ np.asarray(ws, np.float64), y,
                             rtol=1e-5, atol=1e-5 * np.abs(y).max())
  for weight_only in (False, True):
    err = smoothing.scaled_output_error(x[:256], x[256:], w, s, None, None, weight_only)
    assert float(err) < 1e-11


def test_smoothquant_auto_fixes_outlier_channels_w8a8_per_tensor():
  x, w = _layer(3, outliers=((5, 100.0), (40, 50.0), (99, 20.0)))
  x_fit, x_eval = smoothing.split_tokens(jnp.asarray(x), holdout=0.5)
  choice = smoothing.search_smoothquant(x_fit, x_eval, w, W8.replace(granularity="tensor"),
                                       A8)
  assert choice.alpha is not None
  assert choice.error < 0.2 * choice.identity_error
  s = np.asarray(choice.scale)
  assert s[5] > 5 * np.median(s)  # the 100x channel is divided out most


def test_identity_kept_when_scaling_is_not_better_on_held_back_tokens():
  # weight-only W8 with s = max|x| (alpha = 1) blows up every row but the outlier's
  x, w = _layer(4, outliers=((0, 100.0),))
  x_fit, x_eval = smoothing.split_tokens(jnp.asarray(x))
  choice = smoothing.search_smoothquant(x_fit, x_eval, w, W8, None, alphas=(1.0,))
  assert choice.alpha is None and choice.errors[1.0] > choice.identity_error
  np.testing.assert_array_equal(np.asarray(choice.scale), 1.0)
  assert choice.error == choice.identity_error


def test_awq_no_worse_than_round_to_nearest_on_unseen_tokens():
  x, w = _layer(5, m=1536)
  x_fit, x_eval, x_test = x[:512], x[512:1024], x[1024:]
  choice = smoothing.search_awq(x_fit, x_eval, w, W4G)
  s = np.asarray(choice.scale)[:, None]
  w_awq = np.asarray(dequantize(quantize(jnp.asarray(s * w), W4G))) / s
  w_rtn = np.asarray(dequantize(quantize(jnp.asarray(w), W4G)))
  assert choice.alpha is not None and choice.error < choice.identity_error
  assert _err(x_test, w, w_awq) < 0.95 * _err(x_test, w, w_rtn)


@pytest.mark.parametrize("call,field", [
    (lambda: smoothing.smoothquant_scales(np.ones(4), np.ones((4, 2)), 1.5), "alpha"),
    (lambda: smoothing.awq_scales(np.ones(4), -0.1), "alpha"),
    (lambda: smoothing.smoothquant_scales(np.ones(4), np.ones((4, 2, 1)), 0.5), "w must"),
    (lambda: smoothing.smoothquant_scales(np.ones(3), np.ones((4, 2)), 0.5),
     "act_absmax"),
    (lambda: smoothing.smooth(np.ones((2, 4)), np.ones((4, 2)), np.ones(5)), "s must"),
    (lambda: smoothing.search_smoothquant(np.ones((4, 4)), np.ones((4, 4)),
                                          np.ones((4, 2)), W8, A8, alphas=(1.2,)),
     "alpha"),
    (lambda: smoothing.search_smoothquant(np.ones((4, 3)), np.ones((4, 4)),
                                          np.ones((4, 2)), W8, A8), "x_fit"),
    (lambda: smoothing.search_smoothquant(np.ones((4, 4)), np.ones((4, 4)),
                                          np.ones((4, 2)), None, None), "spec"),
    (lambda: smoothing.search_awq(np.ones((4, 4)), np.ones((4, 4)), np.ones((4, 2)),
                                  None), "weight spec"),
    (lambda: smoothing.split_tokens(np.ones((4, 4)), holdout=1.0), "holdout"),
    (lambda: smoothing.stats_update(smoothing.stats_init(4), np.ones((2, 3))), "x must"),
])
def test_bad_input_raises_naming_the_field(call, field):
  with pytest.raises(ValueError, match=field):
    call()


def _ref_fake_sym(v, amax, qmax):
  s = np.maximum(np.float32(amax) / np.float32(qmax), np.finfo(np.float32).eps)
  return np.clip(np.round(v / s), -qmax - 1, qmax) * s


@pytest.mark.parametrize("dynamic", [False, True])
def test_scaled_output_error_matches_its_definition(dynamic):
  """quant(x / s) @ quant(s W) against numpy: W per output channel, x per tensor from
  the fit tokens (static) or per token of the evaluated ones (dynamic)."""
  x, w = _layer(6, k=64, n=32, m=64, outliers=((7, 50.0),))
  s = np.asarray(smoothing.smoothquant_scales(np.abs(x).max(0), w, 0.6))
  act = A8.replace(dynamic=True, granularity="channel") if dynamic else A8
  got = float(smoothing.scaled_output_error(x[:32], x[32:], w, s, W8, act))
  xs_fit, xs = (x[:32] / s).astype(np.float32), (x[32:] / s).astype(np.float32)
  sw = (s[:, None] * w).astype(np.float32)
  wq = _ref_fake_sym(sw, np.abs(sw).max(0, keepdims=True), 127)
  amax = np.abs(xs).max(1, keepdims=True) if dynamic else np.abs(xs_fit).max()
  xq = _ref_fake_sym(xs, amax, 127)
  y = x[32:].astype(np.float64) @ w
  want = np.sum((xq.astype(np.float64) @ wq - y) ** 2) / np.sum(y ** 2)
  np.testing.assert_allclose(got, want, rtol=1e-3)
