"""jaxq.report / jaxq.nnx.report and the UserWarning for rules that match no module.

Byte counts are computed by hand from the storage format of jaxq.convert (int8 values,
4-bit values packed two a byte along the kernel's last axis, float32 scales, int8 zero
points: one scalar for a symmetric spec, one per scale otherwise).
"""

from __future__ import annotations

import re
import warnings

import flax.linen as nn
import jax
import pytest
from flax import nnx

import jaxq
from jaxq import nnx as jnnx
from jaxq.spec import QuantSpec, Rule

X = jax.random.normal(jax.random.key(0), (4, 16))
W8A8 = [Rule(".*", weight=QuantSpec(8), act=QuantSpec(8, granularity="tensor"))]
# Rule 0: asymmetric W4 per channel (zero points per channel); rule 1: symmetric W4 in
# groups of 16 on a kernel whose packed last axis (10) is odd in bytes; rule 2: a typo.
MIXED = [Rule("(layers/)?.*0", weight=QuantSpec(4, symmetric=False),
              act=QuantSpec(8, granularity="tensor")),
         Rule(".*2", weight=QuantSpec(4, granularity="group", group_size=16), act=None),
         Rule(".*Dense_1x")]
TYPO = re.escape("Rule(path='.*Dense_1x')")


def linen_mlp():
  """The README's quick-start model."""
  model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(10)])
  return model, model.init(jax.random.key(1), X)


def nnx_mlp():
  """Its NNX twin."""
  rngs = nnx.Rngs(0)
  return nnx.Sequential(nnx.Linear(16, 64, rngs=rngs), nnx.relu, nnx.Linear(64, 10, rngs=rngs))


