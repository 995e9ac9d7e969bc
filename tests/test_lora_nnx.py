"""NNX LoRA / QLoRA (Contract 8): training the adapters, jaxq.nnx.lora_freeze and
jaxq.nnx.lora_merge, against hand computations and a Linen twin (the pattern of
tests/_twins.py on a small MLP, so that the compilations stay cheap)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxq
from jaxq.flax.nnx_lora import LoRABase
from jaxq.qarray import QArray
from tests._twins import Stack

NF4 = jaxq.QuantSpec(bits=4, scheme="nf4", granularity="group", group_size=16)
W8 = jaxq.QuantSpec(8)
LAYERS = ("fc1", "head")
# QLoRA on fc1 (NF4), LoRA over an int8 base with an 8-bit activation on the head.
RULES = (jaxq.Rule("fc1", weight=NF4, lora=jaxq.LoRA(4, 8.0)),
         jaxq.Rule("head", weight=W8, act=jaxq.QuantSpec(8), lora=jaxq.LoRA(2)))
X = jax.random.normal(jax.random.key(1), (6, 16))
Y = jnp.sin(jnp.arange(48, dtype=jnp.float32).reshape(6, 8))


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="norm")(nn.relu(nn.Dense(32, name="fc1")(x)))
    return nn.Dense(8, name="head")(h)


class NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(16, 32, rngs=rngs)
    self.norm = nnx.LayerNorm(32, rngs=rngs)
    self.head = nnx.Linear(32, 8, rngs=rngs)

  def __call__(self, x):
    return self.head(self.norm(nnx.relu(self.fc1(x))))


@functools.lru_cache(maxsize=None)
def _linen_params():
  return LinenMLP().init(jax.random.key(0), X)["params"]


def twins():
  """``(linen_model, linen_params, nnx_model)`` with the same float weights."""
  model = NnxMLP(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, _linen_params())
  nnx.update(model, state)
  return LinenMLP(), _linen_params(), model


def _layer(model, path):
  for name in path.split("/"):
    model = getattr(model, name)
  return model


def _node(params, path):
  for name in path.split("/"):
    params = params[name]
  return params


def _set_adapters(q, adapters):
  for path, (a, b) in adapters.items():
    _layer(q, path).lora_a.set_value(jnp.asarray(a))
    _layer(q, path).lora_b.set_value(jnp.asarray(b))


@nnx.jit
def _forward(m, x):
  return m(x)


@nnx.jit
def _step(m, opt, x, y):
  loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(m)
  opt.update(m, g)
  return loss


def _float_arrays(model):
  return [a for a in jax.tree.leaves(nnx.state(model)) if jnp.issubdtype(a.dtype, jnp.floating)]


def test_at_init_equals_the_base_and_its_qat_model():
  """B = 0: a LoRA model computes its base: the float model without a weight spec, the
  rule's QAT model (same specs, no lora) with one; to float32 rounding, since under jit
  XLA may fuse the bias into the plain model's matmul (tests/test_lora_flax.py checks
  the eager equality bit for bit)."""
  _, _, model = twins()
  plain = jaxq.nnx.quantize_model(model, jaxq.Rule("fc1|head", weight=None,
                                                   lora=jaxq.LoRA(2)))
  np.testing.assert_allclose(_forward(plain, X), _forward(model, X), rtol=1e-6, atol=1e-6)
  q = jaxq.nnx.quantize_model(model, RULES)
  qat = jaxq.nnx.quantize_model(model, [jaxq.Rule(r.path, weight=r.weight, act=r.act)
                                        for r in RULES])
  np.testing.assert_allclose(_forward(q, X), _forward(qat, X), rtol=1e-6, atol=1e-6)
  assert not np.array_equal(_forward(q, X), _forward(model, X))


def test_train_freeze_train_merge():
  """Adapters train and the base stays bit-identical; freeze packs the base (no float
  kernel left) without changing outputs and training goes on; merge gives
  dequant(base) + (alpha / r) A B in a float model that quantizes and converts anew."""
  _, _, model = twins()
  float_graph = nnx.graphdef(model)
  q = jaxq.nnx.quantize_model(model, [jaxq.Rule(r.path, weight=r.weight, lora=r.lora)
                                      for r in RULES])
  opt = nnx.Optimizer(q, optax.adam(1e-2), wrt=nnx.Param)
  base = {p: np.asarray(_layer(q, p).kernel.get_value()) for p in LAYERS}
  adapters = {p: np.asarray(_layer(q, p).lora_a.get_value()) for p in LAYERS}
  losses = [float(_step(q, opt, X, Y)) for _ in range(3)]
  assert losses[-1] < losses[0]
  for p in LAYERS:
    assert isinstance(_layer(q, p).kernel, LoRABase)
    np.testing.assert_array_equal(_layer(q, p).kernel.get_value(), base[p])
    assert not np.array_equal(_layer(q, p).lora_a.get_value(), adapters[p])
    assert float(jnp.max(jnp.abs(_layer(q, p).lora_b.get_value()))) > 0

  before = _forward(q, X)
  report = jaxq.nnx.report(q).rows  # NF4 bytes as lora_freeze stores them
  assert [r["quant_bytes"] for r in report] == [16 * 32 // 2 + 4 * 32 + 1, 32 * 8 + 4 * 8 + 1]
  assert jaxq.nnx.lora_freeze(q) is q
  assert jaxq.nnx.report(q).rows == report
  np.testing.assert_allclose(_forward(q, X), before, rtol=1e-6, atol=1e-6)
  fc1 = q.fc1.kernel.get_value()
  assert isinstance(fc1, QArray) and fc1.shape == (16, 32)
  assert fc1.nbytes <= 16 * 32 // 2 + 4 * 32 + 8  # two codes a byte + a float32 per group
  assert isinstance(q.head.kernel.get_value(), QArray)
  assert q.head.kernel.get_value().values.dtype == jnp.int8
  kernel_shapes = {base[p].shape for p in LAYERS}
  assert not [a.shape for a in _float_arrays(q) if a.shape in kernel_shapes]
  frozen = {p: jax.tree.map(np.asarray, _layer(q, p).kernel.get_value()) for p in LAYERS}

  losses = [float(_step(q, opt, X, Y)) for _ in range(2)]  # the same optimizer
  assert losses[-1] < losses[0]
  for p in LAYERS:
    for got, want in zip(jax.tree.leaves(_layer(q, p).kernel.get_value()),
                         jax.tree.leaves(frozen[p])):
      np.testing.assert_array_equal(got, want)

  trained = _forward(q, X)
  want = {}
  for p, scaling in zip(LAYERS, (2.0, 1.0)):
    layer = _layer(q, p)
    w = np.asarray(jaxq.dequantize(layer.kernel.get_value()), np.float64)
    a = np.asarray(layer.lora_a.get_value(), np.float64)
    b = np.asarray(layer.lora_b.get_value(), np.float64)
    want[p] = w + scaling * a @ b
  assert jaxq.nnx.lora_merge(q) is q
  for p in LAYERS:
    layer = _layer(q, p)
    assert type(layer) is nnx.Linear and isinstance(layer.kernel, nnx.Param)
    assert not any(n.startswith(("lora_", "jaxq_")) for n in vars(layer))
    np.testing.assert_allclose(layer.kernel.get_value(), want[p], rtol=1e-6, atol=1e-6)
  assert nnx.graphdef(q) == float_graph  # the float model again
  np.testing.assert_allclose(_forward(q, X), trained, rtol=1e-5, atol=1e-5)
  served = jaxq.nnx.convert(jaxq.nnx.quantize_model(q, jaxq.Rule("fc1|head", weight=W8)))
  assert isinstance(served.fc1.kernel.get_value(), QArray)
  np.testing.assert_allclose(_forward(served, X), trained, rtol=0.05, atol=0.05)


def _linen_lora(rules):
  """The Linen twin's LoRA variables with non-zero ``lora_b``, and the NNX twin with the
  same adapters."""
  model, params, nmodel = twins()
  lq = jaxq.quantize_model(model, rules)
  variables = jaxq.flax.init_quant_params(lq, {"params": params}, X,
                                          rngs={"params": jax.random.key(7)})
  p = jax.tree.map(lambda v: v, variables["params"])
  adapters = {}
  for i, path in enumerate(LAYERS):
    node = _node(p, path)
    node["lora_b"] = 0.1 * jax.random.normal(jax.random.key(i), node["lora_b"].shape)
    adapters[path] = (node["lora_a"], node["lora_b"])
  nq = jaxq.nnx.quantize_model(nmodel, rules)
  _set_adapters(nq, adapters)
  return model, lq, {"params": p}, nq


def test_linen_and_nnx_agree_through_freeze_and_merge():
  model, lq, variables, nq = _linen_lora(RULES)
  np.testing.assert_allclose(_forward(nq, X), lq.apply(variables, X), rtol=1e-5, atol=1e-5)

  lfrozen = jaxq.lora.freeze(lq, variables)
  jaxq.nnx.lora_freeze(nq)
  for p in LAYERS:
    for got, want in zip(jax.tree.leaves(_layer(nq, p).kernel.get_value()),
                         jax.tree.leaves(_node(lfrozen["params"], p)["kernel"])):
      np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(_forward(nq, X), lq.apply(lfrozen, X), rtol=1e-5, atol=1e-5)

  lmerged = jaxq.lora.merge(lq, lfrozen)
  jaxq.nnx.lora_merge(nq)
  for p in LAYERS:
    np.testing.assert_allclose(_layer(nq, p).kernel.get_value(),
                               _node(lmerged["params"], p)["kernel"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(_forward(nq, X), model.apply(lmerged, X), rtol=1e-5, atol=1e-5)


def test_unfrozen_merge_folds_into_the_float_base_as_linen():
  """Without freezing, merge adds ``(alpha / r) A B`` to the float kernel (Linen's)."""
  rules = [jaxq.Rule("fc1|head", weight=NF4, lora=jaxq.LoRA(4, 2.0))]
  model, lq, variables, nq = _linen_lora(rules)
  w = np.asarray(nq.head.kernel.get_value(), np.float64)
  a = np.asarray(nq.head.lora_a.get_value(), np.float64)
  b = np.asarray(nq.head.lora_b.get_value(), np.float64)
  jaxq.nnx.lora_merge(nq)
  np.testing.assert_allclose(nq.head.kernel.get_value(), w + 0.5 * a @ b, rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(_forward(nq, X), model.apply(jaxq.lora.merge(lq, variables), X),
                             rtol=1e-5, atol=1e-5)
  # A layer under another jaxq subclass too (act_compress's) gets its float class back.
  nq = jaxq.nnx.quantize_model(twins()[2], jaxq.Rule("head", act_compress=4,
                                                     lora=jaxq.LoRA(2)))
  jaxq.nnx.lora_merge(nq)
  assert type(nq.head) is nnx.Linear and not [n for n in vars(nq.head) if "jaxq" in n]


def test_stacked_layers_freeze_and_merge_per_layer():
  x = jax.random.normal(jax.random.key(1), (4, 8))
  q = jaxq.nnx.quantize_model(Stack(), jaxq.Rule("layers", weight=jaxq.QuantSpec(
      bits=4, scheme="nf4", granularity="group", group_size=8), lora=jaxq.LoRA(2)))
  b = q.layers.lora_b
  b.set_value(0.2 * jax.random.normal(jax.random.key(2), b.get_value().shape))
  before = _forward(q, x)
  report = jaxq.nnx.report(q).rows
  assert report[0]["float_bytes"] == 3 * 8 * 8 * 4
  jaxq.nnx.lora_freeze(q)
  assert jaxq.nnx.report(q).rows == report
  kernel = q.layers.kernel.get_value()
  assert kernel.shape == (8, 8) and kernel.values.size == 3 * 8 * 8 // 2  # per layer
  np.testing.assert_allclose(_forward(q, x), before, rtol=1e-6, atol=1e-6)
  w = np.asarray(jax.vmap(jaxq.dequantize)(kernel), np.float64)
  ab = np.einsum("lkr,lrn->lkn", np.asarray(q.layers.lora_a.get_value(), np.float64),
                 np.asarray(b.get_value(), np.float64))
  jaxq.nnx.lora_merge(q)
  np.testing.assert_allclose(q.layers.kernel.get_value(), w + ab, rtol=1e-6, atol=1e-6)
  assert type(q.layers) is nnx.Linear


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_freeze_and_merge_need_lora_layers():
  _, params, model = twins()
  for fn in (jaxq.nnx.lora_freeze, jaxq.nnx.lora_merge):
    with pytest.raises(ValueError, match="no LoRA layer: it is not quantized"):
      fn(model)
    with pytest.raises(ValueError, match="no LoRA layer: no rule has lora="):
      fn(jaxq.nnx.quantize_model(model, jaxq.Rule("head", weight=W8)))
  q = jaxq.nnx.quantize_model(model, jaxq.Rule("head", lora=jaxq.LoRA(2)))
  jaxq.nnx.lora_merge(q)
  with pytest.raises(ValueError, match="lora_merge: .*not quantized.*merged already"):
    jaxq.nnx.lora_merge(q)
  with pytest.raises(ValueError, match="lora.freeze: no rule has lora="):
    jaxq.lora.freeze([jaxq.Rule("head", weight=W8)], {"params": params})
  rules = [jaxq.Rule("head", lora=jaxq.LoRA(2))]
  with pytest.raises(ValueError, match="lora.merge: the variables hold no LoRA adapter"):
    jaxq.lora.merge(rules, {"params": params})


def test_lora_on_modules_it_cannot_adapt_names_the_rule_and_layer():
  """A LoRA rule that matches only modules without an adaptable kernel (a LayerNorm) is
  an error in both APIs; a kernel jaxq cannot adapt (ConvTranspose) is one anywhere."""
  rule = jaxq.Rule("norm", lora=jaxq.LoRA(2))
  model, params, nmodel = twins()
  with pytest.raises(ValueError, match=r"Rule.lora=.*only modules.*'norm' \(LayerNorm\)"):
    jaxq.nnx.quantize_model(nmodel, rule)
  with pytest.raises(ValueError, match=r"Rule.lora=.*only modules.*'norm' \(LayerNorm\)"):
    jaxq.quantize_model(model, rule).apply({"params": params}, X)
  # A rule that adapts some layer may also match parameter-holding modules it skips.
  jaxq.nnx.quantize_model(nmodel, jaxq.Rule("norm|fc1", lora=jaxq.LoRA(2)))

  class WithTranspose(nnx.Module):

    def __init__(self, rngs):
      self.up = nnx.ConvTranspose(3, 4, (2, 2), rngs=rngs)

  with pytest.raises(ValueError, match="'up' \\(ConvTranspose\\) a LoRA adapter"):
    jaxq.nnx.quantize_model(WithTranspose(nnx.Rngs(0)), jaxq.Rule("up", lora=jaxq.LoRA(2)))

  class LinenTranspose(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.ConvTranspose(4, (2, 2), name="up")(x)

  with pytest.raises(ValueError, match="'up' \\(ConvTranspose\\) a LoRA adapter"):
    jaxq.quantize_model(LinenTranspose(), jaxq.Rule("up", lora=jaxq.LoRA(2))).init(
        jax.random.key(0), jnp.zeros((1, 4, 4, 3)))


def test_nf4_group_that_does_not_divide_names_the_layer():
  nf4 = jaxq.QuantSpec(bits=4, scheme="nf4", granularity="group", group_size=5)
  rule = jaxq.Rule("fc1", weight=nf4, lora=jaxq.LoRA(2))
  model, _, nmodel = twins()
  with pytest.raises(ValueError, match="'fc1'.*group_size=5"):
    jaxq.nnx.quantize_model(nmodel, rule)
  with pytest.raises(ValueError, match="'fc1'.*group_size=5"):
    jaxq.quantize_model(model, rule).init(jax.random.key(0), X)
