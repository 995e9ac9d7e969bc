"""FQ-ViT pieces (jaxq.flax.fqvit): PTF LayerNorm inputs, log2 attention probabilities."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxq import estimators
from jaxq.flax import fqvit, ptq
from jaxq.flax.linen import QuantizedModel, quantize_model
from jaxq.spec import QuantSpec, Rule

PTF = QuantSpec(8, signed=False, symmetric=False, scheme="ptf")
LOG2 = QuantSpec(4, signed=False, scheme="log2")
RULES = (Rule(r"LayerNorm_\d", weight=None, act=PTF),
         Rule("attn", weight=None, act=LOG2))


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, mask=None):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, name="attn")(
        y, y, mask=mask)
    return nn.LayerNorm()(x + y)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(4, 6, 16)).astype(np.float32)
  x[..., 3] *= 8.0  # inter-channel variation: what PTF is for
  return jnp.asarray(x)


def _ptf_ref(x, bits=8):
  """FQ-ViT PTF fake quantization in float64 numpy (scale, zp and factors from x)."""
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  qmax = 2**bits - 1
  lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
  top = max((hi - lo) / qmax, 1e-8)
  zp = np.clip(0 - np.round(lo / top), 0, qmax)
  base = top / 8.0
  fq = lambda s: (np.clip(np.round(x / s) + zp, 0, qmax) - zp) * s
  errs = np.stack([((x - fq(base * 2**a)) ** 2).sum(0) for a in range(4)])
  alpha = errs.argmin(0)
  return fq(base * 2.0**alpha)


def test_ptf_observer_matches_numpy_and_ptf_calibrate():
  x = _data()
  st = fqvit.ptf_observer_update(fqvit.ptf_observer_init(16), x, PTF)
  scale, zp, fexp = fqvit.ptf_observer_qparams(st, PTF)
  s2, z2, f2 = estimators.ptf_calibrate(x, 8, signed=False)
  np.testing.assert_allclose(scale, s2, rtol=1e-6)
  np.testing.assert_array_equal(zp, z2)
  np.testing.assert_array_equal(fexp, f2)
  assert int(fexp[3]) > int(np.median(np.asarray(fexp)))  # the wide channel gets a factor
  # Integer reconstruction ((q - z) << alpha) * s equals the float reference.
  got = fqvit.ptf_serve(x, scale, zp, fexp.astype(jnp.int8), PTF)
  np.testing.assert_allclose(np.asarray(got).reshape(-1, 16), _ptf_ref(x), rtol=1e-6,
                             atol=1e-6)
  # A second batch: running per-channel range, errors of the last batch.
  x2 = _data(1) * 1.5
  st2 = fqvit.ptf_observer_update(st, x2, PTF)
  np.testing.assert_array_equal(st2["hi"], np.maximum(np.asarray(x).reshape(-1, 16).max(0),
                                                      np.asarray(x2).reshape(-1, 16).max(0)))


def test_log2_attention_qat_and_serving():
  model = Block()
  x = _data()
  v = model.init(jax.random.key(0), x)
  qm = QuantizedModel(model, RULES)
  # QAT: equals the float block with log2-quantized probabilities and PTF LayerNorm inputs.
  y = qm.apply(v, x)

  def manual(x):
    ln0 = nn.LayerNorm()
    p = v["params"]
    h = ln0.apply({"params": p["LayerNorm_0"]}, estimators.ptf_fake_quant(
        x, *estimators.ptf_calibrate(x, 8, signed=False), 0, 255))
    attn = nn.MultiHeadDotProductAttention(
        num_heads=2, qkv_features=16,
        attention_fn=lambda q, k, val, **kw: jnp.einsum(
            "...hqk,...khd->...qhd", estimators.log2_fake_quant(
                nn.dot_product_attention_weights(q, k), 4), val))
    h = attn.apply({"params": p["attn"]}, h, h)
    z = x + h
    return nn.LayerNorm().apply({"params": p["LayerNorm_1"]}, estimators.ptf_fake_quant(
        z, *estimators.ptf_calibrate(z, 8, signed=False), 0, 255))

  np.testing.assert_allclose(y, manual(x), rtol=1e-5, atol=1e-5)
  assert not np.allclose(y, model.apply(v, x), atol=1e-3)  # quantization did something

  # Gradients flow through the log2 quantizer (STE) and PTF.
  g = jax.grad(lambda p: jnp.sum(qm.apply({"params": p}, x) ** 2))(v["params"])
  assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree_util.tree_leaves(g))
  assert float(jnp.abs(g["attn"]["query"]["kernel"]).sum()) > 0

  # Calibrate + convert + serve: shifts on log2 codes, PTF from calibrated statistics
  # (observed on the float forward, so not QAT's ranges); equal to simulated PTQ.
  qmodel = quantize_model(model, RULES)
  cv = ptq.calibrate(qmodel, v, [x])
  sm, sv = ptq.convert(qmodel, cv)
  assert set(sv["params"]["LayerNorm_1"]) >= {fqvit.PTF_SCALE, fqvit.PTF_FACTOR_EXP}
  out = sm.apply(sv, x)
  np.testing.assert_allclose(out, y, rtol=0.1, atol=0.2)
  sim = QuantizedModel(model, RULES, mode=ptq.SIM_MODE)
  np.testing.assert_allclose(sim.apply(cv, x), out, rtol=1e-5, atol=1e-5)
  # The serving attention multiplies by 2^-q: exactly log2_matmul of the codes.
  jaxpr = str(jax.make_jaxpr(lambda vv: sm.apply(vv, x))(sv))
  assert "shift_left" in jaxpr  # PTF's (q - z) << alpha


def test_masked_attention_serving_and_double_wiring():
  model = Block()
  x = _data(2)
  mask = nn.make_attention_mask(jnp.arange(6)[None] < jnp.array([[6], [4], [3], [5]]),
                                jnp.arange(6)[None] < jnp.array([[6], [4], [3], [5]]))
  v = model.init(jax.random.key(1), x, mask)
  qmodel = QuantizedModel(model, RULES)
  cv = ptq.calibrate(qmodel, v, [(x, mask)])
  sm, sv = ptq.convert(qmodel, cv)
  y = sm.apply(sv, x, mask)
  sim = QuantizedModel(model, RULES, mode=ptq.SIM_MODE)
  np.testing.assert_allclose(y, sim.apply(cv, x, mask), rtol=1e-5, atol=1e-5)
  cos = jnp.sum(y * model.apply(v, x, mask)) / jnp.linalg.norm(y) / jnp.linalg.norm(
      model.apply(v, x, mask))
  assert float(cos) > 0.98


def test_custom_attention_fn_is_rejected():
  class Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.MultiHeadDotProductAttention(
          num_heads=2, qkv_features=16, name="attn",
          attention_fn=lambda q, k, v, **kw: nn.dot_product_attention(q, k, v))(x, x)

  m = Custom()
  x = _data()
  v = m.init(jax.random.key(0), x)
  try:
    QuantizedModel(m, RULES).apply(v, x)
  except ValueError as e:
    assert "custom attention_fn" in str(e)
  else:
    raise AssertionError("expected ValueError")
