"""Layer-wise sensitivity (SNR, cosine), bit allocation and plot (jaxq.analysis)."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import analysis
from jaxq.flax import ptq
from jaxq.flax.linen import quantize_model
from jaxq.spec import QuantSpec, Rule

RULES = (Rule(".*", weight=QuantSpec(8)),)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64, name="fc1")(x))
    x = nn.relu(nn.Dense(64, name="fc2")(x))
    x = nn.relu(nn.Dense(32, name="fc3")(x))
    return nn.Dense(8, name="out")(x)


@pytest.fixture(scope="module")
def setup():
  model = MLP()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(128, 16)), jnp.float32)
  v = model.init(jax.random.key(0), x[:1])
  report = analysis.sensitivity(model, v, [x[:64], x[64:]], RULES, bits=(4, 8))
  return model, v, x, report


def test_rows_table_and_reference(setup):
  model, v, x, report = setup
  assert report.paths == ["fc1", "fc2", "fc3", "out"]
  assert report.bits == [4, 8]
  assert len(report.rows) == 8
  table = report.table()
  for p in report.paths:
    assert p in table
  assert "SNR@w4 dB" in table and "cos@w8" in table
  for p in report.paths:
    r4, r8 = report.row(p, 4), report.row(p, 8)
    assert r8.snr_db > r4.snr_db
    assert -1.0 <= r4.cosine <= r8.cosine <= 1.0 + 1e-6
    assert r8.cosine > 0.99
  # The table lists the most sensitive layer (lowest SNR) first.
  worst = min(report.paths, key=lambda p: report.row(p, 4).snr_db)
  assert table.splitlines()[2].startswith(worst)
  assert report.row("fc2", 4).params == 64 * 64

  # One row recomputed directly: only fc3 quantized (4-bit weights), simulated PTQ.
  rules = (Rule("fc3", weight=QuantSpec(4), act=QuantSpec(8, granularity="tensor")),)
  rep = analysis.sensitivity(model, v, [x[:64], x[64:]], rules)
  assert rep.paths == ["fc3"] and rep.bits == [None]
  qmodel = quantize_model(model, rules, mode=ptq.SIM_MODE)
  cv = ptq.calibrate(qmodel, v, [x[:64], x[64:]])
  y = np.concatenate([np.asarray(qmodel.apply(cv, x[:64])).ravel(),
                      np.asarray(qmodel.apply(cv, x[64:])).ravel()]).astype(np.float64)
  ref = np.concatenate([np.asarray(model.apply(v, x[:64])).ravel(),
                        np.asarray(model.apply(v, x[64:])).ravel()]).astype(np.float64)
  snr = 10 * np.log10(np.sum(ref**2) / np.sum((y - ref) ** 2))
  np.testing.assert_allclose(rep.row("fc3", None).snr_db, snr, rtol=1e-3)


def test_allocate_bits_budget(setup):
  model, v, x, report = setup
  sizes = {p: report.row(p, 4).params for p in report.paths}
  total = sum(sizes.values())
  for budget in (4.0, 5.0, 6.0, 8.0):
    alloc = analysis.allocate_bits(report, budget)
    avg = sum(alloc.bits[p] * sizes[p] for p in sizes) / total
    assert avg <= budget + 1e-9 and abs(avg - alloc.average_bits) < 1e-9
    assert set(alloc.bits) == set(sizes)
  assert analysis.allocate_bits(report, 4.0).bits == {p: 4 for p in sizes}
  assert analysis.allocate_bits(report, 8.0).bits == {p: 8 for p in sizes}
  # The first upgrade goes to the largest output-noise reduction per extra bit.
  noise = lambda p, b: 10 ** (-report.row(p, b).snr_db / 10)
  first = max(sizes, key=lambda p: (noise(p, 4) - noise(p, 8)) / sizes[p])
  alloc = analysis.allocate_bits(report, (8 * sizes[first] + 4 * (total - sizes[first]))
                                 / total)
  assert alloc.bits[first] == 8 and sorted(alloc.bits.values()).count(8) == 1
  # Rules: exact escaped paths, then the original rules.
  assert [r.path for r in alloc.rules[:4]] == [re.escape(p) for p in report.paths]
  assert alloc.rules[4:] == list(RULES)
  qmodel = quantize_model(model, alloc.rules)
  sm, sv = ptq.convert(qmodel, ptq.calibrate(qmodel, v, [x]))
  assert sv["params"][first]["kernel"].bits == 8
  assert np.isfinite(np.asarray(sm.apply(sv, x))).all()
  with pytest.raises(ValueError, match="budget"):
    analysis.allocate_bits(report, 3.0)


def test_plot(setup, tmp_path):
  _, _, _, report = setup
  path = tmp_path / "sens.png"
  analysis.plot_sensitivity(report, str(path))
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
