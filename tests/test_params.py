"""jaxq.params: quantize_params / init_qstate against numpy references."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxq.params import init_qstate, quantize_params
from jaxq.spec import QuantSpec, Rule


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return {
      "encoder": {"layer_0": {"query": {"kernel": jax.random.normal(k[0], (16, 8)),
                                        "bias": jax.random.normal(k[1], (8,))}}},
      "conv": {"kernel": jax.random.normal(k[2], (3, 3, 4, 6))},
      "embed": {"embedding": jax.random.normal(k[3], (10, 8))},
      "norm": {"scale": jnp.ones((8,))},
  }


def _ref_channel(w, bits=8):
  w = np.asarray(w, np.float64)
  qmax = 2 ** (bits - 1) - 1
  s = np.maximum(np.abs(w).max(axis=tuple(range(w.ndim - 1)), keepdims=True) / qmax,
                 np.finfo(np.float32).eps)
  return np.clip(np.round(w / s), -qmax - 1, qmax) * s


def test_default_rules_per_output_channel_rank2_only():
  p = _params()
  q = jax.jit(quantize_params)(p)
  for path in (("encoder", "layer_0", "query", "kernel"), ("conv", "kernel"),
               ("embed", "embedding")):
    a, b = q, p
    for k in path:
      a, b = a[k], b[k]
    np.testing.assert_allclose(a, _ref_channel(b), rtol=1e-5, atol=1e-6)
    assert a.dtype == b.dtype
  np.testing.assert_array_equal(q["encoder"]["layer_0"]["query"]["bias"],
                                p["encoder"]["layer_0"]["query"]["bias"])
  np.testing.assert_array_equal(q["norm"]["scale"], p["norm"]["scale"])


def test_rules_match_module_path_first_wins():
  p = _params()
  rules = [Rule("encoder/layer_0/query", weight=QuantSpec(bits=4)),
           Rule("encoder/.*", weight=QuantSpec(bits=8)),
           Rule("conv", weight=None)]
  q = quantize_params(p, rules)
  np.testing.assert_allclose(q["encoder"]["layer_0"]["query"]["kernel"],
                             _ref_channel(p["encoder"]["layer_0"]["query"]["kernel"], 4),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(q["conv"]["kernel"], p["conv"]["kernel"])
  np.testing.assert_array_equal(q["embed"]["embedding"], p["embed"]["embedding"])
  # a rule naming the leaf does not match (rules name modules)
  q2 = quantize_params(p, [Rule("conv/kernel", weight=QuantSpec())])
  np.testing.assert_array_equal(q2["conv"]["kernel"], p["conv"]["kernel"])


def test_group_axes_and_errors():
  p = _params()
  spec = QuantSpec(bits=4, granularity="group", group_size=2)
  q = quantize_params(p, [Rule("conv|encoder/.*", weight=spec)])
  w = np.asarray(p["conv"]["kernel"], np.float64)          # (3, 3, 4, 6): groups along in
  wg = w.reshape(3, 3, 2, 2, 6)  # one scale per (kh, kw, group, out): group_size elements
  s = np.maximum(np.abs(wg).max(axis=3, keepdims=True) / 7, 1.2e-7)
  ref = (np.clip(np.round(wg / s), -8, 7) * s).reshape(w.shape)
  np.testing.assert_allclose(q["conv"]["kernel"], ref, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="conv/kernel"):
    quantize_params(p, [Rule("conv", weight=QuantSpec(granularity="group", group_size=3))])


def test_lsq_state_init_grads_and_optax():
  p = _params()
  rules = [Rule("encoder/.*", weight=QuantSpec(bits=4, estimator="lsq")),
           Rule("conv", weight=QuantSpec(bits=4, signed=False, estimator="pact"))]
  qs = init_qstate(p, rules)
  w = p["encoder"]["layer_0"]["query"]["kernel"]
  s = qs["encoder"]["layer_0"]["query"]["kernel"]["scale"]
  np.testing.assert_allclose(s, 2 * np.abs(w).mean(0, keepdims=True) / np.sqrt(7), rtol=1e-6)
  np.testing.assert_allclose(qs["conv"]["kernel"]["alpha"].reshape(-1),
                             np.asarray(p["conv"]["kernel"]).reshape(-1, 6).max(0), rtol=1e-6)
  with pytest.raises(ValueError, match="init_qstate"):
    quantize_params(p, rules)
  target = jax.tree.map(lambda a: 0.5 * a, p)

  def loss(tree):
    q = quantize_params(tree["params"], rules, tree["qstate"])
    return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(q),
                                                      jax.tree.leaves(target)))

  tree = {"params": p, "qstate": qs}
  g = jax.grad(loss)(tree)
  assert np.any(np.asarray(g["qstate"]["encoder"]["layer_0"]["query"]["kernel"]["scale"]))
  tx = optax.adam(1e-2)
  opt = tx.init(tree)

  @jax.jit
  def step(tree, opt):
    l, g = jax.value_and_grad(loss)(tree)
    u, opt = tx.update(g, opt, tree)
    return optax.apply_updates(tree, u), opt, l

  l0 = None
  for _ in range(30):
    tree, opt, l = step(tree, opt)
    l0 = l if l0 is None else l0
  assert float(l) < 0.7 * float(l0)


def test_vmap_and_stochastic_key():
  p = {"d": {"kernel": jax.random.normal(jax.random.key(0), (2, 8, 4))}}
  out = jax.vmap(lambda t: quantize_params(t))(p)
  for i in range(2):
    np.testing.assert_allclose(out["d"]["kernel"][i], _ref_channel(p["d"]["kernel"][i]),
                               rtol=1e-5, atol=1e-6)
  sr = [Rule(".*", weight=QuantSpec(bits=2, rounding="stochastic"))]
  w = {"d": {"kernel": jax.random.normal(jax.random.key(3), (64, 4))}}
  a = quantize_params(w, sr, key=jax.random.key(1))["d"]["kernel"]
  b = quantize_params(w, sr, key=jax.random.key(2))["d"]["kernel"]
  assert not np.array_equal(a, b)
  with pytest.raises(ValueError, match="'d/kernel'.*stochastic.*key"):
    quantize_params(w, sr)


def test_roles_by_name_stacked_biases_and_scales_untouched():
  k = jax.random.split(jax.random.key(4), 3)
  stack = {"Dense_0": {"kernel": jax.random.normal(k[0], (3, 8, 4)),
                       "bias": jax.random.normal(k[1], (3, 4))},
           "LayerNorm_0": {"scale": 1 + jax.random.normal(k[2], (3, 8)),
                           "bias": jax.random.normal(k[2], (3, 8))},
           "Dense_1": {"kernel": jnp.ones((3, 4, 4)), "jaxq_weight_scale": jnp.ones((3, 1, 4))}}
  p = {"layers": stack}
  q = jax.jit(functools.partial(quantize_params, stacked="layers/.*"))(p)
  for mod, name in (("Dense_0", "bias"), ("LayerNorm_0", "scale"), ("LayerNorm_0", "bias"),
                    ("Dense_1", "jaxq_weight_scale")):
    np.testing.assert_array_equal(q["layers"][mod][name], p["layers"][mod][name])
  # per-layer, per-output-channel scales: each layer as if quantized alone
  w = p["layers"]["Dense_0"]["kernel"]
  for i in range(3):
    np.testing.assert_allclose(q["layers"]["Dense_0"]["kernel"][i], _ref_channel(w[i]),
                               rtol=1e-6, atol=1e-7)
    one = quantize_params({"d": {"kernel": w[i]}})["d"]["kernel"]
    np.testing.assert_array_equal(q["layers"]["Dense_0"]["kernel"][i], one)
  # biases and norm scales stay float without stacked= too (by name, not rank)
  with pytest.warns(UserWarning, match=r"'layers/Dense_0/kernel'.*stacked"):
    q2 = jax.jit(quantize_params)(p)
  np.testing.assert_array_equal(q2["layers"]["LayerNorm_0"]["scale"],
                                p["layers"]["LayerNorm_0"]["scale"])
  np.testing.assert_array_equal(q2["layers"]["Dense_0"]["bias"], p["layers"]["Dense_0"]["bias"])
  # unknown names still follow rank >= 2; an embedding keeps its (row) layout
  other = {"m": {"w": jax.random.normal(k[0], (8, 4)), "v": jnp.ones((4,))}}
  qo = quantize_params(other)
  np.testing.assert_allclose(qo["m"]["w"], _ref_channel(other["m"]["w"]), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(qo["m"]["v"], other["m"]["v"])


def test_stacked_lsq_and_group_state_per_layer():
  w = jax.random.normal(jax.random.key(5), (3, 8, 4)) * jnp.arange(1, 4)[:, None, None]
  p = {"layers": {"d": {"kernel": w}}}
  rules = Rule("layers/d", weight=QuantSpec(bits=4, estimator="lsq", granularity="group",
                                            group_size=4))
  qs = init_qstate(p, rules, stacked="layers/.*")
  s = qs["layers"]["d"]["kernel"]["scale"]
  assert s.shape == (3, 2, 1, 4)
  for i in range(3):
    one = init_qstate({"d": {"kernel": w[i]}}, dataclasses.replace(rules, path="d"))["d"]["kernel"]["scale"]
    np.testing.assert_array_equal(s[i], one)
    got = quantize_params(p, rules, qs, stacked="layers/.*")["layers"]["d"]["kernel"][i]
    ref = quantize_params({"d": {"kernel": w[i]}}, dataclasses.replace(rules, path="d"),
                          {"d": {"kernel": {"scale": s[i]}}})["d"]["kernel"]
    np.testing.assert_array_equal(got, ref)


def test_kernel_axis_and_output_axes():
  p = _params()
  # axis names a kernel's input axis: rejected, naming the field, the layer and the choice
  with pytest.raises(ValueError, match=r"encoder/layer_0/query.*QuantSpec.axis=0.*-1"):
    quantize_params(p, [Rule("encoder/.*", weight=QuantSpec(axis=0))])
  with pytest.raises(ValueError, match=r"'conv'.*QuantSpec.axis=-2"):
    quantize_params(p, [Rule("conv", weight=QuantSpec(axis=-2))])
  # axis is honoured on non-kernel leaves: an embedding row-wise
  q = quantize_params(p, [Rule("embed", weight=QuantSpec(axis=0))])
  e = np.asarray(p["embed"]["embedding"], np.float64)
  s = np.maximum(np.abs(e).max(axis=1, keepdims=True) / 127, 1.2e-7)
  np.testing.assert_allclose(q["embed"]["embedding"], np.clip(np.round(e / s), -128, 127) * s,
                             rtol=1e-6, atol=1e-7)
  # a DenseGeneral kernel (D, H, K) whose bias is (H, K): one scale per (h, k)
  w = jax.random.normal(jax.random.key(6), (8, 2, 4))
  qg = quantize_params({"q": {"kernel": w, "bias": jnp.zeros((2, 4))}})["q"]["kernel"]
  ref = _ref_channel(np.asarray(w).reshape(8, 8)).reshape(8, 2, 4)
  np.testing.assert_allclose(qg, ref, rtol=1e-6, atol=1e-7)


def test_errors_name_the_leaf_and_what_was_expected():
  p = {"m": {"kernel": jnp.ones((8,))}}
  with pytest.raises(ValueError, match=r"'m/kernel'.*rank >= 2"):
    quantize_params(p)
  p = _params()
  rules = [Rule("encoder/.*", weight=QuantSpec(bits=4, estimator="lsq"))]
  qs = init_qstate(p, rules)
  bad = {"encoder": {"layer_0": {"query": {"kernel": {"alpha": jnp.ones((1, 8))}}}}}
  with pytest.raises(ValueError, match=r"'encoder/layer_0/query/kernel'.*\['scale'\].*alpha"):
    quantize_params(p, rules, bad)
  bad = jax.tree.map(lambda s: s[..., :4], qs)
  with pytest.raises(ValueError, match=r"kernel/scale' has shape \(1, 4\).*\(1, 8\)"):
    quantize_params(p, rules, bad)
