"""jaxq.nnx QAT beyond the contraction: act_compress, int8 modes, never-updated observers."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxq
from jaxq import act
from jaxq.act.nnx import compressed_call
from jaxq.calibration import observer_init
from jaxq.flax import nnx as jnnx
from jaxq.flax import nnx_fqvit
from jaxq.spec import QuantSpec, Rule

W8, A8 = QuantSpec(), QuantSpec(granularity="tensor")
EMA = QuantSpec(bits=8, granularity="tensor", calibration="ema")


class Block(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(8, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)

  def __call__(self, x):
    return self.bn(x + self.fc2(nnx.gelu(self.fc1(x))))


class Net(nnx.Module):
  def __init__(self, rngs):
    self.block = Block(rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.block(x))


def _x(shape=(16, 8), seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


_REF = jnp.asarray(np.random.default_rng(9).normal(size=(16, 3)), jnp.float32)


def _loss(m, x):
  return jnp.sum(m(x) * _REF)


def _flat(tree):
  return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])


@nnx.jit
def _grad(m, x):
  return nnx.grad(_loss)(m, x)


def test_act_compress_exact_forward_state_updates_and_close_gradients():
  model = Net(nnx.Rngs(0))
  x = _x()
  q = jnnx.quantize_model(model, [Rule("block", weight=None, act_compress=8),
                                  Rule("block/fc1", weight=None, act_compress=4)])
  # The outermost matched module is compressed; the nested rule is ignored.
  assert type(q.block).__name__ == "CompressedBlock"
  assert type(q.block.fc1) is nnx.Linear and type(q.head) is nnx.Linear
  ref = nnx.clone(model)
  g_ref, g = _grad(ref, x), _grad(q, x)
  # Training-mode BatchNorm statistics propagate out of the compressed region, exactly.
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(q, nnx.BatchStat)),
               nnx.to_pure_dict(nnx.state(ref, nnx.BatchStat)))
  assert not np.allclose(q.block.bn.mean.get_value(), 0.0)
  np.testing.assert_array_equal(nnx.jit(lambda m: m(x))(q), nnx.jit(lambda m: m(x))(ref))
  a, b = _flat(g), _flat(g_ref)
  assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 0.01
  # Memory: the residuals kept for the backward pass are compressed.
  def residuals(m):
    gdef, params, rest = nnx.split(m, nnx.Param, ...)
    return act.residual_nbytes(lambda p: _loss(nnx.merge(gdef, p, rest, copy=True), x),
                              params)
  q2 = jnnx.quantize_model(model, Rule("block", weight=None, act_compress=2))
  assert residuals(q2) < 0.4 * residuals(ref)
  assert "jaxq_act_packed" in str(jax.make_jaxpr(lambda m: _grad(m, x))(q2))


def test_act_compress_2_bits_unbiased_with_jaxq_stream_and_optimizer():
  model = Net(nnx.Rngs(0))
  x = _x()
  g_ref = _flat(_grad(nnx.clone(model), x))
  q = jnnx.quantize_model(model, [Rule("block", weight=None, act_compress=2),
                                  Rule("head", weight=W8, act=A8)],
                          rngs=nnx.Rngs(jaxq=0))
  exact = _flat(_grad(jnnx.quantize_model(model, Rule("head", weight=W8, act=A8)), x))
  draws = jnp.stack([_flat(_grad(q, x)) for _ in range(16)])  # a new key per call
  assert not np.allclose(draws[0], draws[1])
  err_one = float(jnp.linalg.norm(draws[0] - exact))
  err_mean = float(jnp.linalg.norm(draws.mean(0) - exact))
  assert err_mean < 0.45 * err_one, (err_mean, err_one)
  assert float(jnp.linalg.norm(exact - g_ref)) > 0  # the head's weights are quantized
  # One nnx.Optimizer step under nnx.jit.
  opt = nnx.Optimizer(q, optax.sgd(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(m, opt):
    loss, grads = nnx.value_and_grad(_loss)(m, x)
    opt.update(m, grads)
    return loss

  losses = [float(step(q, opt)) for _ in range(3)]
  assert losses[-1] < losses[0]


def test_compressed_call_on_any_method_matches_linen_twin():
  """jaxq.act.nnx.compressed_call of a Linear equals jaxq.act.linen.compressed_call of the
  Dense with the same weights (same residuals, round to nearest)."""
  lin = nnx.Linear(8, 32, rngs=nnx.Rngs(1))
  x = _x()
  params = {"kernel": lin.kernel.get_value(), "bias": lin.bias.get_value()}

  def nnx_loss(p):
    m = nnx.clone(lin)
    nnx.update(m, nnx.State(p))
    return jnp.sum(jnp.sin(compressed_call(m, "__call__", (x,), bits=2, group_size=32)))

  def interceptor(next_fun, args, kwargs, ctx):
    if isinstance(ctx.module, nn.Dense) and ctx.method_name == "__call__":
      return act.linen.compressed_call(ctx.module, "__call__", args, kwargs, bits=2,
                                       group_size=32)
    return next_fun(*args, **kwargs)

  def linen_loss(p):
    with nn.intercept_methods(interceptor):
      return jnp.sum(jnp.sin(nn.Dense(32).apply({"params": p}, x)))

  np.testing.assert_allclose(_flat(jax.grad(nnx_loss)(params)),
                             _flat(jax.grad(linen_loss)(params)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# int8 modes: W8A8 on int8 operands, as the Linen twin and as fake quantization
# ---------------------------------------------------------------------------------------


class LinenMlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="fc2")(nn.relu(nn.Dense(32, name="fc1")(x)))


class NnxMlp(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(8, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


def _int8_dots(jaxpr: str) -> int:
  return len(re.findall(r"i32\[[\d,]*\] = dot_general", jaxpr))


def test_int8_modes_match_linen_twin_and_fake_quant():
  x = _x()
  params = LinenMlp().init(jax.random.key(0), x)["params"]
  model = NnxMlp(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  rules = Rule(".*", weight=W8, act=A8)
  res = {}
  for mode in ("off", "forward", "all"):
    q = jnnx.quantize_model(model, rules, int8=mode)
    out = nnx.jit(lambda m: m(x))(q)
    g = nnx.to_pure_dict(_grad(q, x))
    res[mode] = (out, g, _int8_dots(str(jax.make_jaxpr(lambda m: _grad(m, x))(q))))
  lq = jaxq.quantize_model(LinenMlp(), rules, int8="all")
  l_out = jax.jit(lq.apply)({"params": params}, x)
  l_g = jax.jit(jax.grad(lambda p: jnp.sum(lq.apply({"params": p}, x) * _REF)))(params)
  # int8 runs: two forward int8 matmuls, and the four backward ones with "all".
  assert [res[m][2] for m in ("off", "forward", "all")] == [0, 2, 6]
  off_out, off_g, _ = res["off"]
  for mode in ("forward", "all"):
    np.testing.assert_allclose(res[mode][0], off_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_flat(res["forward"][1]), _flat(off_g), rtol=1e-5, atol=1e-5)
  a, b = _flat(res["all"][1]), _flat(off_g)  # gradients quantized to int8 per row/column
  assert 0 < float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 0.02
  np.testing.assert_allclose(res["all"][0], l_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(a, _flat(l_g), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Never-updated observers
# ---------------------------------------------------------------------------------------


def test_never_updated_observer_raises_in_linen():
  x = _x()
  q = jaxq.quantize_model(LinenMlp(), Rule("fc2", weight=None, act=EMA))
  v = q.init(jax.random.key(0), x)
  assert float(v["quant_stats"]["fc2"]["jaxq_act"]["n"].max()) == 1.0  # init updates it
  fresh = {"params": v["params"], "quant_stats": {"fc2": {"jaxq_act": observer_init(
      EMA, v["quant_stats"]["fc2"]["jaxq_act"]["n"].shape)}}}
  with pytest.raises(ValueError, match="layer 'fc2': its activation observer.*never updated"):
    q.apply(fresh, x)
  # Under jit the count is traced: the never-observed range gives NaN, not a made-up scale.
  assert np.isnan(np.asarray(jax.jit(q.apply)(fresh, x))).all()
  assert np.isfinite(np.asarray(jax.jit(q.apply)(v, x))).all()


def test_never_updated_observer_raises_in_nnx_eval_mode():
  model = NnxMlp(nnx.Rngs(0))
  x = _x()
  q = jnnx.quantize_model(model, Rule("fc2", weight=None, act=EMA))
  call = nnx.jit(lambda m: m(x))
  q.eval()
  with pytest.raises(ValueError, match="layer 'fc2'.*never updated.*model.eval"):
    q(x)
  with pytest.raises(ValueError, match="layer 'fc2'.*never updated"):
    call(q)
  # Evaluation mode entered inside a trace: the count is unknown there, outputs are NaN.
  q.train()
  view = nnx.jit(lambda m: nnx.view(m, use_running_average=True)(x))
  assert np.isnan(np.asarray(view(q))).all()
  # Updated in training mode (under nnx.jit), then read in eval mode: fine.
  call(q)
  q.eval()
  assert np.isfinite(np.asarray(call(q))).all()
  assert np.isfinite(np.asarray(view(q))).all()


def test_ptf_observer_never_updated_raises_and_calibrates_in_training_mode():
  ln = nnx.LayerNorm(8, rngs=nnx.Rngs(0))
  ptf = QuantSpec(8, signed=False, symmetric=False, scheme="ptf")
  q = jnnx.quantize_model(ln, Rule(".*", weight=None, act=ptf))
  x = _x() * jnp.arange(1.0, 9.0)
  np.testing.assert_allclose(q(x), ln(jaxq.quantizer.fake_quantize(x, ptf)), rtol=1e-6,
                             atol=1e-6)
  with pytest.raises(ValueError, match="layer '': its activation observer.*never updated"):
    nnx_fqvit.ptf_observer_qparams(q)
  q.jaxq_mode = "calibrate"
  np.testing.assert_array_equal(q(x), ln(x))  # float forward, observer updated
  scale, zp, fexp = nnx_fqvit.ptf_observer_qparams(q)
  s2, z2, f2 = jaxq.estimators.ptf_calibrate(x, 8, signed=False)
  np.testing.assert_allclose(scale, s2, rtol=1e-6)
  np.testing.assert_array_equal(zp, z2)
  np.testing.assert_array_equal(fexp, f2)
