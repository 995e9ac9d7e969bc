"""jaxq.flax.linen.quantize_model: parameter tree, matching, state, int8 path, transforms."""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _models import TinyCNN, TinyViT
from jaxq import act, quantizer
from jaxq.flax.linen import init_quant_params, layer_paths, quantize_model
from jaxq.spec import QuantSpec, Rule

W8 = QuantSpec()
A8 = QuantSpec(granularity="tensor")


def _fq_w(w, spec=W8):
  return quantizer.fake_quantize(w, spec.replace(axis=-1) if spec.granularity != "tensor"
                                 else spec, group_axis=0)


def _fq_a(x, spec=A8):
  x2 = x.reshape(-1, x.shape[-1])
  return quantizer.fake_quantize(x2, spec, group_axis=1).reshape(x.shape)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(4)(x)


@pytest.fixture(scope="module")
def mlp():
  m = MLP()
  x = jax.random.normal(jax.random.key(1), (6, 8))
  return m, m.init(jax.random.key(0), x), x


def _mlp_ref(p, x, spec0, spec1):
  """MLP with Dense_i's kernel/input fake-quantized by spec_i = (wspec, aspec) or None."""
  def dense(pp, h, spec):
    w = pp["kernel"]
    if spec is not None:
      w, h = _fq_w(w, spec[0]), _fq_a(h, spec[1])
    return h @ w + pp["bias"]
  h = nn.relu(dense(p["Dense_0"], x, spec0))
  return dense(p["Dense_1"], h, spec1)


@pytest.mark.parametrize("model_fn", [TinyViT, TinyCNN])
def test_no_match_is_bitwise_float_and_same_tree(model_fn):
  m = model_fn()
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  v = m.init(jax.random.key(0), x)
  q = quantize_model(m, [Rule("no_such_layer", weight=W8, act=A8)])
  with pytest.warns(UserWarning, match="'no_such_layer'.*matches no module"):
    vq = jax.eval_shape(q.init, jax.random.key(0), x)
    np.testing.assert_array_equal(jax.jit(m.apply)(v, x), jax.jit(q.apply)(v, x))
  assert jax.tree.structure(vq) == jax.tree.structure(v)


def test_matched_and_unmatched_layers_mixed_precision(mlp):
  m, v, x = mlp
  p = v["params"]
  w4 = QuantSpec(bits=4)
  a4 = QuantSpec(bits=4, granularity="tensor")
  # only Dense_1 quantized: Dense_0 untouched
  q = quantize_model(m, [Rule("Dense_1", weight=W8, act=A8)], int8="off")
  np.testing.assert_allclose(q.apply(v, x), _mlp_ref(p, x, None, (W8, A8)), rtol=1e-6,
                             atol=1e-6)
  # per-layer precision: first rule wins
  rules = [Rule("Dense_0", weight=W8, act=A8), Rule(".*", weight=w4, act=a4)]
  q = quantize_model(m, rules, int8="off")
  np.testing.assert_allclose(q.apply(v, x), _mlp_ref(p, x, (W8, A8), (w4, a4)), rtol=1e-6,
                             atol=1e-6)


def test_int8_forward_matches_fake_quant_and_grads(mlp):
  m, v, x = mlp
  rules = [Rule(".*", weight=W8, act=A8)]
  fq = quantize_model(m, rules, int8="off")
  i8 = quantize_model(m, rules, int8="forward")
  ia = quantize_model(m, rules, int8="all")
  np.testing.assert_allclose(i8.apply(v, x), fq.apply(v, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ia.apply(v, x), fq.apply(v, x), rtol=1e-5, atol=1e-5)

  def grads(model):
    return jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x) ** 2),
                            argnums=(0, 1)))(v["params"], x)

  g_fq, g_i8, g_ia = grads(fq), grads(i8), grads(ia)
  for a, b in zip(jax.tree.leaves(g_i8), jax.tree.leaves(g_fq)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_ia), jax.tree.leaves(g_fq)):  # int8 gradients
    err = np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))
    assert err < 0.03, err
  # int8 path really runs integer dots
  hlo = jax.jit(lambda p: ia.apply({"params": p}, x)).lower(v["params"]).as_text()
  assert "xi8>" in hlo or "i8" in hlo


