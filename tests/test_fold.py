"""BatchNorm folding and cross-layer equalization (jaxq.fold)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import fold
from jaxq import quantizer
from jaxq.flax.linen import quantize_model
from jaxq.spec import QuantSpec, Rule
from tests._models import TinyCNN


def _rng(seed=0):
  return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------
# BatchNorm folding
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_conv_bn_matches_float64_reference(with_bias):
  r = _rng(1)
  c = 5
  w = r.normal(size=(3, 3, 4, c)).astype(np.float32)
  b = r.normal(size=c).astype(np.float32) if with_bias else None
  gamma, beta, mean = (r.normal(size=c).astype(np.float32) for _ in range(3))
  var = r.uniform(0.01, 3.0, size=c).astype(np.float32)
  eps = 1e-3
  k2, b2 = fold.fold_conv_bn(w, b, gamma, beta, mean, var, eps)
  f = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
  np.testing.assert_allclose(k2, w * f, rtol=1e-6, atol=1e-6)
  b0 = np.zeros(c) if b is None else b.astype(np.float64)
  np.testing.assert_allclose(b2, beta + (b0 - mean) * f, rtol=1e-5, atol=1e-6)
  assert k2.dtype == jnp.float32


def test_fold_conv_bn_shape_error():
  with pytest.raises(ValueError, match="gamma must have shape"):
    fold.fold_conv_bn(jnp.ones((2, 3)), None, jnp.ones(4), None, jnp.zeros(3), jnp.ones(3))


def _cnn_variables(model, x, seed=0):
  """Initialised variables with non-trivial BN scale/bias and running statistics."""
  v = jax.jit(functools.partial(model.init, train=False))(jax.random.key(seed), x)
  r = _rng(seed + 10)
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: (a * r.uniform(0.5, 2.0, a.shape) + r.normal(size=a.shape) * 0.3
                    if "BatchNorm" in jax.tree_util.keystr(p) else a), v["params"])
  stats = jax.tree_util.tree_map_with_path(
      lambda p, a: (jnp.asarray(r.uniform(0.05, 4.0, a.shape), jnp.float32)
                    if p[-1].key == "var" else jnp.asarray(r.normal(size=a.shape),
                                                           jnp.float32)),
      v["batch_stats"])
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params), stats


def test_find_conv_bn_pairs_tiny_cnn():
  x = jnp.zeros((2, 8, 8, 1))
  pairs = fold.find_conv_bn_pairs(TinyCNN(), x, train=False)
  assert pairs == [("Conv_0", "BatchNorm_0"), ("Conv_1", "BatchNorm_1")]


def test_find_conv_bn_pairs_skips_shared_outputs():
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = nn.Conv(4, (3, 3))(x)
      z = nn.BatchNorm(use_running_average=True)(y)
      return z + nn.Dense(4)(y)  # the conv output has a second consumer

  assert fold.find_conv_bn_pairs(Shared(), jnp.zeros((1, 4, 4, 2))) == []


def test_folded_tiny_cnn_matches_unfolded_eval():
  model = TinyCNN()
  x = jnp.asarray(_rng(3).normal(size=(16, 8, 8, 1)), jnp.float32)
  params, stats = _cnn_variables(model, x)
  ref = jax.jit(functools.partial(model.apply, train=False))(
      {"params": params, "batch_stats": stats}, x)

  pairs = fold.find_conv_bn_pairs(model, x, train=False)
  fparams, fstats = fold.fold_batchnorm(params, stats, pairs)
  folded = fold.FoldedBatchNorm(model, tuple(bn for _, bn in pairs))
  fvars = {"params": fparams, "batch_stats": fstats}
  # Same variable names and shapes as the float model.
  assert (jax.tree.map(jnp.shape, fvars)
          == jax.tree.map(jnp.shape, {"params": params, "batch_stats": stats}))
  out = jax.jit(functools.partial(folded.apply, train=False))(fvars, x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # Static folding for QAT: in training mode the folded BNs stay frozen (no batch stats),
  # so the training-mode forward pass equals the float model's evaluation-mode one.
  out_train, upd = jax.jit(functools.partial(folded.apply, train=True,
                                             mutable=["batch_stats"]))(fvars, x)
  np.testing.assert_allclose(out_train, ref, rtol=1e-5, atol=1e-5)
  chex_equal = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), upd["batch_stats"], fstats)
  assert all(jax.tree.leaves(chex_equal))
  # The plain model in eval mode runs the folded variables too (BN ~ identity + bias).
  out_plain = jax.jit(functools.partial(model.apply, train=False))(fvars, x)
  np.testing.assert_allclose(out_plain, ref, rtol=1e-5, atol=1e-5)
  # The folded conv kernel absorbed gamma / sigma.
  assert not np.allclose(fparams["Conv_0"]["kernel"], params["Conv_0"]["kernel"])
  np.testing.assert_array_equal(fparams["BatchNorm_0"]["scale"], 1.0)
  # Inputs are not modified.
  assert float(jnp.abs(stats["BatchNorm_0"]["mean"]).sum()) > 0


def test_qat_quantizes_the_folded_weights():
  """White paper static folding: the quantizer sees W' = W * gamma / sigma, not W."""
  model = TinyCNN()
  x = jnp.asarray(_rng(8).normal(size=(8, 8, 8, 1)), jnp.float32)
  params, stats = _cnn_variables(model, x, seed=8)
  pairs = fold.find_conv_bn_pairs(model, x, train=False)
  fparams, fstats = fold.fold_batchnorm(params, stats, pairs)
  folded = fold.FoldedBatchNorm(model, tuple(bn for _, bn in pairs))
  wspec = QuantSpec(bits=4)
  qmodel = quantize_model(folded, [Rule("Conv_.*", weight=wspec, act=None)], int8="off")
  fvars = {"params": fparams, "batch_stats": fstats}
  out = jax.jit(functools.partial(qmodel.apply, train=True, mutable=["batch_stats"]))(
      fvars, x)[0]
  qparams = dict(fparams)
  for conv, _ in pairs:
    qparams[conv] = {"kernel": quantizer.fake_quantize(fparams[conv]["kernel"], wspec)}
  ref = jax.jit(functools.partial(folded.apply, train=False))(
      {"params": qparams, "batch_stats": fstats}, x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  unfolded = jax.jit(functools.partial(folded.apply, train=False))(fvars, x)
  assert not np.allclose(out, unfolded, atol=1e-3)


def test_folded_conv_with_bias_puts_bias_in_conv():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Conv(6, (3, 3), use_bias=True)(x)
      x = nn.BatchNorm(use_running_average=not train, epsilon=1e-3)(x)
      x = nn.relu(x)
      x = nn.Dense(7)(x.reshape(x.shape[0], -1))
      return nn.BatchNorm(use_running_average=not train, use_scale=False, epsilon=1e-3)(x)

  model = Net()
  x = jnp.asarray(_rng(4).normal(size=(3, 5, 5, 2)), jnp.float32)
  params, stats = _cnn_variables(model, x, seed=4)
  params = jax.tree.map(lambda a: a + 0.1, params)  # non-zero conv bias
  ref = jax.jit(model.apply)({"params": params, "batch_stats": stats}, x)
  pairs = fold.find_conv_bn_pairs(model, x)
  assert pairs == [("Conv_0", "BatchNorm_0"), ("Dense_0", "BatchNorm_1")]
  fparams, fstats = fold.fold_batchnorm(params, stats, pairs, eps=1e-3)
  np.testing.assert_array_equal(fparams["BatchNorm_0"]["bias"], 0.0)
  folded = fold.FoldedBatchNorm(model, ("BatchNorm_0", "BatchNorm_1"))
  out = jax.jit(functools.partial(folded.apply, train=True, mutable=["batch_stats"]))(
      {"params": fparams, "batch_stats": fstats}, x)[0]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_errors():
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "bn": {"scale": jnp.ones(4)}}
  stats = {"bn": {"mean": jnp.ones(4), "var": jnp.ones(4)}}
  with pytest.raises(ValueError, match="neither layer has a 'bias'"):
    fold.fold_batchnorm(params, stats, [("conv", "bn")])
  with pytest.raises(ValueError, match="no entry 'nope'"):
    fold.fold_batchnorm(params, stats, [("nope", "bn")])
  with pytest.raises(ValueError, match="more than one pair"):
    fold.fold_batchnorm(params, stats, [("conv", "bn"), ("conv", "bn")])
  with pytest.raises(ValueError, match="'mean' and 'var'"):
    fold.fold_batchnorm(params, {"bn": {"mean": jnp.ones(4)}}, [("conv", "bn")])


