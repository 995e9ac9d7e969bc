"""NNX PTQ: jaxq.nnx.calibrate / convert, serving, checkpoints and export of NNX serving
models (Linen parity and the calibration-method table: tests/test_parity.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from jaxq import checkpoint
from jaxq import export as jexport
from jaxq.qarray import QArray, dequantize
from jaxq.spec import QuantSpec, Rule
from tests._twins import Stack

W8 = QuantSpec(8)
A8 = QuantSpec(8, granularity="tensor")


class One(nnx.Module):
  def __init__(self, *, rngs):
    self.fc = nnx.Linear(32, 16, rngs=rngs)

  def __call__(self, x):
    return self.fc(x)


class Net(nnx.Module):
  """Linear -> BatchNorm -> Dropout -> relu -> Linear, layers in an nnx.List."""

  def __init__(self, *, rngs):
    self.layers = nnx.List([nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 8, rngs=rngs)])
    self.bn = nnx.BatchNorm(32, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.drop(self.bn(self.layers[0](x))))
    return self.layers[1](h)


def _same(a, b):
  if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
    a, b = jax.random.key_data(a), jax.random.key_data(b)
  np.testing.assert_array_equal(a, b)


def _x(shape, seed, shift=0.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) + shift, jnp.float32)


def test_w8a8_asymmetric_matches_numpy_reference():
  model = One(rngs=nnx.Rngs(0))
  x = _x((8, 32), 3, shift=1.5)
  act = QuantSpec(8, granularity="tensor", symmetric=False)
  qmodel = jaxq.nnx.quantize_model(model, Rule(".*", weight=W8, act=act))
  served = jaxq.nnx.convert(jaxq.nnx.calibrate(qmodel, [x[:3], x[3:]]))
  fc = served.fc
  s = float(fc.jaxq_act_scale.get_value().reshape(()))
  z = float(fc.jaxq_act_zero_point.get_value().reshape(()))
  xn = np.asarray(x, np.float64)
  lo, hi = min(xn.min(), 0.0), max(xn.max(), 0.0)  # min-max over both batches
  np.testing.assert_allclose(s, (hi - lo) / 255, rtol=1e-6)
  assert z != 0
  w = np.asarray(model.fc.kernel[...], np.float64)
  sw = np.abs(w).max(axis=0) / 127  # per output channel
  wq = np.round(w / sw) * sw
  np.testing.assert_allclose(dequantize(fc.kernel.get_value()), wq, rtol=1e-6, atol=1e-7)
  xq = np.clip(np.round(xn / s) + z, -128, 127)
  expect = (xq - z) * s @ wq + np.asarray(model.fc.bias[...])
  np.testing.assert_allclose(served(x), expect, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(nnx.jit(lambda m, v: m(v))(served, x), expect, rtol=1e-5,
                             atol=1e-5)
  # The quantized model is untouched: float kernel, observer, QAT class.
  assert not isinstance(qmodel.fc.kernel.get_value(), QArray)
  assert type(qmodel.fc).__name__ == "QuantizedLinear"
  assert type(fc).__name__ == "ServingLinear"


def test_batch_forms_empty_batches_and_reset():
  model = One(rngs=nnx.Rngs(0))
  rule = Rule(".*", weight=W8, act=QuantSpec(8, granularity="tensor", calibration="ema"))
  b1, b2 = _x((4, 32), 1), _x((4, 32), 2)

  def observer(batches, **kw):
    q = jaxq.nnx.quantize_model(model, rule)
    jaxq.nnx.calibrate(q, batches, **kw)
    return q, q.fc.jaxq_act.get_value()

  _, ref = observer([b1, b2])
  q, again = observer([(b1,), {"x": b2}, b1[:0], [b2[:0]]])  # tuple, kwargs, empties
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, ref)
  np.testing.assert_array_equal(ref["n"], 2.0)
  jaxq.nnx.calibrate(q, [b1], reset=False)  # continues from the current state
  np.testing.assert_array_equal(q.fc.jaxq_act.get_value()["n"], 3.0)
  _, three = observer([b1, b2, b1])
  jax.tree_util.tree_map(np.testing.assert_allclose, q.fc.jaxq_act.get_value(), three)


def test_errors_name_the_layer():
  model = One(rngs=nnx.Rngs(0))
  q = jaxq.nnx.quantize_model(model, Rule(".*", weight=W8, act=A8))
  with pytest.raises(ValueError, match="'fc'.*calibrat"):
    jaxq.nnx.convert(q)  # a static activation range never calibrated
  with pytest.raises(ValueError, match="at least one non-empty batch"):
    jaxq.nnx.calibrate(q, [])
  with pytest.raises(ValueError, match="at least one non-empty batch"):
    jaxq.nnx.calibrate(q, [jnp.zeros((0, 32))])
  with pytest.raises(ValueError, match="no finite activation value at layer.*'fc'"):
    jaxq.nnx.calibrate(q, [jnp.full((2, 32), jnp.nan)])
  assert not hasattr(q.fc, "jaxq_act")  # a failed calibration leaves the model as it was
  with pytest.raises(ValueError, match="no quantized layer"):
    jaxq.nnx.calibrate(model, [jnp.ones((2, 32))])
  # Dynamic activations and weight-only rules need no calibration.
  for act in (QuantSpec(8, granularity="tensor", dynamic=True), None):
    served = jaxq.nnx.convert(jaxq.nnx.quantize_model(model, Rule(".*", weight=W8,
                                                                  act=act)))
    assert isinstance(served.fc.kernel.get_value(), QArray)
  with pytest.raises(ValueError, match="'fc' hold QArray kernels already"):
    jaxq.nnx.convert(served)


def test_calibration_runs_as_at_inference():
  """BatchNorm uses its running statistics, Dropout is off, nothing but the observers
  changes, and the model's own (training) mode is kept."""
  model = Net(rngs=nnx.Rngs(0))
  model.bn.mean.set_value(jnp.full((32,), 0.3))
  q = jaxq.nnx.quantize_model(model, Rule(".*", weight=W8, act=A8))
  x = _x((16, 16), 5)
  before = nnx.state(q, nnx.Not(jaxq.nnx.QuantStats))
  jaxq.nnx.calibrate(q, [x])
  after = nnx.state(q, nnx.Not(jaxq.nnx.QuantStats))
  jax.tree_util.tree_map(_same, after, before)
  assert q.bn.use_running_average is False and q.drop.deterministic is False
  h = nnx.relu(nnx.view(model, use_running_average=True).bn(model.layers[0](x)))
  obs = q.layers[1].jaxq_act.get_value()
  np.testing.assert_allclose(obs["lo"].reshape(()), jnp.min(h), rtol=1e-6)
  np.testing.assert_allclose(obs["hi"].reshape(()), jnp.max(h), rtol=1e-6)


