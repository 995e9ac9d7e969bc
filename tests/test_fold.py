"""BatchNorm folding and cross-layer equalization (jaxq.fold)."""

from __future__ import annotations

import functools
from typing import Any

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


# --- grouped / depthwise second layers, depthwise chains, folded biases (issue 17) ----


def _np_input_multiplier(w2, channels, s):
  """float64 reference: W2's weights reading input channel i (of `channels`), times s_i."""
  w2 = np.array(w2, np.float64)
  per, out = w2.shape[-2], w2.shape[-1]
  og = out // (channels // per)
  for i in range(channels):
    g, j = divmod(i, per)
    w2[..., j, g * og:(g + 1) * og] *= s[i]
  return w2


def _np_input_ranges(w2, channels):
  w2 = np.abs(np.asarray(w2, np.float64))
  per, out = w2.shape[-2], w2.shape[-1]
  og = out // (channels // per)
  return np.array([w2[..., i % per, (i // per) * og:(i // per + 1) * og].max()
                   for i in range(channels)])


def _np_out_ranges(w):
  w = np.abs(np.asarray(w, np.float64))
  return w.reshape(-1, w.shape[-1]).max(0)


def _np_cle_pair(w1, w2):
  """Nagel et al. 2019 eq. (10) written plainly: s_i = sqrt(r1_i r2_i) / r2_i."""
  r1, r2 = _np_out_ranges(w1), _np_input_ranges(w2, np.shape(w1)[-1])
  s = np.sqrt(r1 * r2) / r2
  return np.asarray(w1, np.float64) / s, _np_input_multiplier(w2, len(s), s), s


def _np_cle_chain(wa, wb, wc):
  """A -> B (depthwise) -> C: ranges rA / s1 = rB s1 / s2 = rC s2 = cbrt(rA rB rC)."""
  ra, rb, rc = _np_out_ranges(wa), _np_out_ranges(wb), _np_input_ranges(wc, wa.shape[-1])
  m = np.cbrt(ra * rb * rc)
  s1, s2 = ra / m, m / rc
  return (np.asarray(wa, np.float64) / s1, np.asarray(wb, np.float64) * (s1 / s2),
          _np_input_multiplier(wc, len(s2), s2), s1, s2)


def _unbalanced(r, shape):
  """Gaussian weights whose output channels span three orders of magnitude."""
  ch = np.exp(r.uniform(np.log(1e-2), np.log(10.0), shape[-1]))
  return np.asarray(r.normal(size=shape) * ch, np.float32)


@pytest.mark.parametrize("in_per_group,out", [(1, 12), (1, 24), (3, 12), (4, 6), (12, 5)])
def test_equalize_grouped_second_layer_matches_float64_reference(in_per_group, out):
  """Depthwise (1 input per group, multiplier 1 or 2), grouped and dense second layers."""
  r = _rng(20)
  w1 = _unbalanced(r, (1, 1, 6, 12))
  w2 = np.asarray(r.normal(size=(3, 3, in_per_group, out)), np.float32)
  b1 = np.asarray(r.normal(size=12), np.float32)
  p = {"a": {"kernel": jnp.asarray(w1), "bias": jnp.asarray(b1)},
       "b": {"kernel": jnp.asarray(w2)}}
  w1_ref, w2_ref, s = _np_cle_pair(w1, w2)
  np.testing.assert_allclose(fold.equalization_scales(w1, w2), s, rtol=1e-6)
  pe = fold.equalize(p, [("a", "b")])
  np.testing.assert_allclose(pe["a"]["kernel"], w1_ref, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(pe["a"]["bias"], b1 / s, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(pe["b"]["kernel"], w2_ref, rtol=1e-6, atol=1e-7)
  m = np.sqrt(_np_out_ranges(w1) * _np_input_ranges(w2, 12))
  np.testing.assert_allclose(_np_out_ranges(pe["a"]["kernel"]), m, rtol=1e-6)
  np.testing.assert_allclose(_np_input_ranges(pe["b"]["kernel"], 12), m, rtol=1e-6)


def test_equalize_depthwise_chain_closed_form():
  """conv -> depthwise -> conv: the closed form matches float64 and the pairwise limit."""
  r = _rng(21)
  wa, wb = _unbalanced(r, (1, 1, 4, 8)), _unbalanced(r, (3, 3, 1, 8))
  wc = np.asarray(r.normal(size=(1, 1, 8, 6)), np.float32)
  ba, bb = (np.asarray(r.normal(size=8), np.float32) for _ in range(2))
  p = {"a": {"kernel": jnp.asarray(wa)}, "bn_a": {"bias": jnp.asarray(ba)},
       "b": {"kernel": jnp.asarray(wb), "bias": jnp.asarray(bb)}, "c": {"kernel": wc}}
  pairs = [("a", "b", ("bn_a",)), ("b", "c")]
  pe = fold.equalize(p, pairs)
  wa_ref, wb_ref, wc_ref, s1, s2 = _np_cle_chain(wa, wb, wc)
  for name, ref in (("a", wa_ref), ("b", wb_ref), ("c", wc_ref)):
    np.testing.assert_allclose(pe[name]["kernel"], ref, rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(pe["bn_a"]["bias"], ba / s1, rtol=2e-6)
  np.testing.assert_allclose(pe["b"]["bias"], bb / s2, rtol=2e-6)
  m = np.cbrt(_np_out_ranges(wa) * _np_out_ranges(wb) * _np_input_ranges(wc, 8))
  for ranges in (_np_out_ranges(pe["a"]["kernel"]), _np_out_ranges(pe["b"]["kernel"]),
                 _np_input_ranges(pe["c"]["kernel"], 8)):
    np.testing.assert_allclose(ranges, m, rtol=1e-5)
  # Equalizing the two pairs one at a time, over and over, converges to the same point.
  q = p
  for _ in range(60):
    q = fold.equalize(fold.equalize(q, pairs[:1]), pairs[1:])
  for name in "abc":
    np.testing.assert_allclose(q[name]["kernel"], pe[name]["kernel"], rtol=1e-4, atol=1e-7)
  # A second pass leaves the closed form where it is.
  pe2 = fold.equalize(p, pairs, iterations=2)
  np.testing.assert_allclose(pe2["b"]["kernel"], pe["b"]["kernel"], rtol=1e-5, atol=1e-7)


def test_equalize_pair_errors():
  r = _rng(22)
  p = {"a": {"kernel": jnp.asarray(r.normal(size=(1, 1, 4, 6)), jnp.float32)},
       "b": {"kernel": jnp.asarray(r.normal(size=(3, 3, 4, 6)), jnp.float32)},
       "c": {"kernel": jnp.asarray(r.normal(size=(3, 3, 6, 2)), jnp.float32)},
       "bn": {"bias": jnp.zeros(5)}, "ln": {"scale": jnp.ones(6)}}
  with pytest.raises(ValueError, match=r"'a', 'b'.*must match.*reads 4 per group, so 6"):
    fold.equalize(p, [("a", "b")])  # 6 channels, groups of 4
  with pytest.raises(ValueError, match="first layer of more than one pair"):
    fold.equalize(p, [("a", "c"), ("a", "c")])
  with pytest.raises(ValueError, match="second layer of more than one pair"):
    fold.equalize(p, [("a", "c"), ("b", "c")])
  with pytest.raises(ValueError, match=r"params\['bn'\]\['bias'\] must have shape \(6,\)"):
    fold.equalize(p, [("a", "c", ("bn",))])
  with pytest.raises(ValueError, match=r"params\['ln'\].*has no 'bias'"):
    fold.equalize(p, [("a", "c", ("ln",))])
  with pytest.raises(ValueError, match="bias_paths.*tuple of layer paths"):
    fold.equalize(p, [("a", "c", "ln")])
  with pytest.raises(ValueError, match="same layer twice"):
    fold.equalize(p, [("c", "c")])


class _InvertedResidual(nn.Module):
  """MobileNetV2 block: 1x1 expand -> BN -> act -> 3x3 depthwise -> BN -> act -> 1x1 -> BN."""

  out: int
  expand: int
  act: Any = nn.relu
  use_bias: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    bn = functools.partial(nn.BatchNorm, use_running_average=not train)
    conv = functools.partial(nn.Conv, use_bias=self.use_bias)
    h = x
    if self.expand != 1:
      h = self.act(bn()(conv(x.shape[-1] * self.expand, (1, 1))(h)))
    h = self.act(bn()(conv(h.shape[-1], (3, 3), feature_group_count=h.shape[-1])(h)))
    h = bn()(conv(self.out, (1, 1))(h))
    return x + h if x.shape[-1] == self.out else h


class _MobileNetLike(nn.Module):
  act: Any = nn.relu
  use_bias: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    bn = functools.partial(nn.BatchNorm, use_running_average=not train)
    x = self.act(bn()(nn.Conv(8, (3, 3), strides=2, use_bias=self.use_bias)(x)))
    for out, expand in ((8, 1), (12, 4), (12, 4)):
      x = _InvertedResidual(out, expand, self.act, self.use_bias)(x)
    x = self.act(bn()(nn.Conv(24, (1, 1), use_bias=self.use_bias)(x)))
    return nn.Dense(10)(x.mean((1, 2)))


_MOBILENET_PAIRS = [  # (first, second): every pair not separated by a residual sum
    ("_InvertedResidual_0/Conv_0", "_InvertedResidual_0/Conv_1"),
    ("_InvertedResidual_1/Conv_0", "_InvertedResidual_1/Conv_1"),
    ("_InvertedResidual_1/Conv_1", "_InvertedResidual_1/Conv_2"),
    ("_InvertedResidual_2/Conv_0", "_InvertedResidual_2/Conv_1"),
    ("_InvertedResidual_2/Conv_1", "_InvertedResidual_2/Conv_2"),
    ("Conv_1", "Dense_0"),
]


def _at(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _unbalance(params, pairs, seed):
  """Rescales each pair's channels by factors in [1e-2, 10] (the function is unchanged),
  as BatchNorm folding leaves a pretrained net (Nagel et al. 2019, fig. 2)."""
  r = _rng(seed)
  out = jax.tree.map(lambda a: np.array(a, np.float64), params)
  for first, second, biases in pairs:
    layer = _at(out, first)
    c = np.exp(r.uniform(np.log(1e-2), np.log(10.0), layer["kernel"].shape[-1]))
    layer["kernel"] = layer["kernel"] * c
    for owner in ((first,) if "bias" in layer else ()) + tuple(biases):
      _at(out, owner)["bias"] = _at(out, owner)["bias"] * c
    k2 = _at(out, second)["kernel"]
    _at(out, second)["kernel"] = _np_input_multiplier(k2, len(c), 1 / c)
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), out)


def _rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _w8_tensor(params):
  """Per-tensor symmetric int8 fake quantization of every kernel (float64 numpy)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.asarray(_int8_tensor(a), jnp.float32) if p[-1].key == "kernel" else a,
      params)


def _random_variables(model, x, seed):
  """Random params and BatchNorm statistics, drawn in numpy (no init to compile)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  r = _rng(seed)

  def draw(path, a):
    name = path[-1].key
    if name == "kernel":
      return r.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]))
    return {"scale": lambda: r.uniform(0.5, 2.0, a.shape), "var": lambda: r.uniform(
        0.05, 4.0, a.shape)}.get(name, lambda: r.normal(size=a.shape) * 0.3)()

  v = jax.tree_util.tree_map_with_path(lambda p, a: jnp.asarray(draw(p, a), jnp.float32),
                                       shapes)
  return v["params"], v.get("batch_stats", {})


@pytest.mark.parametrize("use_bias", [False, True])
def test_fold_then_equalize_mobilenet_like_keeps_function(use_bias):
  """Issue 17: folded BN shifts are scaled with their channel, depthwise pairs and chains
  are equalized, the float output does not move, and per-tensor W8 error drops."""
  model = _MobileNetLike(use_bias=use_bias)
  x = jnp.asarray(_rng(30).normal(size=(4, 16, 16, 3)), jnp.float32)
  params, stats = _random_variables(model, x, seed=30)
  ref = jax.jit(model.apply)({"params": params, "batch_stats": stats}, x)
  bn_pairs = fold.find_conv_bn_pairs(model, x)
  fparams, fstats = fold.fold_batchnorm(params, stats, bn_pairs)
  folded = fold.FoldedBatchNorm(model, tuple(bn for _, bn in bn_pairs))
  apply = jax.jit(lambda p, x: folded.apply({"params": p, "batch_stats": fstats}, x))

  pairs = fold.find_equalization_pairs(apply, fparams, x)
  assert [(p.first, p.second) for p in pairs] == _MOBILENET_PAIRS
  bn_of = dict(bn_pairs)
  assert all(p.biases == (bn_of[p.first],) for p in pairs)
  fparams = _unbalance(fparams, pairs, seed=31)
  y = apply(fparams, x)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))

  eparams = fold.equalize(fparams, pairs)
  assert _rel_l2(apply(eparams, x), y) < 1e-5
  # The bug of issue 17: leaving the folded shifts out changes the function.
  if not use_bias:
    wrong = fold.equalize(fparams, [(p.first, p.second) for p in pairs])
    assert _rel_l2(apply(wrong, x), y) > 0.1
  before = _rel_l2(apply(_w8_tensor(fparams), x), y)
  after = _rel_l2(apply(_w8_tensor(eparams), x), y)
  assert after < 0.5 * before, (before, after)


