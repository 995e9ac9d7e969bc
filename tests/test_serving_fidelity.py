"""The served model is the trained model, under hostile input too (issue 17).

* NaN propagates and +-Inf saturates identically through fake quantization, the int8
  training matmul (``int8="forward"`` / ``"all"``) and int8 / int4 serving;
* ``convert`` reproduces the QAT model's output (same statistics) by default;
* calibration that saw no finite value, or never reached a layer, is an error;
* single-layer models, empty batches, static export keyword arguments, lifted transforms
  that do not map "quant_stats".
"""

from __future__ import annotations

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxq
from _models import TinyCNN, TinyViT
from jaxq import export as jexport
from jaxq.flax import ptq
from jaxq.flax.linen import quantize_model
from jaxq.qarray import QArray
from jaxq.spec import QuantSpec, Rule

W8 = QuantSpec(8)
W4G = QuantSpec(4, granularity="group", group_size=8)
A8 = QuantSpec(8, granularity="tensor")
A8_EMA = QuantSpec(8, granularity="tensor", calibration="ema")
A8_DYN = QuantSpec(8, granularity="tensor", dynamic=True)


class Mlp(nn.Module):
  """Dense_1 (16 -> 16, relu) then Dense_0 (16 -> 8): Flax names the outer call first."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(8)(nn.relu(nn.Dense(16)(x)))


def _x(shape=(6, 16), seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, *args):
  return model.apply(variables, *args)


# --------------------------------------------------------------------------------------
# Silent item 1: NaN / Inf agree in fake quantization, int8 training and serving
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("int8", ["forward", "all"])
@pytest.mark.parametrize("where", ["input", "weight"])
def test_nan_propagates_through_int8_training(int8, where):
  """A NaN gives the NaN pattern of fake quantization (rows for an input NaN, columns
  for a weight NaN), a NaN loss and NaN gradients; finite entries agree."""
  m = Mlp()
  x = _x()
  v = m.init(jax.random.key(1), x)
  if where == "input":
    x = x.at[2, 3].set(jnp.nan).at[4, 0].set(jnp.inf)
  else:
    v = jax.tree_util.tree_map(lambda a: a, v)
    v["params"]["Dense_0"]["kernel"] = v["params"]["Dense_0"]["kernel"].at[5, 2].set(jnp.nan)
  rules = [Rule(".*", weight=W8, act=A8)]
  ref = quantize_model(m, rules, int8="off")
  q = quantize_model(m, rules, int8=int8)
  y_ref, y = _apply(ref, v, x), _apply(q, v, x)
  np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))
  assert np.isnan(y_ref).any() and not np.isnan(y_ref).all()
  np.testing.assert_allclose(np.nan_to_num(y), np.nan_to_num(y_ref), rtol=1e-5, atol=1e-5)
  loss, g = jax.value_and_grad(lambda p: jnp.mean(q.apply({"params": p}, x) ** 2))(v["params"])
  assert np.isnan(loss)
  assert np.isnan(g["Dense_0"]["kernel"]).any() and np.isnan(g["Dense_1"]["kernel"]).any()


@pytest.mark.parametrize("act", [A8, A8_DYN, None], ids=["static", "dynamic", "weight-only"])
@pytest.mark.parametrize("weight", [W8, W4G], ids=["w8", "w4g"])
def test_nan_propagates_through_serving(act, weight):
  """Served int8 / int4 (and weight-only) outputs have exactly the NaN rows of the QAT
  output and the same finite values; +-Inf inputs saturate as in fake quantization."""
  m = Mlp()
  x = _x()
  v = m.init(jax.random.key(1), x)
  rules = [Rule(".*", weight=weight, act=act)]
  q = quantize_model(m, rules, int8="off")
  cv = ptq.calibrate(q, v, [x]) if act is not None else v
  sm, sv = ptq.convert(q, cv)
  xh = x.at[2, 3].set(jnp.nan).at[4, 0].set(jnp.inf).at[0, 1].set(-jnp.inf)
  y_served = np.asarray(_apply(sm, sv, xh))
  y_sim = np.asarray(_apply(quantize_model(m, rules, mode=ptq.SIM_MODE), cv, xh))
  assert np.isnan(y_served[2]).all()
  if act is not None:  # quantized inputs saturate +-Inf: only the NaN row is NaN
    np.testing.assert_array_equal(np.isnan(y_served).any(1), [0, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(np.isnan(y_served), np.isnan(y_sim))
  np.testing.assert_allclose(np.nan_to_num(y_served), np.nan_to_num(y_sim), rtol=1e-5,
                             atol=1e-5)


def test_nan_weight_is_served_as_nan():
  """A NaN kernel entry serves as NaN in its output column (as fake quantization)."""
  m = Mlp()
  x = _x()
  v = m.init(jax.random.key(1), x)
  v["params"]["Dense_0"]["kernel"] = v["params"]["Dense_0"]["kernel"].at[5, 2].set(jnp.nan)
  for rules in ([Rule(".*", weight=W8, act=A8_DYN)], [Rule(".*", weight=W4G)],
                [Rule(".*", weight=QuantSpec(8, granularity="tensor"), act=A8_DYN)]):
    q = quantize_model(m, rules, int8="off")
    sm, sv = ptq.convert(q, v)
    y, y_qat = np.asarray(_apply(sm, sv, x)), np.asarray(_apply(q, v, x))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_qat))
    assert np.isnan(y[:, 2]).all() and not np.isnan(y[:, 3]).any()


# --------------------------------------------------------------------------------------
# Silent item 2: the served model reproduces the QAT model (same statistics), by default
# --------------------------------------------------------------------------------------


class ConvNet(nn.Module):
  """TinyCNN without BatchNorm noise: Conv, Dense, DenseGeneral and Einsum layers."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="conv0")(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2), name="conv1")(x))
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    x = nn.DenseGeneral((2, 8), name="heads")(x)
    x = nn.Einsum((2, 8, 16), "bthd,hdf->btf", name="merge")(x)
    return nn.Dense(10, name="head")(x.mean(1))