# ---------------------------------------------------------------------------------------
# Cross-layer equalization
# ---------------------------------------------------------------------------------------


def _int8_tensor(w):
  """Per-tensor symmetric int8 fake quantization (float64 numpy reference)."""
  w = np.asarray(w, np.float64)
  s = np.abs(w).max() / 127.0
  return np.clip(np.round(w / s), -127, 127) * s


def _badly_scaled_mlp(seed=0, din=8, hidden=16, dout=6):
  r = _rng(seed)
  # Channel ranges of W1 spanning three orders of magnitude, compensated by W2 (as after
  # BatchNorm folding, Nagel et al. 2019 fig. 2): every channel matters equally for the
  # output, but per-tensor quantization flushes the small channels of W1 (and the small
  # rows of W2) to zero unless the pair is equalized.
  ch = np.exp(r.uniform(np.log(1e-2), np.log(10.0), hidden))
  w1 = r.normal(size=(din, hidden)) * ch
  b1 = r.normal(size=hidden) * ch
  w2 = r.normal(size=(hidden, dout)) / np.sqrt(hidden) / ch[:, None]
  b2 = r.normal(size=dout)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return {"l1": {"kernel": f32(w1), "bias": f32(b1)},
          "l2": {"kernel": f32(w2), "bias": f32(b2)}}