def test_find_equalization_pairs_grouped_and_refusals():
  class Net(nn.Module):
    act: Any = nn.relu

    @nn.compact
    def __call__(self, x):
      x = self.act(nn.Conv(8, (3, 3))(x))
      x = nn.leaky_relu(nn.Conv(16, (3, 3), feature_group_count=8)(x))  # multiplier 2
      x = nn.relu(nn.Conv(12, (1, 1), feature_group_count=4)(x))  # 4 groups
      return nn.Dense(5)(x.reshape(x.shape[0], -1))  # a flatten spreads the channels

  x = jnp.asarray(_rng(32).normal(size=(2, 6, 6, 3)), jnp.float32)
  params = _random_variables(Net(), x, seed=32)[0]
  fn = lambda act: (lambda p, x: Net(act).apply({"params": p}, x))
  with pytest.raises(ValueError, match=r"'Conv_2' -> 'Dense_0': `reshape` moves or mixes"):
    fold.find_equalization_pairs(fn(nn.relu), params, x)
  pairs = fold.find_equalization_pairs(fn(nn.relu), params, x, unprovable="skip")
  assert [tuple(p) for p in pairs] == [("Conv_0", "Conv_1", ()), ("Conv_1", "Conv_2", ())]
  p = _unbalance(params, pairs, seed=33)
  pe = fold.equalize(p, pairs, iterations=3)
  assert _rel_l2(fn(nn.relu)(pe, x), fn(nn.relu)(p, x)) < 1e-5
  for act, why in ((nn.relu6, "'Conv_0' -> 'Conv_1': `min` with 6.0 clips it"),
                   (nn.silu, "'Conv_0' -> 'Conv_1': `logistic` is not"),
                   (nn.gelu, "'Conv_0' -> 'Conv_1'")):
    with pytest.raises(ValueError, match=why):
      fold.find_equalization_pairs(fn(act), params, x)
  with pytest.raises(ValueError, match="unprovable must be"):
    fold.find_equalization_pairs(fn(nn.relu), params, x, unprovable="warn")