def _by_hand(k, n, bits, *, groups=None, symmetric=True):
  """(float bytes, quant bytes) of a (k, n) float32 kernel quantized per output channel
  (or in ``groups`` groups along k per channel)."""
  values = k * -(-n * bits // 8)
  scales = n * (groups or 1)
  return 4 * k * n, values + 4 * scales + (1 if symmetric else scales)


def _check_rows(rows, paths, kind):
  assert [r["path"] for r in rows] == paths
  assert {r["kind"] for r in rows} == {kind}
  return {r["path"]: r for r in rows}


def test_linen_report_rows_by_hand():
  model, v = linen_mlp()
  q = jaxq.quantize_model(model, W8A8)
  rep = jaxq.report(q, v, X)
  rows = _check_rows(rep.rows, ["layers_0", "layers_2"], "Dense")
  for path, (k, n) in {"layers_0": (16, 64), "layers_2": (64, 10)}.items():
    r = rows[path]
    assert (r["rule"], r["weight"], r["act"], r["act_compress"], r["lora"]) == (
        0, W8A8[0].weight, W8A8[0].act, None, None)
    assert (r["float_bytes"], r["quant_bytes"]) == _by_hand(k, n, 8)
  assert (rows["layers_0"]["quant_bytes"], rows["layers_2"]["quant_bytes"]) == (1281, 681)
  assert rep.unused == ()


def test_linen_and_nnx_mixed_rules_by_hand_and_typo():
  model, v = linen_mlp()
  q = jaxq.quantize_model(model, MIXED)
  with pytest.warns(UserWarning, match=TYPO):
    rep = jaxq.report(q, v, X)
  with pytest.warns(UserWarning, match=TYPO):
    nrep = jnnx.report(jnnx.quantize_model(nnx_mlp(), MIXED))
  expected = {0: _by_hand(16, 64, 4, symmetric=False), 2: _by_hand(64, 10, 4, groups=4)}
  for r, kind, paths in ((rep, "Dense", ["layers_0", "layers_2"]),
                         (nrep, "Linear", ["layers/0", "layers/2"])):
    rows = _check_rows(r.rows, paths, kind)
    assert [row["rule"] for row in rows.values()] == [0, 1]
    assert [(row["float_bytes"], row["quant_bytes"]) for row in rows.values()] == [
        expected[0], expected[2]]
    assert r.unused == (2,)
    assert "unused rules: 2 ('.*Dense_1x')" in str(r)


def test_str_prints_one_row_per_dense():
  model, v = linen_mlp()
  text = str(jaxq.report(jaxq.quantize_model(model, W8A8), v, X))
  rows = [line for line in text.splitlines() if " Dense " in line]
  assert len(rows) == 2
  assert [line.split() for line in rows] == [
      ["layers_0", "Dense", "0", "8/8", "4,096", "1,281"],
      ["layers_2", "Dense", "0", "8/8", "2,560", "681"]]
  assert re.search(r"total \(2 layers\)\s+6,656\s+1,962 \(0\.295x\)", text)


def test_excluded_layer_and_abstract_variables():
  """A rule without a weight spec keeps the float bytes; the report needs only shapes."""
  model, _ = linen_mlp()
  rules = [Rule("layers_2", weight=None), *W8A8]
  q = jaxq.quantize_model(model, rules)
  shapes = jax.eval_shape(model.init, jax.random.key(1), X)
  rep = jaxq.report(q, shapes, jax.ShapeDtypeStruct(X.shape, X.dtype))
  assert [(r["rule"], r["weight"], r["quant_bytes"]) for r in rep.rows] == [
      (1, W8A8[0].weight, 1281), (0, None, 2560)]
  assert rep.float_bytes == 6656 and rep.quant_bytes == 1281 + 2560


L = 3


class ScanBody(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.Dense(8)(x), None


class LinenStack(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name="embed")(x)
    stack = nn.scan(ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
                    length=L)
    return stack(name="layers")(x, None)[0]


class NnxStack(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(16, 8, rngs=rngs)

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return nnx.Linear(8, 8, rngs=rngs)

    self.layers = create(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(h, layer):
      return layer(h)

    return body(self.embed(x), self.layers)


def test_stacked_layers_count_every_layer_of_the_stack():
  f_embed, q_embed = _by_hand(16, 8, 8)
  f_one, q_one = _by_hand(8, 8, 8)
  m = LinenStack()
  shapes = jax.eval_shape(m.init, jax.random.key(0), X)
  rep = jaxq.report(jaxq.quantize_model(m, W8A8), shapes, X)
  nrep = jnnx.report(jnnx.quantize_model(NnxStack(nnx.Rngs(0)), W8A8))
  for r, paths in ((rep, ["embed", "layers/Dense_0"]), (nrep, ["embed", "layers"])):
    assert [row["path"] for row in r.rows] == paths
    assert [(row["float_bytes"], row["quant_bytes"]) for row in r.rows] == [
        (f_embed, q_embed), (L * f_one, L * q_one)]


def test_linen_warns_once_per_message_across_traces():
  model, v = linen_mlp()
  q = jaxq.quantize_model(model, [*W8A8, Rule("layers_0x")])
  with warnings.catch_warnings(record=True) as log:
    warnings.simplefilter("default")
    for x in (X, X, X[:2]):  # three traces
      jax.eval_shape(q.apply, v, x)
  msgs = [str(w.message) for w in log if "layers_0x" in str(w.message)]
  assert len(msgs) == 1 and "rule 1 " in msgs[0], msgs


def test_shadowed_rule_warns_and_non_layer_matches_count_as_used():
  """First match wins: a rule after a catch-all matches nothing. A rule that matches only
  a non-layer module (here the model's root, path '') is used."""
  model, v = linen_mlp()
  with pytest.warns(UserWarning, match=re.escape("Rule(path='layers_0')")):
    jax.eval_shape(jaxq.quantize_model(model, [*W8A8, Rule("layers_0")]).apply, v, X)
  with pytest.warns(UserWarning, match=re.escape("Rule(path='layers/0')")):
    jnnx.quantize_model(nnx_mlp(), [*W8A8, Rule("layers/0")])
  rules = [Rule("", weight=None), *W8A8]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert jaxq.report(jaxq.quantize_model(model, rules), v, X).unused == ()
    assert jnnx.report(jnnx.quantize_model(nnx_mlp(), rules)).unused == ()


def test_nnx_report_needs_a_quantized_model():
  with pytest.raises(ValueError, match="jaxq.nnx.quantize_model"):
    jnnx.report(nnx_mlp())