def test_dynamic_per_row_activation_int8(mlp):
  m, v, x = mlp
  a_dyn = QuantSpec(granularity="tensor", dynamic=True)
  fq = quantize_model(m, [Rule(".*", weight=W8, act=a_dyn)], int8="off")
  i8 = quantize_model(m, [Rule(".*", weight=W8, act=a_dyn)])
  np.testing.assert_allclose(i8.apply(v, x), fq.apply(v, x), rtol=1e-5, atol=1e-5)
  # per-row: scaling one row does not change the others
  y0 = fq.apply(v, x)
  y1 = fq.apply(v, x.at[0].multiply(100.0))
  np.testing.assert_allclose(y0[1:], y1[1:], rtol=1e-6, atol=1e-6)


def test_ema_quant_stats_collection(mlp):
  m, v, x = mlp
  spec = QuantSpec(granularity="tensor", calibration="ema")
  q = quantize_model(m, [Rule(".*", weight=W8, act=spec)])
  vq = q.init(jax.random.key(0), x)
  assert set(vq) == {"params", "quant_stats"}
  assert set(vq["quant_stats"]["Dense_0"]) == {"jaxq_act"}
  assert jax.tree.structure(vq["params"]) == jax.tree.structure(v["params"])
  # read-only: same result, state unchanged
  y = q.apply(vq, x)
  y2, upd = q.apply(vq, 3.0 * x, mutable=["quant_stats"])
  assert not np.allclose(upd["quant_stats"]["Dense_0"]["jaxq_act"]["hi"],
                         vq["quant_stats"]["Dense_0"]["jaxq_act"]["hi"])
  assert np.asarray(upd["quant_stats"]["Dense_0"]["jaxq_act"]["n"]).item() == 2.0
  assert not np.allclose(q.apply({**vq, **upd}, x), y)
  with pytest.raises(ValueError, match="quant_stats"):
    q.apply({"params": v["params"]}, x)


def test_minmax_needs_no_state(mlp):
  m, v, x = mlp
  q = quantize_model(m, [Rule(".*", weight=W8, act=A8)])
  vq = q.init(jax.random.key(0), x)
  assert set(vq) == {"params"}
  np.testing.assert_allclose(q.apply({"params": v["params"]}, x),
                             _mlp_ref(v["params"], x, (W8, A8), (W8, A8)), rtol=1e-5,
                             atol=1e-5)


def test_lsq_pact_params_reserved_names_and_float_checkpoint(mlp):
  m, v, x = mlp
  rules = [Rule("Dense_0", weight=QuantSpec(bits=4, estimator="lsq"),
                act=QuantSpec(bits=4, granularity="tensor", estimator="lsq", symmetric=False)),
           Rule("Dense_1", weight=W8,
                act=QuantSpec(bits=4, signed=False, granularity="tensor", estimator="pact"))]
  q = quantize_model(m, rules)
  vq = q.init(jax.random.key(0), x)
  p = vq["params"]
  assert set(p["Dense_0"]) == {"kernel", "bias", "jaxq_weight_scale", "jaxq_act_scale",
                               "jaxq_act_zero_point"}
  assert set(p["Dense_1"]) == {"kernel", "bias", "jaxq_act_alpha"}
  assert p["Dense_0"]["jaxq_weight_scale"].shape == (1, 16)
  for path in (("Dense_0", "kernel"), ("Dense_0", "bias"), ("Dense_1", "kernel")):
    assert p[path[0]][path[1]].shape == v["params"][path[0]][path[1]].shape
  # a float checkpoint lacks the jaxq params: clear error, then init_quant_params fixes it
  with pytest.raises(ValueError, match="init_quant_params"):
    q.apply(v, x)
  v2 = init_quant_params(q, v, x)
  np.testing.assert_array_equal(v2["params"]["Dense_0"]["kernel"],
                                v["params"]["Dense_0"]["kernel"])
  w = v["params"]["Dense_0"]["kernel"]
  np.testing.assert_allclose(v2["params"]["Dense_0"]["jaxq_weight_scale"],
                             2 * np.abs(w).mean(0, keepdims=True) / np.sqrt(7), rtol=1e-5)
  np.testing.assert_allclose(v2["params"]["Dense_1"]["jaxq_act_alpha"].reshape(()),
                             jnp.max(nn.relu(x @ w + v["params"]["Dense_0"]["bias"])),
                             rtol=0.3)
  # learned steps receive gradients (3x: some inputs fall outside the initial range)
  g = jax.grad(lambda p: jnp.sum(q.apply({"params": p}, 3.0 * x) ** 2))(v2["params"])
  for name in ("jaxq_weight_scale", "jaxq_act_scale", "jaxq_act_zero_point"):
    assert np.any(np.asarray(g["Dense_0"][name]) != 0), name
  assert np.all(np.isfinite(np.asarray(g["Dense_1"]["jaxq_act_alpha"])))