def test_find_equalization_pairs_refuses_unfolded_batchnorm():
  model = _MobileNetLike()
  x = jnp.asarray(_rng(34).normal(size=(2, 8, 8, 3)), jnp.float32)
  params, stats = _random_variables(model, x, seed=34)  # non-zero running means
  apply = lambda p, x: model.apply({"params": p, "batch_stats": stats}, x)
  with pytest.raises(ValueError, match="not a per-channel 'bias' parameter.*fold it first"):
    fold.find_equalization_pairs(apply, params, x)


def test_fold_then_equalize_nnx_pure_dicts():
  """NNX: the same functions on pure dicts (list entries keyed by int) and nnx.merge."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  rngs = nnx.Rngs(0)
  bn = lambda: nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
  model = nnx.Sequential(
      nnx.Conv(3, 8, (1, 1), use_bias=False, rngs=rngs), bn(), nnx.relu,
      nnx.Conv(8, 8, (3, 3), feature_group_count=8, use_bias=False, rngs=rngs), bn(),
      nnx.relu, nnx.Conv(8, 4, (1, 1), rngs=rngs))
  graphdef, pstate, sstate = nnx.split(model, nnx.Param, nnx.BatchStat)
  r = _rng(40)
  draw = lambda tree, lo: jax.tree.map(
      lambda a: jnp.asarray(r.uniform(lo, 2.0, a.shape), jnp.float32), nnx.to_pure_dict(tree))
  params, stats = draw(pstate, -2.0), draw(sstate, 0.1)

  @jax.jit
  def apply(p, s, x):
    ps, ss = jax.tree.map(lambda a: a, pstate), jax.tree.map(lambda a: a, sstate)
    nnx.replace_by_pure_dict(ps, p)
    nnx.replace_by_pure_dict(ss, s)
    return nnx.merge(graphdef, ps, ss)(x)

  x = jnp.asarray(r.normal(size=(2, 6, 6, 3)), jnp.float32)
  ref = apply(params, stats, x)
  fparams, fstats = fold.fold_batchnorm(params, stats, [("layers/0", "layers/1"),
                                                        ("layers/3", "layers/4")])
  pairs = fold.find_equalization_pairs(lambda p, x: apply(p, fstats, x), fparams, x)
  assert [tuple(p) for p in pairs] == [("layers/0", "layers/3", ("layers/1",)),
                                       ("layers/3", "layers/6", ("layers/4",))]
  eparams = fold.equalize(fparams, pairs)
  assert not np.allclose(eparams["layers"][3]["kernel"], fparams["layers"][3]["kernel"])
  assert _rel_l2(apply(eparams, fstats, x), ref) < 1e-5


def test_find_equalization_pairs_plain_functions():
  """Any function of the params tree; outputs that also go elsewhere are not pairs."""
  r = _rng(41)
  p = {"a": {"kernel": r.normal(size=(4, 6)), "bias": r.normal(size=6)},
       "b": {"kernel": r.normal(size=(6, 6))}, "c": {"kernel": r.normal(size=(6, 3))}}
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
  x = jnp.asarray(r.normal(size=(5, 4)), jnp.float32)
  a = lambda q, x: x @ q["a"]["kernel"] + q["a"]["bias"]
  find = lambda f: [tuple(e) for e in fold.find_equalization_pairs(f, p, x)]

  def where_relu(q, x):
    h = a(q, x)
    return jnp.where(h > 0, h, 0.0) @ q["b"]["kernel"]

  homogeneous = [
      where_relu,
      lambda q, x: (0.5 * nn.leaky_relu(a(q, x))) @ q["b"]["kernel"],
      lambda q, x: jnp.maximum(a(q, x), 0.0).reshape(5, 1, 6).mean(1) @ q["b"]["kernel"],
  ]
  for f in homogeneous:
    assert find(f) == [("a", "b", ())]
    assert _rel_l2(f(fold.equalize(p, find(f)), x), f(p, x)) < 1e-5
  not_pairs = [
      lambda q, x: (nn.relu(a(q, x)) @ q["b"]["kernel"], a(q, x)),  # also an output
      lambda q, x: nn.relu(a(q, x)) @ q["b"]["kernel"] + q["a"]["bias"].sum(),  # bias reused
      lambda q, x: (nn.relu(a(q, x)) + x.sum(1, keepdims=True)) @ q["b"]["kernel"],  # a sum
      lambda q, x: (nn.relu(a(q, x)) @ q["b"]["kernel"]) @ q["b"]["kernel"],  # shared kernel
  ]
  for f in not_pairs:
    assert find(f) == []
  chain = lambda q, x: nn.relu(nn.relu(a(q, x)) @ q["b"]["kernel"]) @ q["c"]["kernel"]
  assert find(chain) == [("a", "b", ()), ("b", "c", ())]


def test_equalize_dtypes_and_degenerate_channels():
  """bf16 kernels keep their dtype; dead, NaN and Inf channels keep scale 1 and stay local."""
  r = _rng(42)
  wa = _unbalanced(r, (1, 1, 3, 6))
  wa[..., 1] = 0.0  # a dead channel
  wa[0, 0, 0, 2] = np.nan
  wb = np.asarray(r.normal(size=(3, 3, 1, 6)), np.float32)
  wb[1, 1, 0, 4] = np.inf
  wc = np.asarray(r.normal(size=(1, 1, 6, 2)), np.float32)
  p = {"a": {"kernel": jnp.asarray(wa, jnp.bfloat16)}, "b": {"kernel": jnp.asarray(wb)},
       "c": {"kernel": jnp.asarray(wc)}}
  pe = fold.equalize(p, [("a", "b"), ("b", "c")])
  wa_bf16 = np.asarray(p["a"]["kernel"], np.float32)
  assert pe["a"]["kernel"].dtype == jnp.bfloat16 and pe["b"]["kernel"].dtype == jnp.float32
  ka, kb = np.asarray(pe["a"]["kernel"], np.float32), np.asarray(pe["b"]["kernel"])
  for ch in (1, 2, 4):  # unchanged (bf16 round trip aside)
    np.testing.assert_array_equal(ka[..., ch], wa_bf16[..., ch])
    np.testing.assert_array_equal(kb[..., ch], wb[..., ch])
  ok = [0, 3, 5]
  assert np.all(np.isfinite(ka[..., ok])) and np.all(np.isfinite(kb[..., ok]))
  assert not np.allclose(kb[..., ok], wb[..., ok])
