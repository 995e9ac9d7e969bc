"""Quantized embeddings (Contract 7, last bullet): nn.Embed / nnx.Embed tables trained
fake-quantized (per row, or per row and group), served as int8 / packed int4 QArrays
(rows' codes and scales gathered, then dequantized), attend on the same table."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from jaxq import QuantSpec, Rule
from jaxq.layer import embed
from jaxq.qarray import QArray, dequantize

V, D = 24, 16
W8, W4 = QuantSpec(8), QuantSpec(4)
G8 = QuantSpec(8, granularity="group", group_size=4)
G4 = QuantSpec(4, granularity="group", group_size=4)
A8 = QuantSpec(8, granularity="tensor")
DYN = QuantSpec(8, granularity="tensor", dynamic=True)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, V, (3, 5)), jnp.int32)


def _ref_fake_quant(table, spec):
  """float64 per-row (per row and group) symmetric min-max fake quantization."""
  t = np.asarray(table, np.float64)
  g = spec.group_size or t.shape[1]
  tt = t.reshape(t.shape[0], -1, g)
  qmax = 2 ** (spec.bits - 1) - 1
  s = np.abs(tt).max(-1, keepdims=True) / qmax
  return (np.clip(np.round(tt / s), -qmax - 1, qmax) * s).reshape(t.shape)


class LM(nn.Module):
  """A tied-embedding language model: Embed -> Dense -> attend."""

  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(V, D, name="emb")
    return emb.attend(nn.gelu(nn.Dense(D, name="mid")(emb(ids))))


class NnxLM(nnx.Module):

  def __init__(self, rngs):
    self.emb = nnx.Embed(V, D, rngs=rngs)
    self.mid = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, ids):
    return self.emb.attend(nnx.gelu(self.mid(self.emb(ids))))


@pytest.fixture(scope="module")
def twins():
  model = LM()
  v = model.init(jax.random.key(0), IDS)
  p = v["params"]
  nmodel = NnxLM(nnx.Rngs(0))
  nmodel.emb.embedding.set_value(p["emb"]["embedding"])
  nmodel.mid.kernel.set_value(p["mid"]["kernel"])
  nmodel.mid.bias.set_value(p["mid"]["bias"])
  return model, v, nmodel


def _lookup_model():
  class Lookup(nn.Module):
    @nn.compact
    def __call__(self, ids):
      return nn.Embed(V, D, name="emb")(ids)
  return Lookup()


@pytest.mark.parametrize("spec", [W8, W4, G8, G4], ids=["w8", "w4", "g8", "g4"])
def test_table_quantizers_match_numpy(spec):
  """The fake-quantized table, the QArray's dequantized table and both lookups equal a
  float64 reference (out-of-range ids give NaN rows, negative ones wrap, as Flax's)."""
  rng = np.random.default_rng(4)
  table = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
  ref = _ref_fake_quant(table, spec)
  tspec = embed.table_rule(Rule("emb", weight=spec), "emb", (V, D)).weight
  vspec = embed.view_spec(tspec, "emb", (V, D))
  np.testing.assert_allclose(embed.fake_quant_table(table, vspec, {}), ref, rtol=1e-6,
                             atol=1e-7)
  q = embed.quantize_table(table, tspec, "emb")
  np.testing.assert_allclose(dequantize(q), ref, rtol=1e-6, atol=1e-7)
  ids = jnp.asarray([[0, V - 1, 3], [V, -1, 5]], jnp.int32)
  want = np.concatenate([ref, np.full((1, D), np.nan)])[
      np.where(np.asarray(ids) >= V, V, np.asarray(ids) % V)]
  qat = embed.qat_lookup(table, ids, "emb", vspec, lambda s, w: {}, lambda: None)
  np.testing.assert_allclose(qat, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(embed.lookup(q, ids, "emb"), qat)


@pytest.mark.parametrize("spec", [W8, G4], ids=["w8", "g4"])
def test_served_lookup_equals_qat(spec):
  """QAT lookup == float64 reference[ids]; the served lookup gives the same values from
  a QArray (int8, or two codes per byte) with per-row / per-group scales."""
  model = _lookup_model()
  v = model.init(jax.random.key(1), IDS)
  table = v["params"]["emb"]["embedding"]
  ref = _ref_fake_quant(table, spec)
  qmodel = jaxq.quantize_model(model, Rule("emb", weight=spec))
  qat = qmodel.apply(v, IDS)
  np.testing.assert_allclose(qat, ref[np.asarray(IDS)], rtol=1e-6, atol=1e-7)
  sm, sv = jaxq.convert(qmodel, v)
  q = sv["params"]["emb"]["embedding"]
  assert isinstance(q, QArray) and q.shape == (V, D)
  rows_scales = (V, 1) if spec.granularity == "channel" else (V, D // 4, 1)
  assert q.scale.shape == rows_scales
  assert q.values.shape == ((V, D) if spec.bits == 8 else (V, D // 2))
  served = sm.apply(sv, IDS)
  np.testing.assert_array_equal(served, qat)
  nemb = nnx.Embed(V, D, rngs=nnx.Rngs(0))  # the NNX twin, an Embed-only model
  nemb.embedding.set_value(table)
  qn = jaxq.nnx.quantize_model(nemb, Rule(".*", weight=spec))
  np.testing.assert_array_equal(qn(IDS), qat)
  np.testing.assert_array_equal(jaxq.nnx.convert(qn)(IDS), qat)


def test_int4_table_bytes_and_no_float_copy(twins):
  model, v, _ = twins
  qmodel = jaxq.quantize_model(model, [Rule("emb", weight=W4), Rule(".*", weight=W8)])
  _, sv = jaxq.convert(qmodel, v)
  q = sv["params"]["emb"]["embedding"]
  assert q.nbytes == V * D // 2 + V * 4 + 1  # packed codes + f32 row scales + zero point
  for leaf in jax.tree_util.tree_leaves(sv):
    assert not (jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.size >= V * D), leaf.shape
  row = jaxq.report(qmodel, v, IDS).rows[0]
  assert (row["path"], row["kind"], row["float_bytes"], row["quant_bytes"]) == (
      "emb", "Embed", V * D * 4, q.nbytes)


def test_qat_gradient_reaches_table_straight_through():
  """d/dtable of sum(w * fq(table)[ids]) is w scattered onto the rows (STE)."""
  model = _lookup_model()
  v = model.init(jax.random.key(1), IDS)
  w = jnp.asarray(np.random.default_rng(2).normal(size=IDS.shape + (D,)), jnp.float32)
  qmodel = jaxq.quantize_model(model, Rule("emb", weight=W4))
  g = jax.grad(lambda p: jnp.sum(w * qmodel.apply({"params": p}, IDS)))(v["params"])
  want = np.zeros((V, D))
  np.add.at(want, np.asarray(IDS), np.asarray(w, np.float64))
  np.testing.assert_allclose(g["emb"]["embedding"], want, rtol=1e-6, atol=1e-6)


def test_lsq_table_step_learns_in_lookup_and_attend(twins):
  model, v, nmodel = twins
  rules = [Rule("emb", weight=QuantSpec(4, estimator="lsq")), Rule(".*", weight=None)]
  qmodel = jaxq.quantize_model(model, rules)
  lv = jaxq.flax.init_quant_params(qmodel, {"params": v["params"]}, IDS)
  step = lv["params"]["emb"]["jaxq_weight_scale"]
  assert step.shape == (1, V)  # one learned step per row
  g = jax.grad(lambda p: jnp.sum(qmodel.apply({"params": p}, IDS) ** 2))(lv["params"])
  assert np.all(np.isfinite(g["emb"]["jaxq_weight_scale"]))
  assert np.any(g["emb"]["jaxq_weight_scale"] != 0)
  qn = jaxq.nnx.quantize_model(nmodel, rules)
  np.testing.assert_allclose(qn.emb.jaxq_weight_scale.get_value(), step, rtol=1e-6)
  np.testing.assert_allclose(qn(IDS), qmodel.apply(lv, IDS), rtol=1e-5, atol=1e-6)
  sm, sv = jaxq.convert(qmodel, lv)
  np.testing.assert_allclose(sm.apply(sv, IDS), qmodel.apply(lv, IDS), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("spec,act,kernel", [
    (W8, A8, "int8_matmul"), (G4, A8, "int4_matmul_grouped"), (W4, None,
                                                               "int4_matmul_grouped")],
                         ids=["w8a8", "g4a8", "w4"])
def test_served_attend_equals_dequantize_reference(spec, act, kernel, monkeypatch):
  """Serving's attend runs the integer kernel and equals
  fake_quant(query) @ dequantize(table).T."""
  calls = []
  orig = getattr(jaxq.kernels, kernel)
  monkeypatch.setattr(jaxq.kernels, kernel,
                      lambda *a, **k: calls.append(kernel) or orig(*a, **k))
  rng = np.random.default_rng(3)
  table = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
  query = jnp.asarray(rng.normal(size=(2, 3, D)), jnp.float32)
  tspec = embed.table_rule(Rule("emb", weight=spec), "emb", (V, D)).weight
  q = embed.quantize_table(table, tspec, "emb")
  np.testing.assert_allclose(dequantize(q), _ref_fake_quant(table, spec), rtol=1e-6,
                             atol=1e-7)
  aq = None if act is None else {"scale": jnp.full((1, 1), 0.02), "zero_point":
                                 jnp.zeros((1, 1))}
  got = embed.served_attend(query, q, "emb", act, aq)
  x = np.asarray(query, np.float64)
  if act is not None:
    x = np.clip(np.round(x / 0.02), -128, 127) * 0.02
  want = x @ np.asarray(dequantize(q), np.float64).T
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert calls == [kernel]


def test_qat_attend_equals_served_attend(twins):
  """With a dynamic activation spec (no calibration gap), QAT == served, Linen == NNX."""
  model, v, nmodel = twins
  rules = [Rule("emb", weight=G4, act=DYN), Rule(".*", weight=W8)]
  qmodel = jaxq.quantize_model(model, rules)
  qat = qmodel.apply(v, IDS)
  sm, sv = jaxq.convert(qmodel, v)
  np.testing.assert_allclose(sm.apply(sv, IDS), qat, rtol=1e-5, atol=1e-5)
  qn = jaxq.nnx.quantize_model(nmodel, rules)
  np.testing.assert_allclose(qn(IDS), qat, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jaxq.nnx.convert(qn)(IDS), qat, rtol=1e-5, atol=1e-5)


def test_tied_lm_end_to_end_linen_and_nnx(twins):
  """quantize_model -> calibrate -> convert on a tied-embedding LM, both APIs: same QAT
  outputs and table gradients, same calibrated attend range, same served outputs."""
  model, v, nmodel = twins
  rules = [Rule(".*", weight=W8, act=A8)]
  ref = model.apply(v, IDS)
  qmodel = jaxq.quantize_model(model, rules)
  qn = jaxq.nnx.quantize_model(nmodel, rules)
  assert type(qn.emb).__name__ == "QuantizedEmbed"
  np.testing.assert_allclose(qn(IDS), qmodel.apply(v, IDS), rtol=1e-6, atol=1e-6)
  gl = jax.grad(lambda p: jnp.sum(qmodel.apply({"params": p}, IDS) ** 2))(v["params"])
  gn = nnx.grad(lambda m: jnp.sum(m(IDS) ** 2))(qn)
  np.testing.assert_allclose(gn.emb.embedding.get_value(), gl["emb"]["embedding"],
                             rtol=1e-5, atol=1e-6)
  batches = [IDS, IDS[::-1] % 7]
  cv = jaxq.calibrate(qmodel, v, batches)
  jaxq.nnx.calibrate(qn, batches)
  np.testing.assert_allclose(qn.emb.jaxq_act.get_value()["hi"],
                             cv["quant_stats"]["emb"]["jaxq_act"]["hi"], rtol=1e-6)
  sm, sv = jaxq.convert(qmodel, cv)
  sn = jaxq.nnx.convert(qn)
  assert isinstance(nnx.state(sn.emb)["embedding"].get_value(), QArray)
  out = sm.apply(sv, IDS)
  np.testing.assert_allclose(sn(IDS), out, rtol=1e-5, atol=1e-5)
  cos = np.sum(np.asarray(out) * np.asarray(ref), -1) / (
      np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
  assert cos.min() > 0.99, cos.min()
  rows = {r["path"]: r for r in jaxq.nnx.report(qn).rows}
  assert rows["emb"]["kind"] == "Embed" and rows["emb"]["quant_bytes"] < V * D * 4 // 3


def test_bad_input_names_field_and_layer(twins):
  model, v, nmodel = twins
  bad = [(Rule("emb", weight=QuantSpec(8, axis=0)), "axis=0.*'emb'|'emb'.*axis=0"),
         (Rule("emb", weight=QuantSpec(4, granularity="group", group_size=5)),
          "'emb'.*group_size=5"),
         (Rule("emb", weight=QuantSpec(4, rounding="gptq")), "gptq.*'emb'"),
         (Rule("emb", weight=W8, lora=jaxq.LoRA(2)), "'emb'.*LoRA")]
  for rule, match in bad:
    with pytest.raises(ValueError, match=match):
      jaxq.quantize_model(model, [rule]).init(jax.random.key(0), IDS)
    with pytest.raises(ValueError, match=match):
      jaxq.nnx.quantize_model(nmodel, [rule])
  qmodel = jaxq.quantize_model(_lookup_model(), Rule("emb", weight=W8))
  with pytest.raises(ValueError, match="'emb'.*integer"):
    qmodel.init(jax.random.key(0), jnp.zeros((2,), jnp.float32))
  qn = jaxq.nnx.quantize_model(nmodel, Rule("emb", weight=W8))
  with pytest.raises(ValueError, match="'emb'.*integer"):
    qn(jnp.zeros((2,), jnp.float32))
