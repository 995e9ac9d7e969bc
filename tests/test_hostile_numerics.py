"""Hostile but fair input to the lower tier (numerics, estimators, specs, QArray,
observers, checkpoints): every case either gives the documented result or a ValueError
naming the field or key path -- never a silent NaN, a silently changed value or an
obscure crash."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import jaxq
from jaxq import calibration, checkpoint, estimators, numerics, qarray, quantizer
from jaxq.params import quantize_params
from jaxq.spec import QuantSpec, Rule

EPS = numerics.SCALE_EPS
X3 = jnp.array([1.0, 0.0, -1.0], jnp.float32)


# ------------------------------------------------------------------ spec validation


@pytest.mark.parametrize("field,value", [
    ("bits", 2.5), ("bits", True), ("bits", "8"), ("bits", None), ("bits", 8.0),
    ("percentile", "99"), ("percentile", True), ("percentile", None),
    ("percentile", float("inf")), ("ema_decay", "0.5"), ("ema_decay", False),
    ("ema_decay", None), ("axis", 1.0), ("axis", "0"), ("axis", True),
])
def test_spec_numeric_fields_raise_value_error(field, value):
  with pytest.raises(ValueError, match=f"QuantSpec.{field}"):
    QuantSpec(**{field: value})


@pytest.mark.parametrize("value", [4.0, True, "4", 0, -2])
def test_spec_group_size_raises_value_error(value):
  with pytest.raises(ValueError, match="QuantSpec.group_size"):
    QuantSpec(granularity="group", group_size=value)


def test_spec_accepts_numpy_integers_as_ints():
  s = QuantSpec(bits=np.int64(4), axis=np.int32(0), granularity="group",
                group_size=np.int64(8))
  assert s == QuantSpec(bits=4, axis=0, granularity="group", group_size=8)
  assert type(s.bits) is int and type(s.axis) is int and type(s.group_size) is int
  assert hash(s) == hash(QuantSpec(bits=4, axis=0, granularity="group", group_size=8))


@pytest.mark.parametrize("value", [2.0, True, "2", 3, 0, 16])
def test_rule_act_compress_raises_value_error(value):
  with pytest.raises(ValueError, match="Rule.act_compress.*1, 2, 4, 8"):
    Rule(act_compress=value)


@pytest.mark.parametrize("scheme", ["log2", "ptf"])
def test_rule_rejects_weight_schemes_that_cannot_hold_signed_weights(scheme):
  """A log2 weight spec gave NaN for every negative weight through quantize_params."""
  with pytest.raises(ValueError, match="Rule.weight.*scheme.*'uniform'"):
    Rule(weight=QuantSpec(scheme=scheme, signed=False))
  Rule(weight=None, act=QuantSpec(scheme=scheme, signed=False))  # activations: fine


# -------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_without_key_raises_outside_flax():
  spec = QuantSpec(bits=4, rounding="stochastic")
  w = jax.random.normal(jax.random.key(0), (8, 4))
  with pytest.raises(ValueError, match="stochastic.*key"):
    jaxq.quantize(w, spec)
  with pytest.raises(ValueError, match="stochastic.*key"):
    quantizer.fake_quantize(w, spec)
  with pytest.raises(ValueError, match="'d/kernel'.*stochastic.*key"):
    quantize_params({"d": {"kernel": w}}, [Rule(".*", weight=spec)])
  a = quantize_params({"d": {"kernel": w}}, [Rule(".*", weight=spec)],
                      key=jax.random.key(1))["d"]["kernel"]
  np.testing.assert_array_equal(
      a, quantizer.fake_quantize(w, spec, key=jax.random.fold_in(jax.random.key(1), 0)))


def test_stochastic_rounding_without_rng_rounds_to_nearest_in_flax_modules():
  """Contract 3: quantize_model draws from the "jaxq" stream when given, else nearest."""
  spec = QuantSpec(bits=4, rounding="stochastic")
  q = jaxq.quantize_model(nn.Dense(4), [Rule(".*", weight=spec)])
  qn = jaxq.quantize_model(nn.Dense(4), [Rule(".*", weight=spec.replace(rounding="nearest"))])
  x = jax.random.normal(jax.random.key(0), (3, 8))
  v = q.init(jax.random.key(1), x)
  np.testing.assert_array_equal(q.apply(v, x), qn.apply(v, x))


# ------------------------------------------------------- values training can reach


@pytest.mark.parametrize("bad", [0.0, 1e-30, -1e-30])
def test_fake_quant_floors_scale(bad):
  sign = -1.0 if bad < 0 else 1.0
  ref = estimators.fake_quant(X3 * 1e-6, sign * EPS, 0, -128, 127)
  assert np.all(np.isfinite(ref)) and np.any(ref != 0)
  for fn in (estimators.fake_quant, jax.jit(estimators.fake_quant, static_argnums=(3, 4))):
    out = fn(X3 * 1e-6, jnp.float32(bad), 0, -128, 127)
    np.testing.assert_array_equal(out, ref)
  # NaN scales are not floored: they propagate.
  assert np.all(np.isnan(estimators.fake_quant(X3, jnp.nan, 0, -128, 127)))
  spec = QuantSpec(granularity="tensor")
  q = qarray.quantize_with(X3 * 1e-6, spec, jnp.float32(bad))
  np.testing.assert_array_equal(jaxq.dequantize(q), ref)
  assert float(q.scale) == sign * EPS


def test_negative_scale_is_a_mirrored_grid():
  """A negative step (LSQ can learn one) quantizes on the mirrored grid."""
  x = jnp.linspace(-2.0, 2.0, 41)
  np.testing.assert_array_equal(estimators.fake_quant(x, -0.3, 0, -8, 7),
                                -estimators.fake_quant(-x, 0.3, 0, -8, 7))


@pytest.mark.parametrize("bad", [0.0, 1e-30])
def test_lsq_floors_scale_and_its_gradient_passes_through(bad):
  def loss(s):
    return jnp.sum(estimators.lsq_fake_quant(X3, s, 0.0, -8, 7, 1.0) * jnp.array([1., 2., 3.]))

  g = jax.grad(loss)(jnp.float32(bad))
  g_eps = jax.grad(loss)(jnp.float32(EPS))
  assert np.isfinite(g) and g == g_eps != 0
  np.testing.assert_array_equal(estimators.lsq_fake_quant(X3, bad, 0.0, -8, 7),
                                estimators.lsq_fake_quant(X3, EPS, 0.0, -8, 7))


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_pact_floors_alpha(bad):
  out, g = jax.value_and_grad(
      lambda a: jnp.sum(estimators.pact_fake_quant(X3, a, 4)))(jnp.float32(bad))
  floor = EPS * 15
  np.testing.assert_array_equal(
      estimators.pact_fake_quant(X3, bad, 4), estimators.pact_fake_quant(X3, floor, 4))
  assert np.isfinite(out) and g == 1.0  # x = 1 is >= alpha: alpha can grow back


def test_qmin_above_qmax_arrays_raise_when_concrete_and_give_nan_when_traced():
  lo, hi = jnp.array([-8, 5, -8]), jnp.array([7, -5, 7])
  with pytest.raises(ValueError, match="qmin.*<= qmax"):
    estimators.fake_quant(X3, 0.1, 0, lo, hi)
  with pytest.raises(ValueError, match="qmin.*<= qmax"):
    estimators.lsq_fake_quant(X3, 0.1, 0, np.asarray(lo), np.asarray(hi))
  out = jax.jit(lambda a, b: estimators.fake_quant(X3, 0.1, 0, a, b))(lo, hi)
  np.testing.assert_array_equal(np.isnan(out), [False, True, False])
  np.testing.assert_allclose(np.asarray(out)[[0, 2]], [0.7, -0.8], rtol=1e-6)


def test_lsq_array_ranges_match_per_channel_ints():
  x = jax.random.normal(jax.random.key(0), (6, 3)) * 2
  s = jnp.array([[0.1, 0.2, 0.3]])
  lo, hi = jnp.array([[-128, -8, -2]]), jnp.array([[127, 7, 1]])

  def loss(s, lo, hi):
    return jnp.sum(estimators.lsq_fake_quant(x, s, 0.0, lo, hi) ** 2)

  g = jax.grad(loss)(s, lo, hi)
  for c, (a, b) in enumerate([(-128, 127), (-8, 7), (-2, 1)]):
    gc = jax.grad(lambda sc: jnp.sum(estimators.lsq_fake_quant(
        x[:, c:c + 1], sc, 0.0, a, b, 1 / np.sqrt(6 * b)) ** 2))(s[:, c:c + 1])
    np.testing.assert_allclose(g[0, c], gc[0, 0], rtol=1e-5)
  with pytest.raises(ValueError, match="qmax"):
    estimators.lsq_fake_quant(x, s, 0.0, jnp.array([[-128, -1, -2]]), jnp.array([[127, 0, 1]]))


# ----------------------------------------------------------------- extreme ranges


@pytest.mark.parametrize("symmetric", [True, False])
def test_full_float32_range_quantizes_without_nan(symmetric):
  big = np.float32(3.4e38)
  x = jnp.array([big, -big, 1e38, 0.0], jnp.float32)
  spec = QuantSpec(symmetric=symmetric, granularity="tensor")
  scale, _ = quantizer.compute_qparams(x, spec)
  step = float(scale.reshape(()))
  assert np.isfinite(step)
  for y in (jaxq.dequantize(jaxq.quantize(x, spec)), quantizer.fake_quantize(x, spec)):
    assert np.all(np.isfinite(y))
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - np.asarray(x, np.float64)),
                                 0.5001 * step)


def test_x64_values_beyond_float32_are_not_treated_as_inf():
  with jax.enable_x64(True):
    x = jnp.array([1e300, -3e299, 2.5e299, 1.0], jnp.float64)
    for spec in (QuantSpec(granularity="tensor"),
                 QuantSpec(granularity="tensor", symmetric=False)):
      y = np.asarray(quantizer.fake_quantize(x, spec))
      yq = np.asarray(jaxq.dequantize(jaxq.quantize(x, spec)))
      for out in (y, yq):
        assert out.dtype == np.float64 and np.all(np.isfinite(out))
        np.testing.assert_allclose(out[:3], np.asarray(x[:3]), rtol=0.01)


# ------------------------------------------------------------------ empty batches


@pytest.mark.parametrize("spec", [
    QuantSpec(), QuantSpec(bits=4, granularity="tensor"),
    QuantSpec(symmetric=False, granularity="group", group_size=2, axis=1)])
def test_empty_arrays_quantize_and_fake_quantize(spec):
  x = jnp.zeros((0, 4), jnp.float32) if spec.granularity != "group" else jnp.zeros((4, 0))
  q = jaxq.quantize(x, spec)
  assert jaxq.dequantize(q).shape == x.shape
  assert quantizer.fake_quantize(x, spec).shape == x.shape
  assert jax.jit(lambda a: jaxq.dequantize(jaxq.quantize(a, spec)))(x).shape == x.shape
  assert estimators.fake_quant(x, 0.1, 0, -8, 7).shape == x.shape
  g = jax.grad(lambda s: jnp.sum(estimators.lsq_fake_quant(x, s, 0.0, -8, 7)))(0.1)
  assert g == 0.0


@pytest.mark.parametrize("method", ["minmax", "ema", "percentile", "mse"])
def test_empty_batch_leaves_observer_state_unchanged(method):
  spec = QuantSpec(granularity="tensor", calibration=method, symmetric=False)
  x = jax.random.normal(jax.random.key(0), (16, 5))
  st = calibration.observer_init(spec, (1, 1))
  st = calibration.observer_update(st, x, spec, (0, 1))
  update = jax.jit(calibration.observer_update, static_argnums=(2, 3))
  for f in (calibration.observer_update, update):
    after = f(st, jnp.zeros((0, 5), jnp.float32), spec, (0, 1))
    jax.tree.map(np.testing.assert_array_equal, after, st)
  empty = calibration.observer_update(calibration.observer_init(spec, (1, 5)),
                                      jnp.zeros((0, 5)), spec, (0,))
  assert float(empty["n"].sum()) == 0
  with pytest.raises(ValueError, match="observer state shape"):
    calibration.observer_update(st, jnp.zeros((0, 5)), spec, (0,))


# ----------------------------------------------------------- "mse" over many batches


def _quant_mse(x, lo, hi, spec):
  scale, zp = quantizer.qparams_from_range(lo, hi, spec)
  return float(jnp.mean((estimators.fake_quant(x, scale, zp, spec.qmin, spec.qmax) - x) ** 2))


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_observer_over_batches_never_loses_to_minmax(symmetric):
  """Student-t (df=2), 4 batches, 8 bits: the averaged per-batch optima clipped the one
  outlier batch (quantization MSE 0.140 against 0.060 for min-max)."""
  rng = np.random.default_rng(0)
  batches = rng.standard_t(2, size=(4, 4096)).astype(np.float32)
  x = jnp.asarray(batches.reshape(-1))
  errs = {}
  for method in ("mse", "minmax"):
    spec = QuantSpec(granularity="tensor", calibration=method, symmetric=symmetric)
    st = calibration.observer_init(spec, (1,))
    for b in batches:
      st = calibration.observer_update(st, jnp.asarray(b), spec)
    errs[method] = _quant_mse(x, *calibration.observer_range(st, spec), spec)
  assert errs["mse"] <= errs["minmax"]
  # ... and it does clip: as good as the exact search on all the data at once.
  spec = QuantSpec(granularity="tensor", calibration="mse", symmetric=symmetric)
  best = _quant_mse(x, *calibration.mse_range(x, spec), spec)
  assert best < errs["minmax"] and errs["mse"] <= 1.01 * best


# -------------------------------------------------------------------- checkpoints


def _q(shape=(8, 4), bits=8):
  return jaxq.quantize(jax.random.normal(jax.random.key(0), shape), QuantSpec(bits=bits))


@pytest.mark.parametrize("bits", [8, 4])
def test_qarray_metadata_checked_against_arrays_on_restore(tmp_path, bits):
  state = {"layer": {"kernel": _q(bits=bits)}}
  raw = serialization.to_state_dict(state)
  raw["layer"]["kernel"]["meta"]["shape"] = [4, 8]
  path = tmp_path / "bad.msgpack"
  path.write_bytes(serialization.msgpack_serialize(raw))
  with pytest.raises(ValueError, match="layer/kernel.*shape"):
    checkpoint.restore(path)
  with pytest.raises(ValueError, match="layer/kernel"):
    checkpoint.restore(path, state)
  with pytest.raises(ValueError, match="shape"):
    qarray.qarray_from_state(raw["layer"]["kernel"])


def test_qarray_scale_and_dtype_checked_on_restore(tmp_path):
  q = _q()
  for change, match in ((dict(scale=np.ones((1, 5), np.float32)), "scale"),
                        (dict(values=np.asarray(q.values).astype(np.int16)), "values")):
    raw = serialization.to_state_dict({"w": q})
    raw["w"].update(change)
    with pytest.raises(ValueError, match=match):
      qarray.qarray_from_state(raw["w"])


def test_stacked_qarray_restores(tmp_path):
  """Leaves of a QArray stacked over layers (vmap / scan) carry leading axes."""
  x = jax.random.normal(jax.random.key(0), (3, 8, 4))
  q = jax.vmap(lambda a: jaxq.quantize(a, QuantSpec(bits=4)))(x)
  checkpoint.save(tmp_path / "s.msgpack", {"q": q})
  r = checkpoint.restore(tmp_path / "s.msgpack")["q"]
  np.testing.assert_array_equal(jax.vmap(jaxq.dequantize)(r), jax.vmap(jaxq.dequantize)(q))


def test_restore_mismatch_names_key_path(tmp_path):
  state = {"params": {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}},
           "step": jnp.int32(3)}
  path = tmp_path / "c.msgpack"
  checkpoint.save(path, state)
  bad_shape = {"params": {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(4)}},
               "step": jnp.int32(0)}
  with pytest.raises(ValueError, match=r"params/dense/kernel.*\(3, 4\).*\(4, 3\)"):
    checkpoint.restore(path, bad_shape)
  bad_dtype = {**state, "step": jnp.float32(0)}
  with pytest.raises(ValueError, match="'step'.*int32.*float32"):
    checkpoint.restore(path, bad_dtype)
  missing = {**state, "params": {"dense": {"kernel": jnp.ones((3, 4))}}}
  with pytest.raises(ValueError, match="params/dense/bias.*target"):
    checkpoint.restore(path, missing)
  extra = {**state, "opt": {"mu": jnp.ones(2)}}
  with pytest.raises(ValueError, match="opt/mu.*checkpoint"):
    checkpoint.restore(path, extra)
  with pytest.raises(ValueError, match="params/dense/kernel.*QArray"):
    checkpoint.restore(path, {**state, "params": {"dense": {"kernel": _q((3, 4)),
                                                            "bias": jnp.zeros(4)}}})


@pytest.mark.parametrize("data", [b"\x93\x01\x02\x03garbage", b"", b"\xc1", b"\x05"])
def test_garbage_checkpoint_is_a_clear_value_error(tmp_path, data):
  path = tmp_path / "g.msgpack"
  path.write_bytes(data)
  with pytest.raises(ValueError, match="g.msgpack.*not a jaxq checkpoint"):
    checkpoint.restore(path, {"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="g.msgpack.*not a jaxq checkpoint"):
    checkpoint.restore(path)