_MODELS = {
    "mlp": (Mlp, (8, 16)),
    "convnet": (ConvNet, (4, 8, 8, 1)),
    "tinycnn": (functools.partial(TinyCNN, features=(8, 16)), (4, 8, 8, 1)),
    "tinyvit": (functools.partial(TinyViT, dim=16, depth=1, mlp=32), (4, 8, 8, 1)),
}
# Layers with one input channel (patch embedding / first conv) cannot take groups of 8.
_FIRST = r"embed|conv0|Conv_0"
_SPECS = {
    "w8": [Rule(".*", weight=W8)],
    "w4-group": [Rule(_FIRST, weight=W8), Rule(".*", weight=W4G)],
    "w4-tensor": [Rule(".*", weight=QuantSpec(4, granularity="tensor"))],
    "w8a8-ema": [Rule(".*", weight=W8, act=A8_EMA)],
    "w8a8-dynamic": [Rule(".*", weight=W8, act=A8_DYN)],
    "w4a8-asym": [Rule(_FIRST, weight=W8, act=A8_EMA),
                  Rule(".*", weight=QuantSpec(4, granularity="group", group_size=8,
                                              symmetric=False),
                       act=QuantSpec(8, granularity="tensor", symmetric=False,
                                     calibration="ema"))],
}


_CASES = ([("mlp", s) for s in ("w8", "w4-group", "w4-tensor", "w8a8-ema")]
          + [("convnet", s) for s in ("w8a8-dynamic", "w4a8-asym")]
          + [("tinycnn", "w8"), ("tinyvit", "w8a8-ema")])


@functools.partial(jax.jit, static_argnums=0)
def _observe(qmodel, variables, x):
  return qmodel.apply(variables, x, mutable=["quant_stats"])[1]


@pytest.mark.parametrize("name,spec", _CASES)
def test_served_model_is_the_qat_model(name, spec):
  """``convert`` (defaults) serves what QAT computes, given the same statistics: the
  activation observers QAT filled (mutable "quant_stats") feed both."""
  make, shape = _MODELS[name]
  model = make()
  x = _x(shape, seed=2)
  v = jax.jit(model.init)(jax.random.key(0), x)
  qmodel = quantize_model(model, _SPECS[spec])
  if any(r.act is not None and not r.act.dynamic for r in qmodel.rules):
    v = {**v, **_observe(qmodel, v, x)}
  y_qat = np.asarray(_apply(qmodel, v, x), np.float64)
  sm, sv = ptq.convert(qmodel, v)
  y = np.asarray(_apply(sm, sv, x), np.float64)
  err = np.max(np.abs(y - y_qat)) / np.max(np.abs(y_qat))
  assert err <= 2e-5, err