def _mlp(p, x):
  h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
  return h @ p["l2"]["kernel"] + p["l2"]["bias"]


def _qerror(fn, p, x):
  ref = np.asarray(fn(p, x), np.float64)
  pq = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.asarray(_int8_tensor(a), jnp.float32)
      if path[-1].key == "kernel" else a, p)
  return float(np.mean((np.asarray(fn(pq, x), np.float64) - ref) ** 2))


def test_equalize_dense_relu_dense():
  p = _badly_scaled_mlp()
  x = jnp.asarray(_rng(5).normal(size=(64, 8)), jnp.float32)
  pe = fold.equalize(p, [("l1", "l2")])
  np.testing.assert_allclose(_mlp(pe, x), _mlp(p, x), rtol=1e-5, atol=1e-5)
  r1 = np.abs(np.asarray(pe["l1"]["kernel"])).max(0)
  r2 = np.abs(np.asarray(pe["l2"]["kernel"])).max(1)
  np.testing.assert_allclose(r1, r2, rtol=1e-5)
  r1o = np.abs(np.asarray(p["l1"]["kernel"], np.float64)).max(0)
  r2o = np.abs(np.asarray(p["l2"]["kernel"], np.float64)).max(1)
  np.testing.assert_allclose(r1, np.sqrt(r1o * r2o), rtol=1e-5)
  np.testing.assert_array_equal(pe["l2"]["bias"], p["l2"]["bias"])
  before, after = _qerror(_mlp, p, x), _qerror(_mlp, pe, x)
  assert after < 0.1 * before, (before, after)


def _cnn2(p, x):
  dn = ("NHWC", "HWIO", "NHWC")
  h = jax.lax.conv_general_dilated(x, p["c1"]["kernel"], (1, 1), "SAME",
                                   dimension_numbers=dn) + p["c1"]["bias"]
  h = jax.nn.relu(h)
  return jax.lax.conv_general_dilated(h, p["c2"]["kernel"], (1, 1), "SAME",
                                      dimension_numbers=dn) + p["c2"]["bias"]


def test_equalize_conv_relu_conv():
  r = _rng(6)
  ch = np.exp(r.uniform(np.log(1e-2), np.log(10.0), 8))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  p = {"c1": {"kernel": f32(r.normal(size=(3, 3, 3, 8)) * ch),
              "bias": f32(r.normal(size=8) * ch)},
       "c2": {"kernel": f32(r.normal(size=(3, 3, 8, 4)) * 0.2 / ch[:, None]),
              "bias": f32(r.normal(size=4))}}
  x = f32(r.normal(size=(4, 6, 6, 3)))
  pe = fold.equalize(p, [("c1", "c2")])
  np.testing.assert_allclose(_cnn2(pe, x), _cnn2(p, x), rtol=1e-4, atol=1e-4)
  r1 = np.abs(np.asarray(pe["c1"]["kernel"])).max((0, 1, 2))
  r2 = np.abs(np.asarray(pe["c2"]["kernel"])).max((0, 1, 3))
  np.testing.assert_allclose(r1, r2, rtol=1e-5)
  assert _qerror(_cnn2, pe, x) < 0.1 * _qerror(_cnn2, p, x)


def test_equalize_chain_zero_channels_and_errors():
  r = _rng(7)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  w1 = r.normal(size=(4, 5)) * np.array([1.0, 0.0, 10.0, 0.1, 3.0])  # a dead channel
  p = {"a": {"kernel": f32(w1)}, "b": {"kernel": f32(r.normal(size=(5, 5)))},
       "c": {"kernel": f32(r.normal(size=(5, 2))), "bias": f32(r.normal(size=2))}}
  s = fold.equalization_scales(p["a"]["kernel"], p["b"]["kernel"])
  assert float(s[1]) == 1.0 and bool(jnp.all(jnp.isfinite(s)))

  def net(q, x):
    h = jax.nn.relu(x @ q["a"]["kernel"])
    h = jax.nn.relu(h @ q["b"]["kernel"])
    return h @ q["c"]["kernel"] + q["c"]["bias"]

  x = f32(r.normal(size=(10, 4)))
  pe = fold.equalize(p, [("a", "b"), ("b", "c")], iterations=5)
  np.testing.assert_allclose(net(pe, x), net(p, x), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="must match"):
    fold.equalize(p, [("c", "a")])
  with pytest.raises(ValueError, match="iterations"):
    fold.equalize(p, [("a", "b")], iterations=0)
  with pytest.raises(ValueError, match="no 'kernel'"):
    fold.equalize({"a": {"w": 1}, "b": p["b"]}, [("a", "b")])
