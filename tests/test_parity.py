"""Linen / NNX parity (Contract 6): a Linen model and its NNX twin with the same weights,
quantized with the same rules and calibrated on the same batches, give the same QAT
outputs and gradients, calibrated ranges, served outputs and layer sensitivities.

The calibrate / convert / serve rows double as the NNX PTQ scenario table: every
calibration method, static and dynamic activations, W8A8 (int8 matmuls) and W4
weight-only with groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax import traverse_util

import jaxq
from jaxq import analysis
from jaxq import kernels
from jaxq.flax import ptq
from jaxq.flax.nnx_ptq import quantized_modules
from jaxq.qarray import QArray
from jaxq.spec import QuantSpec, Rule
from tests._twins_ptq import batch, twin

W8 = QuantSpec(8)
W4G = QuantSpec(4, granularity="group", group_size=8)


def A8(**kw):
  return QuantSpec(8, granularity="tensor", **kw)


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def twins():
  return {name: twin(name) for name in ("mlp", "cnn", "attn")}


# --------------------------------------------------------------------------------------
# QAT
# --------------------------------------------------------------------------------------

QAT_CASES = [
    ("mlp", Rule(".*", weight=W8, act=A8())),  # W8A8: int8 forward matmuls
    ("cnn", Rule(".*", weight=W8, act=A8())),
    ("mlp", Rule(".*", weight=W4G, act=A8(dynamic=True))),
    ("cnn", Rule(".*", weight=QuantSpec(4, estimator="lsq"),
                 act=A8(estimator="lsq", symmetric=False, signed=False))),
]


@pytest.mark.parametrize("name,rule", QAT_CASES,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(QAT_CASES)])
def test_qat_outputs_and_gradients(twins, name, rule):
  lm, v, nm, x = twins[name]
  lq = jaxq.quantize_model(lm, [rule])
  learned = rule.weight.estimator != "ste"
  lv = jaxq.flax.init_quant_params(lq, v, x) if learned else v
  nq = jaxq.nnx.quantize_model(nm, [rule])
  if learned:
    nq(x)  # training mode: learned activation steps initialised from x, as in Linen

  def l_loss(p):
    y = lq.apply({"params": p}, x)
    return jnp.sum(y ** 2), y

  def n_loss(m):
    y = m(x)
    return jnp.sum(y ** 2), y

  (_, y_l), g_l = jax.value_and_grad(l_loss, has_aux=True)(lv["params"])
  (_, y_n), g_n = nnx.value_and_grad(n_loss, has_aux=True)(nq)
  _close(y_n, y_l)
  flat_l = traverse_util.flatten_dict(g_l)
  flat_n = traverse_util.flatten_dict(nnx.to_pure_dict(g_n))
  assert set(flat_l) == {tuple(map(str, k)) for k in flat_n}
  for k, g in flat_n.items():
    _close(g, flat_l[tuple(map(str, k))], 1e-4)


# --------------------------------------------------------------------------------------
# Calibrate, convert, serve (the NNX PTQ scenario table)
# --------------------------------------------------------------------------------------

SERVE_CASES = {
    "w8a8-minmax": ("mlp", W8, A8()),
    "w8a8-ema-asym": ("mlp", W8, A8(calibration="ema", symmetric=False)),
    "w8a8-percentile": ("mlp", W8, A8(calibration="percentile", percentile=99.0)),
    "w8a8-mse": ("mlp", W8, A8(calibration="mse")),
    "w8a8-dynamic": ("mlp", W8, A8(dynamic=True)),
    "w4-group-weight-only": ("mlp", W4G, None),
    "cnn-w8a8-channel-percentile": ("cnn", W8, QuantSpec(8, calibration="percentile")),
    "attn-w8a8-minmax": ("attn", W8, A8()),
}


def _observers(lin_stats: dict, nq) -> list[tuple[str, dict, dict]]:
  """``(path, linen observer, nnx observer)`` of every quantized NNX layer with one."""
  out = []
  for path, layer, _ in quantized_modules(nq):
    if hasattr(layer, "jaxq_act"):
      node = lin_stats
      for part in path.split("/"):
        node = node[part]
      out.append((path, node["jaxq_act"], layer.jaxq_act.get_value()))
  return out


@pytest.mark.parametrize("case", list(SERVE_CASES))
def test_calibrate_convert_serve(twins, case, monkeypatch):
  name, wspec, aspec = SERVE_CASES[case]
  lm, v, nm, x = twins[name]
  rules = [Rule(".*", weight=wspec, act=aspec)]
  batches = [batch(name, 1), batch(name, 2), batch(name, 3)]
  x_test = batch(name, 4)

  lq = jaxq.quantize_model(lm, rules)
  lv = ptq.calibrate(lq, v, batches)
  sm, sv = ptq.convert(lq, lv)
  y_l = sm.apply(sv, x_test)

  nq = jaxq.nnx.quantize_model(nm, rules)
  assert jaxq.nnx.calibrate(nq, batches) is nq
  static = aspec is not None and not aspec.dynamic
  obs = _observers(lv.get("quant_stats", {}), nq)
  assert len(obs) == (len(list(quantized_modules(nq))) if static else 0)
  for _, lo, no in obs:  # the same calibrated ranges (min-max, ema, percentile, mse)
    assert set(lo) == set(no)
    for key in lo:
      _close(no[key], lo[key])
  served = jaxq.nnx.convert(nq)
  calls = []
  real = kernels.int8_matmul
  monkeypatch.setattr(kernels, "int8_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
  y_n = served(x_test)
  _close(y_n, y_l, 1e-4 if name == "attn" else 1e-5)
  w8a8 = wspec.bits == 8 and aspec is not None and aspec.granularity == "tensor"
  assert bool(calls) == w8a8  # W8A8 layers serve through kernels.int8_matmul

  # The serving state: QArray kernels (int8 / packed int4), no float kernel, scales.
  float_y = nm(x_test)
  assert float(jnp.linalg.norm(y_n - float_y)) < 0.2 * float(jnp.linalg.norm(float_y))
  for path, layer, _ in quantized_modules(served):
    q = layer.kernel.get_value()
    assert isinstance(q, QArray), path
    assert q.values.dtype == (jnp.int8 if wspec.bits == 8 else jnp.uint8)
    assert q.values.size * 8 == np.prod(q.shape) * wspec.bits
    assert hasattr(layer, "jaxq_act_scale") == static
    assert not hasattr(layer, "jaxq_act")
  leaves = jax.tree_util.tree_leaves(nnx.state(served))
  kernel_shapes = {tuple(m.kernel.get_value().shape) for _, m, _ in quantized_modules(nq)}
  assert not [l for l in leaves if jnp.issubdtype(l.dtype, jnp.floating)
              and tuple(l.shape) in kernel_shapes]


def test_learned_steps_served_as_linen(twins):
  lm, v, nm, x = twins["mlp"]
  rules = [Rule(".*", weight=QuantSpec(4, estimator="lsq"), act=A8(estimator="pact",
                                                                   signed=False))]
  lq = jaxq.quantize_model(lm, rules)
  lv = jaxq.flax.init_quant_params(lq, v, x)
  nq = jaxq.nnx.quantize_model(nm, rules)
  nq(x)
  sm, sv = ptq.convert(lq, lv)
  served = jaxq.nnx.convert(nq)
  _close(served(x), sm.apply(sv, x))
  assert not hasattr(served.fc1, "jaxq_weight_scale")


# --------------------------------------------------------------------------------------
# Sensitivity and bit allocation
# --------------------------------------------------------------------------------------


def test_sensitivity_and_allocation_match(twins):
  lm, v, nm, _ = twins["mlp"]
  batches = [batch("mlp", 5), batch("mlp", 6)]
  rules = (Rule(".*", weight=W8, act=A8()),)
  rep_l = analysis.sensitivity(lm, v, batches, rules, bits=(4, 8))
  rep_n = analysis.sensitivity(nm, batches, rules, bits=(4, 8))
  assert sorted(rep_n.paths) == sorted(rep_l.paths) == ["fc1", "fc2"]
  for p in rep_l.paths:
    for b in (4, 8):
      rl, rn = rep_l.row(p, b), rep_n.row(p, b)
      assert rn.params == rl.params
      np.testing.assert_allclose(rn.snr_db, rl.snr_db, rtol=1e-4)
      np.testing.assert_allclose(rn.cosine, rl.cosine, rtol=1e-6)
  assert rep_n.row("fc1", 8).snr_db > rep_n.row("fc1", 4).snr_db + 10
  assert analysis.allocate_bits(rep_n, 6.0).bits == analysis.allocate_bits(rep_l, 6.0).bits