def test_compact_scales_are_an_explicit_option():
  """``compact_scales=True`` stores float8 / float16 scales (fewer bytes), and then the
  served weights differ from the trained ones; the default keeps float32 scales."""
  model = Mlp()
  x = _x((8, 16))
  v = model.init(jax.random.key(0), x)
  qmodel = quantize_model(model, [Rule(".*", weight=W4G)])
  _, exact = ptq.convert(qmodel, v)
  _, compact = ptq.convert(qmodel, v, compact_scales=True)
  qe, qc = exact["params"]["Dense_0"]["kernel"], compact["params"]["Dense_0"]["kernel"]
  assert qe.scale.dtype == jnp.float32 and qc.scale.dtype == jnp.float8_e4m3b11fnuz
  assert qc.nbytes < qe.nbytes
  assert ptq.serving_nbytes(compact) < ptq.serving_nbytes(exact)


# --------------------------------------------------------------------------------------
# Silent item 5: calibration that saw nothing usable, layers it never reached
# --------------------------------------------------------------------------------------


def test_calibration_without_finite_values_names_the_layer():
  m = Mlp()
  x = _x()
  v = m.init(jax.random.key(1), x)
  qmodel = quantize_model(m, [Rule("Dense_0", weight=W8, act=A8_EMA),
                              Rule("Dense_1", weight=W8, act=A8)])
  bad = jnp.full_like(x, jnp.nan)
  with pytest.raises(ValueError, match="'Dense_0'.*no finite|no finite.*'Dense_0'"):
    ptq.calibrate(qmodel, v, [bad, bad])


class Branchy(nn.Module):
  @nn.compact
  def __call__(self, x, head: bool = False):
    x = nn.Dense(16, name="body")(x)
    if head:
      x = nn.Dense(4, name="extra")(x)
    return x


def test_layers_calibration_never_reached_are_reported():
  m = Branchy()
  x = _x()
  v = m.init(jax.random.key(1), x, head=True)
  static = quantize_model(m, [Rule(".*", weight=W8, act=A8)])
  cv = ptq.calibrate(static, v, [x])  # head=False: "extra" is never called
  with pytest.raises(ValueError, match="'extra'"):
    ptq.convert(static, cv)
  dynamic = quantize_model(m, [Rule(".*", weight=W8, act=A8_DYN)])
  cv = ptq.calibrate(dynamic, v, [x])
  with pytest.warns(UserWarning, match="'extra'"):
    _, sv = ptq.convert(dynamic, cv)
  assert isinstance(sv["params"]["extra"]["kernel"], QArray)  # quantized all the same


# --------------------------------------------------------------------------------------
# Silent item 12: a model that is a single layer
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", [A8, A8_DYN, None], ids=["static", "dynamic", "weight-only"])
def test_single_layer_model_converts(act):
  layer = nn.Dense(4)
  x = _x()
  v = layer.init(jax.random.key(0), x)
  qmodel = quantize_model(layer, [Rule(".*", weight=W8, act=act)])
  cv = ptq.calibrate(qmodel, v, [x]) if act is not None else v
  sm, sv = ptq.convert(qmodel, cv)
  assert isinstance(sv["params"]["kernel"], QArray)
  y_sim = _apply(quantize_model(layer, qmodel.rules, mode=ptq.SIM_MODE), cv, x)
  np.testing.assert_allclose(_apply(sm, sv, x), y_sim, rtol=1e-5, atol=1e-5)


def test_nnx_single_layer_model_is_quantized():
  """``nnx.Linear`` as the model: quantized as Linen's ``nn.Dense`` is."""
  x = _x()
  lin = nnx.Linear(16, 4, rngs=nnx.Rngs(0))
  rules = [Rule(".*", weight=W8, act=A8)]
  qlin = jaxq.nnx.quantize_model(lin, rules)
  assert qlin is not lin and isinstance(qlin, jaxq.nnx.QuantizedLinear)
  v = {"params": {"kernel": lin.kernel.get_value(), "bias": lin.bias.get_value()}}
  y_linen = quantize_model(nn.Dense(4), rules, int8="off").apply(v, x)
  np.testing.assert_allclose(qlin(x), y_linen, rtol=1e-6, atol=1e-6)
  assert not np.allclose(qlin(x), lin(x), atol=1e-6)


# --------------------------------------------------------------------------------------
# Crashes: static export kwargs, empty batches, lifted transforms without quant_stats
# --------------------------------------------------------------------------------------


