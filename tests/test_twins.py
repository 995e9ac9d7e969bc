"""QAT scenarios run on both APIs: a Linen model and its NNX twin (tests/_twins.py, same
weights, same rules) give the same outputs, gradients and quantizer statistics.

One rule list per scenario covers several features at once (each layer its own
estimator), so that each API compiles once per scenario.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

import jaxq
from jaxq.spec import QuantSpec, Rule
from tests import _twins as tw

W8, A8 = QuantSpec(), QuantSpec(granularity="tensor")
PTF = QuantSpec(8, signed=False, symmetric=False, scheme="ptf")
LOG2 = QuantSpec(4, signed=False, scheme="log2")

# Every QAT estimator and activation state, one layer each (first match wins).
ESTIMATORS = [
    Rule("embed|head", weight=W8, act=A8),  # STE, int8 forward matmul (int8="forward")
    Rule("block/attn/.*", weight=QuantSpec(bits=4, estimator="lsq"),
         act=QuantSpec(bits=4, granularity="tensor", estimator="lsq", symmetric=False)),
    Rule("block/fc1", weight=QuantSpec(bits=4, estimator="lsq", symmetric=False),
         act=QuantSpec(bits=4, signed=False, estimator="pact", granularity="tensor")),
    Rule("block/fc2", weight=QuantSpec(bits=4, calibration="mse"),
         act=QuantSpec(bits=6, granularity="tensor", calibration="ema")),
]
# FQ-ViT schemes and W8A8 inside a block whose activations are compressed.
FQVIT = [Rule(r"block/norm\d", weight=None, act=PTF), Rule("block/attn", weight=None, act=LOG2),
         Rule(".*", weight=W8, act=A8)]
COMPRESSED = [Rule("block", weight=None, act_compress=8)] + FQVIT


def _assert_grads_close(a, b, rtol):
  fa, fb = tw.flat(a), tw.flat(b)
  assert set(fa) == set(fb), set(fa) ^ set(fb)
  norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in fb.values()))
  diff = np.sqrt(sum(float(np.sum((fa[k] - fb[k]).astype(np.float64) ** 2)) for k in fb))
  assert diff <= rtol * norm, (diff / norm, rtol)


def test_estimators_and_observers_parity():
  x = tw.data()
  out_l, g_l, stats_l = tw.linen_run(ESTIMATORS, x)
  out_n, g_n, stats_n, q = tw.nnx_run(ESTIMATORS, x)
  np.testing.assert_allclose(out_n, out_l, rtol=1e-5, atol=1e-5)
  _assert_grads_close(g_n, g_l, 1e-5)
  # Learned steps get gradients, under the same names in both APIs.
  for k in ("block/attn/query/jaxq_weight_scale", "block/attn/key/jaxq_act_scale",
            "block/fc1/jaxq_weight_scale"):
    assert float(np.abs(tw.flat(g_n)[k]).sum()) > 0, k
  # The "ema" observer: two updates, equal statistics.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stats_n["block"]["fc2"],
               stats_l["block"]["fc2"])
  np.testing.assert_array_equal(stats_n["block"]["fc2"]["jaxq_act"]["n"], 2.0)
  # Quantization did something.
  assert not np.allclose(out_n, tw.twins()[2](x), atol=1e-2)
  # Evaluation mode reads the observer (no update), as Linen with "quant_stats" immutable.
  q.eval()
  before = nnx.to_pure_dict(nnx.state(q, jaxq.nnx.QuantStats))
  out_eval = nnx.jit(lambda m: m(x))(q)
  jax.tree.map(np.testing.assert_array_equal,
               nnx.to_pure_dict(nnx.state(q, jaxq.nnx.QuantStats)), before)
  lq = jaxq.quantize_model(tw.LinenNet(), ESTIMATORS)
  variables = {"params": nnx.to_pure_dict(nnx.state(q, nnx.Param)),
               "quant_stats": {"block": {"fc2": before["block"]["fc2"]}}}
  np.testing.assert_allclose(out_eval, jax.jit(lq.apply)(variables, x), rtol=1e-5,
                             atol=1e-5)


def test_fqvit_and_act_compress_parity():
  x = tw.data()
  out_l, g_l, _ = tw.linen_run(COMPRESSED, x)
  out_n, g_n, _, _ = tw.nnx_run(COMPRESSED, x)
  ref_out, ref_g, _, q = tw.nnx_run(FQVIT, x)
  # Forward: exact (compression changes only what the backward pass reads).
  np.testing.assert_array_equal(out_n, ref_out)
  np.testing.assert_allclose(out_l, ref_out, rtol=1e-5, atol=1e-5)
  # FQ-ViT did something: PTF LayerNorm inputs and log2 attention probabilities.
  assert q.block.norm1.jaxq_config.kind == "ptf" and q.block.attn.jaxq_config.kind == "log2"
  assert not np.allclose(ref_out, tw.twins()[2](x), atol=1e-3)
  # Gradients at 8 bits: close to the uncompressed ones, in both APIs alike.
  _assert_grads_close(g_n, ref_g, 0.02)
  _assert_grads_close(g_l, ref_g, 0.02)
  _assert_grads_close(g_n, g_l, 0.02)
