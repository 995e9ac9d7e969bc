"""BatchNorm folding and cross-layer equalization of Flax NNX models (jaxq.fold.nnx)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq.nnx
from jaxq import fold
from jaxq.flax.linen import quantize_model
from jaxq.spec import QuantSpec, Rule

C_IN, C1, C2, CLASSES = 3, 5, 7, 3  # odd channel counts
PAIRS = [("conv1", "bn1"), ("dw", "bn2"), ("conv3", "bn3"), ("lin", "bnh")]


class Net(nnx.Module):
  """Conv (no bias) -> BN, depthwise conv -> BN, 1x1 conv -> BN (no scale), Linear -> BN."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(C_IN, C1, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(C1, rngs=rngs)
    self.dw = nnx.Conv(C1, C1, (3, 3), strides=2, feature_group_count=C1, rngs=rngs)
    self.bn2 = nnx.BatchNorm(C1, epsilon=1e-3, rngs=rngs)
    self.conv3 = nnx.Conv(C1, C2, (1, 1), use_bias=False, rngs=rngs)
    self.bn3 = nnx.BatchNorm(C2, use_scale=False, rngs=rngs)
    self.lin = nnx.Linear(C2, CLASSES, rngs=rngs)
    self.bnh = nnx.BatchNorm(CLASSES, use_bias=False, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.dw(x)))
    x = nnx.relu(self.bn3(self.conv3(x)))
    return self.bnh(self.lin(x.mean((1, 2))))