class WithDropout(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(8)(x)
    return nn.Dropout(0.5, deterministic=not train)(x)


def test_export_serving_static_keyword_arguments():
  m = WithDropout()
  x = _x()
  v = m.init(jax.random.key(0), x, train=False)
  sm, sv = ptq.convert(quantize_model(m, [Rule(".*", weight=W8)]), v)
  exp = jexport.export_serving(sm, sv, x, train=False)
  # calibrate takes static keyword arguments too (compiled once, with them fixed).
  static = quantize_model(m, [Rule(".*", weight=W8, act=A8)])
  cv = ptq.calibrate(static, v, [x], train=False)
  assert cv["quant_stats"]["Dense_0"]["jaxq_act"]["n"] == 1
  loaded = jexport.load_serving(exp.serialize())
  np.testing.assert_array_equal(loaded.call(sv, x), sm.apply(sv, x, train=False))


@pytest.mark.parametrize("int8", ["off", "forward"])
def test_empty_batches(int8):
  m = Mlp()
  x = _x()
  v = m.init(jax.random.key(1), x)
  for act in (A8, A8_DYN, A8_EMA):
    qmodel = quantize_model(m, [Rule(".*", weight=W8, act=act)], int8=int8)
    assert _apply(qmodel, v, x[:0]).shape == (0, 8)
    if act.dynamic:
      continue
    with_empty = ptq.calibrate(qmodel, v, [x[:4], x[:0], x[4:]])
    plain = ptq.calibrate(qmodel, v, [x[:4], x[4:]])
    jax.tree_util.tree_map(np.testing.assert_array_equal, with_empty, plain)
    sm, sv = ptq.convert(qmodel, plain)
    assert _apply(sm, sv, x[:0]).shape == (0, 8)
  with pytest.raises(ValueError, match="empty"):
    ptq.calibrate(quantize_model(m, [Rule(".*", weight=W8, act=A8)]), v, [x[:0]])


class VmapNoStats(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True})
    return dense(8)(x)


def test_lifted_transform_without_quant_stats_says_so():
  m = VmapNoStats()
  x = _x((3, 4, 16))
  v = m.init(jax.random.key(1), x)
  qmodel = quantize_model(m, [Rule(".*", weight=W8, act=A8)])
  with pytest.raises(ValueError, match="VmapDense_0.*variable_axes.*quant_stats"):
    ptq.calibrate(qmodel, v, [x])


# --------------------------------------------------------------------------------------
# Done when: every path agrees, on random specs, shapes and non-finite inputs
# --------------------------------------------------------------------------------------

_WEIGHT_SPECS = (W8, QuantSpec(8, granularity="tensor"), W4G,
                 QuantSpec(4, granularity="group", group_size=8, symmetric=False))
_ACT_SPECS = (None, A8, A8_DYN, QuantSpec(8, granularity="tensor", symmetric=False))


@settings(max_examples=10, deadline=None)
@given(weight=st.sampled_from(_WEIGHT_SPECS), act=st.sampled_from(_ACT_SPECS),
       m=st.sampled_from([1, 5]), k=st.sampled_from([8, 16]), n=st.sampled_from([3, 8]),
       holes=st.lists(st.tuples(st.integers(0, 79), st.sampled_from([np.nan, np.inf,
                                                                     -np.inf])),
                      max_size=3),
       seed=st.integers(0, 3))
def test_all_paths_agree(weight, act, m, k, n, holes, seed):
  """QAT fake quant, the int8 training forward, calibrated fake quant ("ptq_sim") and
  the served model give the same output, NaN pattern included."""
  x = np.array(_x((m, k), seed))
  for i, value in holes:
    x.flat[i % x.size] = value
  x = jnp.asarray(x)
  layer = nn.Dense(n)
  v = layer.init(jax.random.key(seed), x[:1] * 0)
  rules = [Rule(".*", weight=weight, act=act)]
  qat = quantize_model(layer, rules, int8="off")
  cv = v
  if act is not None and not act.dynamic:
    if not np.isfinite(np.asarray(x)).any():
      return
    cv = ptq.calibrate(qat, v, [x])  # the range QAT's min-max takes from this x
  sm, sv = ptq.convert(qat, cv)
  outs = [_apply(qat, v, x), _apply(quantize_model(layer, rules), v, x),
          _apply(quantize_model(layer, rules, mode=ptq.SIM_MODE), cv, x), _apply(sm, sv, x)]
  ref = np.asarray(outs[0])
  tol = 1e-5 * max(1.0, float(np.max(np.abs(np.nan_to_num(ref, posinf=0, neginf=0)))))
  for out in outs[1:]:
    out = np.asarray(out)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=tol)