def test_stochastic_rounding_uses_jaxq_stream(mlp):
  m, v, x = mlp
  sr = QuantSpec(bits=4, granularity="tensor", rounding="stochastic")
  q = quantize_model(m, [Rule(".*", weight=QuantSpec(bits=4), act=sr)])
  qn = quantize_model(m, [Rule(".*", weight=QuantSpec(bits=4),
                               act=sr.replace(rounding="nearest"))])
  np.testing.assert_array_equal(q.apply(v, x), qn.apply(v, x))   # no key: nearest
  y1 = q.apply(v, x, rngs={"jaxq": jax.random.key(1)})
  y2 = q.apply(v, x, rngs={"jaxq": jax.random.key(2)})
  assert not np.allclose(y1, y2)
  np.testing.assert_array_equal(y1, q.apply(v, x, rngs={"jaxq": jax.random.key(1)}))


def test_conv_and_einsum_match_reference():
  class ConvEin(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(6, (3, 3), padding="SAME")(x)
      x = x.reshape(x.shape[0], -1, 6)
      return nn.Einsum((6, 5), "btc,cd->btd")(x)

  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4))
  m = ConvEin()
  v = m.init(jax.random.key(1), x)
  p = v["params"]
  q = quantize_model(m, [Rule(".*", weight=W8, act=A8)])
  conv_k = p["Conv_0"]["kernel"]
  kq = _fq_w(conv_k.reshape(-1, 6)).reshape(conv_k.shape)
  h = jax.lax.conv_general_dilated(_fq_a(x), kq, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = (h + p["Conv_0"]["bias"]).reshape(2, -1, 6)
  ref = jnp.einsum("btc,cd->btd", _fq_a(h), _fq_w(p["Einsum_0"]["kernel"])) + p[
      "Einsum_0"]["bias"]
  np.testing.assert_allclose(jax.jit(q.apply)(v, x), ref, rtol=1e-5, atol=1e-5)


def test_errors_name_the_layer(mlp):
  m, v, x = mlp
  bad = quantize_model(m, [Rule("Dense_1", weight=W8,
                                act=QuantSpec(granularity="group", group_size=5))])
  with pytest.raises(ValueError, match="Dense_1"):
    bad.apply(v, x)
  bad_w = quantize_model(m, [Rule("Dense_0", weight=QuantSpec(granularity="group",
                                                               group_size=3))])
  with pytest.raises(ValueError, match="Dense_0"):
    bad_w.apply(v, x)
  with pytest.raises(ValueError, match="granularity"):
    QuantSpec(granularity="rows")
  with pytest.raises(ValueError, match="int8"):
    quantize_model(m, [Rule()], int8="yes")


def _np_group_fake_quant(x: np.ndarray, bits: int, group_size: int, axis: int) -> np.ndarray:
  """Symmetric signed fake quantization in float64, one scale per ``group_size``
  consecutive elements along ``axis``: ``s = max|x_g| / qmax``, round half to even."""
  qmax = 2 ** (bits - 1) - 1
  x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
  g = x.reshape(x.shape[:-1] + (-1, group_size))
  s = np.maximum(np.abs(g).max(-1, keepdims=True) / qmax, np.finfo(np.float32).eps)
  q = np.clip(np.round(g / s), -qmax - 1, qmax) * s
  return np.moveaxis(q.reshape(x.shape), -1, axis)


def test_group_specs_match_numpy_reference(mlp):
  m, v, x = mlp
  q = quantize_model(m, [Rule(".*", weight=QuantSpec(bits=4, granularity="group",
                                                      group_size=4),
                              act=QuantSpec(bits=4, granularity="group", group_size=4,
                                            dynamic=True))])
  # Weights: groups of 4 input rows per output column; activations: groups of 4
  # features per row, ranges from the current tensor.
  p = jax.tree.map(np.asarray, v["params"])
  h = np.asarray(x, np.float64)
  for name in ("Dense_0", "Dense_1"):
    w = _np_group_fake_quant(p[name]["kernel"], 4, 4, axis=0)
    h = _np_group_fake_quant(h, 4, 4, axis=1) @ w + p[name]["bias"]
    h = np.maximum(h, 0) if name == "Dense_0" else h
  np.testing.assert_allclose(q.apply(v, x), h, rtol=1e-5, atol=1e-5)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.tanh(nn.Dense(8)(x)), None


class ScanModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)
    return scan(name="layers")(x, None)[0]


class RematVmapModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.remat(nn.Dense)(8, name="remat_dense")(x)
    vd = nn.vmap(nn.Dense, in_axes=0, out_axes=0, variable_axes={"params": 0},
                 split_rngs={"params": True})
    return vd(8, name="vmap_dense")(x)


def test_transforms_scan_remat_vmap_jit_grad():
  x = jax.random.normal(jax.random.key(0), (4, 8))
  spec = QuantSpec(bits=4, estimator="lsq")
  # scan: equals applying the quantized Dense layer by layer
  m = ScanModel()
  assert layer_paths(m, x) == ["layers/Dense_0"]
  q = quantize_model(m, [Rule("layers/Dense_0", weight=spec, act=A8)], int8="off")
  v = q.init(jax.random.key(1), x)
  assert v["params"]["layers"]["Dense_0"]["jaxq_weight_scale"].shape == (3, 1, 8)
  ref = x
  for i in range(3):
    pp = jax.tree.map(lambda a, i=i: a[i], v["params"]["layers"]["Dense_0"])
    w = quantizer.fake_quantize(pp["kernel"], spec, scale=pp["jaxq_weight_scale"])
    ref = jnp.tanh(_fq_a(ref) @ w + pp["bias"])
  y = jax.jit(q.apply)(v, x)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda p: jnp.sum(q.apply({"params": p}, x)))(v["params"])
  assert np.any(np.asarray(g["layers"]["Dense_0"]["jaxq_weight_scale"]) != 0)

  # remat + vmap
  m = RematVmapModel()
  xv = jax.random.normal(jax.random.key(2), (3, 4, 8))
  v = m.init(jax.random.key(1), xv)
  q = quantize_model(m, [Rule(".*", weight=W8, act=A8)])
  p = v["params"]
  h = _fq_a(xv) @ _fq_w(p["remat_dense"]["kernel"]) + p["remat_dense"]["bias"]
  ref = jnp.stack([_fq_a(h[i]) @ _fq_w(p["vmap_dense"]["kernel"][i])
                   + p["vmap_dense"]["bias"][i] for i in range(3)])
  np.testing.assert_allclose(jax.jit(q.apply)(v, xv), ref, rtol=1e-5, atol=1e-5)
  g = jax.jit(jax.grad(lambda p: jnp.sum(q.apply({"params": p}, xv) ** 2)))(p)
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(g))