def test_checkpoint_and_export_roundtrip(tmp_path):
  rules = [Rule("layers/0", weight=QuantSpec(4, granularity="group", group_size=8),
                act=A8),
           Rule(".*", weight=W8, act=QuantSpec(8, granularity="tensor", dynamic=True))]
  x = _x((8, 16), 7)

  def served(seed):
    q = jaxq.nnx.quantize_model(Net(rngs=nnx.Rngs(seed)), rules)
    return jaxq.nnx.convert(jaxq.nnx.calibrate(q, [x]))

  sm = served(0)
  sm.eval()
  want = sm(x)
  state = nnx.state(sm)
  checkpoint.save(tmp_path / "nnx.msgpack", state)
  other = served(1)
  other.eval()
  assert not np.allclose(other(x), want)
  nnx.update(other, checkpoint.restore(tmp_path / "nnx.msgpack", nnx.state(other)))
  np.testing.assert_array_equal(other(x), want)
  # A module target gives a new module; the target is left as it was.
  fresh = served(2)
  fresh.eval()
  before = fresh(x)
  back = checkpoint.restore(tmp_path / "nnx.msgpack", fresh)
  np.testing.assert_array_equal(back(x), want)
  np.testing.assert_array_equal(fresh(x), before)
  raw = checkpoint.restore(tmp_path / "nnx.msgpack")
  assert isinstance(raw["layers"]["0"]["kernel"], QArray)
  assert raw["layers"]["0"]["kernel"].values.dtype == jnp.uint8  # packed int4
  checkpoint.save(tmp_path / "module.msgpack", sm)  # a module saves as its state
  assert (tmp_path / "module.msgpack").read_bytes() == (
      tmp_path / "nnx.msgpack").read_bytes()
  bad = Net(rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="checkpoint has .layers/0/"):
    checkpoint.restore(tmp_path / "nnx.msgpack", nnx.state(bad))

  exp = jexport.load_serving(jexport.export_serving(sm, state, x).serialize())
  np.testing.assert_array_equal(exp.call(jexport.serving_state(sm), x), want)