class LinenNet(nn.Module):
  """The Linen twin of :class:`Net` (same variable names and shapes)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = functools.partial(nn.BatchNorm, use_running_average=not train)
    x = nn.relu(bn(name="bn1")(nn.Conv(C1, (3, 3), use_bias=False, name="conv1")(x)))
    x = nn.Conv(C1, (3, 3), strides=2, feature_group_count=C1, name="dw")(x)
    x = nn.relu(bn(epsilon=1e-3, name="bn2")(x))
    x = nn.Conv(C2, (1, 1), use_bias=False, name="conv3")(x)
    x = nn.relu(bn(use_scale=False, name="bn3")(x))
    return bn(use_bias=False, name="bnh")(nn.Dense(CLASSES, name="lin")(x.mean((1, 2))))


def _random_model(make, seed: int):
  """``make()`` built abstractly (no initializer runs), then random params (non-trivial
  BatchNorm affine maps) and running statistics; returns ``(model, params, stats)``."""
  model = nnx.eval_shape(make)
  r = np.random.default_rng(seed)
  draw = lambda path, a: jnp.asarray(
      r.uniform(0.05, 4.0, a.shape) if path[-1].key == "var" else r.normal(size=a.shape),
      jnp.float32)
  params, stats = (jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(
      nnx.state(model, kind))) for kind in (nnx.Param, nnx.BatchStat))
  nnx.update(model, params)
  nnx.update(model, stats)
  return model, params, stats


def _np_fold(kernel, bias, bn: dict, stats: dict, eps: float):
  """Float64 reference: ``k * g / sqrt(v + eps)``, ``beta + (b - mean) * g / sqrt(v + eps)``."""
  f64 = lambda a: np.asarray(a, np.float64)
  mean, var = f64(stats["mean"]), f64(stats["var"])
  gamma = f64(bn.get("scale", np.ones_like(mean)))
  beta = f64(bn.get("bias", np.zeros_like(mean)))
  b = np.zeros_like(mean) if bias is None else f64(bias)
  factor = gamma / np.sqrt(var + eps)
  lead = mean.ndim - 1  # stacking axes
  k = f64(kernel)
  per_output = factor.reshape(factor.shape[:lead] + (1,) * (k.ndim - lead - 1) + (-1,))
  return k * per_output, beta + (b - mean) * factor


run = nnx.jit(lambda model, x: model(x))  # one compilation per model structure


def _x(seed, shape=(4, 9, 7, C_IN)):  # odd spatial sizes
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_fold_nnx_matches_float64_reference_and_original():
  model, params, stats = _random_model(lambda: Net(nnx.Rngs(0)), 1)
  model.eval()
  x = _x(2)
  ref = run(model, x)
  pairs = fold.find_conv_bn_pairs_nnx(model, x)
  assert pairs == PAIRS
  folded = fold.fold_batchnorm_nnx(model, pairs)
  assert isinstance(model.bn1, nnx.BatchNorm) and model.conv1.bias is None  # a copy
  eps = {"bn1": 1e-5, "bn2": 1e-3, "bn3": 1e-5, "bnh": 1e-5}
  fparams = nnx.to_pure_dict(nnx.state(folded, nnx.Param))
  assert sorted(fparams) == ["conv1", "conv3", "dw", "lin"]  # the BatchNorms are gone
  assert not jax.tree.leaves(nnx.state(folded, nnx.BatchStat))
  for layer, bn in pairs:
    k, b = _np_fold(params[layer]["kernel"], params[layer].get("bias"), params[bn],
                    stats[bn], eps[bn])
    np.testing.assert_allclose(fparams[layer]["kernel"], k, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fparams[layer]["bias"], b, rtol=1e-5, atol=1e-6)
    assert isinstance(getattr(folded, bn), fold.FoldedIdentity)
    assert getattr(folded, bn).folded_into == layer
  assert folded.conv1.use_bias and folded.conv1.bias.get_value().dtype == jnp.float32
  half = jnp.ones((2, C1), jnp.bfloat16)
  assert folded.bn1(half).dtype == model.bn1(half).dtype == jnp.float32  # BN's promotion
  np.testing.assert_allclose(run(folded, x), ref, rtol=1e-5, atol=1e-5)
  # Static folding: training mode runs the same function (no batch statistics).
  folded.train()
  np.testing.assert_allclose(folded(x), ref, rtol=1e-5, atol=1e-5)


class Block(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(6, 6, (3,), use_bias=False, rngs=rngs)  # 1-D conv
    self.bn = nnx.BatchNorm(6, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.conv(x)))


class Stacked(nnx.Module):
  """Three 1-D conv blocks stacked by nnx.vmap, run by nnx.scan; a Sequential head."""

  def __init__(self, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(rngs)

    self.blocks = make(rngs)
    self.head = nnx.Sequential(nnx.Linear(6, 5, rngs=rngs), nnx.BatchNorm(5, rngs=rngs))

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.head(body(x, self.blocks))  # Linear + BN on (batch, time, features)


def test_fold_nnx_stacked_layers_and_sequential():
  model, params, stats = _random_model(lambda: Stacked(nnx.Rngs(0)), 3)
  model.eval()
  x = _x(4, (2, 11, 6))
  pairs = fold.find_conv_bn_pairs_nnx(model, x)
  assert pairs == [("blocks/conv", "blocks/bn"), ("head/layers/0", "head/layers/1")]
  folded = fold.fold_batchnorm_nnx(model, pairs)
  fparams = nnx.to_pure_dict(nnx.state(folded, nnx.Param))
  k, b = _np_fold(params["blocks"]["conv"]["kernel"], None, params["blocks"]["bn"],
                  stats["blocks"]["bn"], 1e-5)
  assert k.shape == (3, 3, 6, 6) and b.shape == (3, 6)
  np.testing.assert_allclose(fparams["blocks"]["conv"]["kernel"], k, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(fparams["blocks"]["conv"]["bias"], b, rtol=1e-5, atol=1e-6)
  assert isinstance(folded.head.layers[1], fold.FoldedIdentity)
  with pytest.raises(ValueError, match="same leading \\(stacking\\) axes"):
    fold.fold_conv_bn(np.ones((5, 6, 6)), None, None, None, stats["blocks"]["bn"]["mean"],
                      stats["blocks"]["bn"]["var"])
  np.testing.assert_allclose(run(folded, x), run(model, x), rtol=1e-5, atol=1e-5)


class Unfoldable(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.after_relu = nnx.BatchNorm(4, rngs=rngs)
    self.shared = nnx.Conv(4, 4, (1, 1), rngs=rngs)
    self.bn_shared = nnx.BatchNorm(4, rngs=rngs)
    self.proj = nnx.LinearGeneral(4, (2, 2), rngs=rngs)
    self.bn_proj = nnx.BatchNorm(2, rngs=rngs)
    self.lin = nnx.Linear(4, 4, rngs=rngs)
    self.lin_axis = nnx.Linear(4, 4, rngs=rngs)
    self.bn_axis = nnx.BatchNorm(5, axis=1, rngs=rngs)
    self.twice = nnx.Linear(4, 4, rngs=rngs)
    self.bn_twice = nnx.BatchNorm(4, rngs=rngs)
    self.ok = nnx.Linear(4, 4, use_bias=False, rngs=rngs)
    self.post = nnx.Sequential(nnx.BatchNorm(4, rngs=rngs), nnx.relu)  # hands it on

  def __call__(self, x):
    h = self.after_relu(nnx.relu(self.conv(x)))
    y = self.shared(h)
    h = self.bn_shared(y) + self.lin(y)  # the conv output also feeds 'lin'
    v = h.mean((1, 2))
    p = self.bn_proj(self.proj(v))
    a = self.bn_axis(self.lin_axis(h))  # normalizes axis 1 of (batch, 5, 5, 4)
    t = self.bn_twice(self.twice(v)) + self.twice(v)  # 'twice' is called twice
    return p.sum() + a.sum() + t.sum() + self.post(self.ok(v)).sum()


def test_find_pairs_nnx_names_unfoldable_batchnorms():
  model = nnx.eval_shape(lambda: Unfoldable(nnx.Rngs(0)))
  x = jax.ShapeDtypeStruct((2, 5, 5, 3), jnp.float32)
  with pytest.raises(ValueError) as err:
    fold.find_conv_bn_pairs_nnx(model, x)
  msg = str(err.value)
  for expected in ["'after_relu': its input is not the output of a module",
                   "'bn_shared': the output of 'shared' also feeds 'lin'",
                   "'bn_proj': its input is the output of 'proj' (LinearGeneral)",
                   "'bn_axis': it normalizes axis 1",
                   "'bn_twice': its input layer 'twice' is called 2 times"]:
    assert expected in msg, msg
  assert "post" not in msg
  ok = ("ok", "post/layers/0")
  assert fold.find_conv_bn_pairs_nnx(model, x, unfoldable="skip") == [ok]
  with pytest.raises(ValueError, match="unfoldable must be"):
    fold.find_conv_bn_pairs_nnx(model, x, unfoldable="ignore")
  with pytest.raises(ValueError, match="no module at 'nope'"):
    fold.fold_batchnorm_nnx(model, [("nope", "bn_proj")])
  with pytest.raises(ValueError, match="'bn_proj' is a BatchNorm, not an nnx.Conv"):
    fold.fold_batchnorm_nnx(model, [("bn_proj", "ok")])
  with pytest.raises(ValueError, match="more than one pair"):
    fold.fold_batchnorm_nnx(model, [ok, ("lin", "post/layers/0")], inplace=True)
  assert model.ok.bias is None  # nothing changed on failure


def test_equalize_nnx_docstring_example():
  """The package docstring's NNX example: fold, then CLE on the params pure dict."""
  def make():
    rngs = nnx.Rngs(0)
    return nnx.Sequential(nnx.Conv(3, 8, (1, 1), use_bias=False, rngs=rngs),
                          nnx.BatchNorm(8, rngs=rngs), nnx.relu,
                          nnx.Conv(8, 4, (3, 3), rngs=rngs))

  model, _, _ = _random_model(make, 5)
  model.eval()
  x = _x(6, (2, 6, 5, 3))
  ref = model(x)

  model = fold.fold_batchnorm_nnx(model, fold.find_conv_bn_pairs_nnx(model, x))
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  apply = lambda p, x: nnx.merge(graphdef, p, rest)(x)
  pairs = fold.find_equalization_pairs(apply, params, x)
  nnx.update(model, fold.equalize(params, pairs))

  assert [tuple(p) for p in pairs] == [("layers/0", "layers/3", ())]
  w1 = np.asarray(params["layers"][0]["kernel"], np.float64)
  b1 = np.asarray(params["layers"][0]["bias"], np.float64)
  w2 = np.asarray(params["layers"][3]["kernel"], np.float64)
  r1, r2 = np.abs(w1).max((0, 1, 2)), np.abs(w2).max((0, 1, 3))
  s = np.sqrt(r1 * r2) / r2
  np.testing.assert_allclose(model.layers[0].kernel.get_value(), w1 / s, rtol=1e-6)
  np.testing.assert_allclose(model.layers[0].bias.get_value(), b1 / s, rtol=1e-6)
  np.testing.assert_allclose(model.layers[3].kernel.get_value(), w2 * s[:, None],
                             rtol=1e-6)
  np.testing.assert_allclose(model(x), ref, rtol=1e-4, atol=1e-5)