def _act_compress_grad_errors(act_compress, batch: int, weights=(None,)):
  """TinyViT with block_0 under ``Rule(act_compress=...)``: checks the forward pass is
  bitwise the float one; returns the relative error of the parameter gradient for each of
  ``weights`` (per-sample gradient estimates given through
  ``jaxq.act.linen.sample_weights``; None: none given). One compiled gradient per kind."""
  m = TinyViT(depth=1)
  x = jax.random.normal(jax.random.key(0), (batch, 8, 8, 1))
  v = m.init(jax.random.key(0), x)
  q = quantize_model(m, [Rule("block_0", weight=None, act_compress=act_compress)])
  np.testing.assert_array_equal(jax.jit(q.apply)(v, x), jax.jit(m.apply)(v, x))  # exact

  def loss(model, p, weight):
    with contextlib.ExitStack() as stack:
      if weight is not None:
        stack.enter_context(act.linen.sample_weights(weight))
      return jnp.sum(model.apply({"params": p}, x, rngs={"jaxq": jax.random.key(3)}) ** 2)

  flat = lambda g: np.concatenate([np.ravel(t) for t in jax.tree.leaves(g)])
  b = flat(jax.jit(jax.grad(lambda p: loss(m, p, None)))(v["params"]))
  grad_plain = jax.jit(jax.grad(lambda p: loss(q, p, None)))
  grad_weighted = jax.jit(jax.grad(lambda p, w: loss(q, p, w)))
  return [np.linalg.norm(flat(grad_plain(v["params"]) if w is None else
                              grad_weighted(v["params"], w)) - b) / np.linalg.norm(b)
          for w in weights]


def test_act_compress_rule():
  assert _act_compress_grad_errors(8, batch=2)[0] < 0.05
  m = TinyViT(depth=1)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  v = m.init(jax.random.key(0), x)
  # combined with weight quantization inside the compressed block
  q2 = quantize_model(m, [Rule("block_0", weight=None, act_compress=8),
                          Rule(".*", weight=W8, act=A8)])
  q3 = quantize_model(m, [Rule("block_0", weight=None),
                          Rule(".*", weight=W8, act=A8)])
  np.testing.assert_allclose(jax.jit(q2.apply)(v, x), jax.jit(q3.apply)(v, x), rtol=1e-6,
                             atol=1e-6)


def test_act_compress_rule_takes_per_sample_widths():
  assert 0 < _act_compress_grad_errors(act.SampleBits({8: 0.5, 4: 0.5}), batch=4)[0] < 0.1
  # gradient estimates from a sample_weights block reach the rule's regions: equal
  # weights keep the range ranking, others change which sample gets 8 bits
  base, ones, *one_hot = _act_compress_grad_errors(
      act.SampleBits({8: 0.25, 1: 0.75}), batch=4,
      weights=[None, jnp.ones(4)] + [jax.nn.one_hot(i, 4) for i in range(4)])
  assert ones == base
  assert len(set(one_hot) - {base}) >= 3
  for bad in (3, True, "2"):
    with pytest.raises(ValueError, match="Rule.act_compress must be None, one of 1, 2, 4, 8"):
      Rule("block_0", act_compress=bad)


def test_attribute_submodules_match_by_variable_path():
  """nn.Sequential holds its layers as attributes: under the scope-sharing wrapper their
  rules, observers and learned steps use the variable path ("layers_2"), not "model/..."."""
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)])
  x = jax.random.normal(jax.random.key(0), (6, 5))
  assert layer_paths(model, x) == ["layers_0", "layers_2"]
  spec = QuantSpec(8, granularity="tensor", calibration="ema")
  qmodel = quantize_model(model, [Rule("layers_2", weight=QuantSpec(4, estimator="lsq"),
                                       act=spec)])
  v = qmodel.init(jax.random.key(1), x)
  assert set(v["quant_stats"]) == {"layers_2"}
  assert set(v["params"]) == {"layers_0", "layers_2"}
  assert "jaxq_weight_scale" in v["params"]["layers_2"]
  assert "jaxq_weight_scale" not in v["params"]["layers_0"]