def test_stacked_layers_serve_what_qat_evaluates():
  """A stack converts one layer at a time (stacking axes on every QArray leaf) and serves
  exactly what QAT computes in evaluation mode from the calibrated observers."""
  x = _x((4, 8), 9)
  rule = Rule(".*", weight=W8, act=QuantSpec(8, granularity="tensor", calibration="ema"))
  q = jaxq.nnx.quantize_model(Stack(), rule)
  served = jaxq.nnx.convert(jaxq.nnx.calibrate(q, [x]))
  kernel = served.layers.kernel.get_value()
  assert kernel.shape == (8, 8) and kernel.values.shape == (3, 8, 8)
  assert served.layers.jaxq_act_scale.get_value().shape == (3, 1, 1)
  q.eval()
  np.testing.assert_allclose(served(x), q(x), rtol=1e-6, atol=1e-6)


def test_fqvit_ptf_layernorm_calibrates_and_serves_as_linen():
  """A PTF LayerNorm feeding a W8A8 Dense: NNX calibrate / convert serve what Linen does."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  class LinenLnFc(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, name="fc")(nn.LayerNorm(name="ln")(x))

  class NnxLnFc(nnx.Module):

    def __init__(self, rngs):
      self.ln = nnx.LayerNorm(16, rngs=rngs)
      self.fc = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
      return self.fc(self.ln(x))

  ptf = jaxq.QuantSpec(bits=8, scheme="ptf", granularity="tensor", signed=False,
                       symmetric=False)
  rules = [jaxq.Rule("ln", weight=None, act=ptf),
           jaxq.Rule("fc", act=jaxq.QuantSpec(granularity="tensor"))]
  x = jax.random.normal(jax.random.key(0), (8, 16)) * jnp.linspace(0.1, 10.0, 16)
  lmodel = LinenLnFc()
  variables = lmodel.init(jax.random.key(1), x)
  nmodel = NnxLnFc(nnx.Rngs(0))
  nmodel.fc.kernel.set_value(variables["params"]["fc"]["kernel"])
  nmodel.fc.bias.set_value(variables["params"]["fc"]["bias"])

  lq = jaxq.quantize_model(lmodel, rules)
  served_model, served_vars = jaxq.convert(lq, jaxq.calibrate(lq, variables, [x]))
  nq = jaxq.nnx.calibrate(jaxq.nnx.quantize_model(nmodel, rules), [x])
  served = jaxq.nnx.convert(nq)
  want = served_model.apply(served_vars, x)
  np.testing.assert_allclose(served(x), want, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(want - lmodel.apply(variables, x)))) > 0  # quantized

  uncalibrated = jaxq.nnx.quantize_model(nmodel, [rules[0], jaxq.Rule("fc")])
  with pytest.raises(ValueError, match="'ln'"):
    jaxq.nnx.convert(uncalibrated)