def test_folded_nnx_quantizes_like_the_folded_linen_twin():
  """Same folded params as the Linen route; the same QAT (training-mode) outputs."""
  model, params, stats = _random_model(lambda: Net(nnx.Rngs(0)), 7)
  model.eval()
  x = _x(8)
  folded = fold.fold_batchnorm_nnx(model, fold.find_conv_bn_pairs_nnx(model, x))

  linen = LinenNet()
  pairs = fold.find_conv_bn_pairs(linen, x, train=False)
  assert pairs == PAIRS
  lparams, lstats = fold.fold_batchnorm(params, stats, pairs, eps={
      "bn1": 1e-5, "bn2": 1e-3, "bn3": 1e-5, "bnh": 1e-5})
  fparams = nnx.to_pure_dict(nnx.state(folded, nnx.Param))
  for layer, bn in pairs:  # a bias-free Linen layer leaves its folded bias in the BN
    np.testing.assert_allclose(fparams[layer]["kernel"], lparams[layer]["kernel"],
                               rtol=1e-6, atol=1e-7)
    lbias = lparams[layer]["bias"] if "bias" in lparams[layer] else lparams[bn]["bias"]
    np.testing.assert_allclose(fparams[layer]["bias"], lbias, rtol=1e-6, atol=1e-7)

  rules = [Rule("conv1|dw|conv3|lin", weight=QuantSpec(bits=4), act=QuantSpec(bits=8))]
  lq = quantize_model(fold.FoldedBatchNorm(linen, tuple(bn for _, bn in pairs)), rules,
                      int8="off")
  lvars = {"params": lparams, "batch_stats": lstats}
  lout = jax.jit(functools.partial(lq.apply, train=True, mutable=["batch_stats"]))(
      {"params": lparams, "batch_stats": lstats}, x)[0]
  nq = jaxq.nnx.quantize_model(folded, rules, int8="off")
  nout = run(nq, x)
  np.testing.assert_allclose(nout, lout, rtol=1e-5, atol=1e-6)
  # The quantizers act (4-bit weights), on the folded weights: not the float output.
  assert not np.allclose(nout, run(folded, x), atol=1e-3)
  with pytest.raises(ValueError, match="'conv1' is already quantized: fold before"):
    fold.fold_batchnorm_nnx(nq, [("conv1", "bn1")])
