"""LoRA / QLoRA through jaxq.quantize_model (Contract 8), against hand computations."""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxq
from jaxq import lora
from jaxq.qarray import QArray

NF4 = jaxq.QuantSpec(bits=4, scheme="nf4", granularity="group", group_size=16)


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name="fc1")(x))
    return nn.Dense(8, name="fc2")(x)


X = jax.random.normal(jax.random.key(1), (6, 16))


@pytest.fixture(scope="module")
def base():
  model = MLP()
  return model, model.init(jax.random.key(0), X)


def _qmodel(model, weight, rank=4, alpha=8.0):
  return jaxq.quantize_model(model, [jaxq.Rule("fc.*", weight=weight,
                                               lora=jaxq.LoRA(rank, alpha))])


def _adapted(params):
  """The model's output by hand: float64 numpy, each Dense ``x W + s x A B + b``."""
  def dense(x, p):
    w = np.asarray(p["kernel"], np.float64)
    a, b = np.asarray(p["lora_a"], np.float64), np.asarray(p["lora_b"], np.float64)
    return x @ w + 2.0 * (x @ a) @ b + np.asarray(p["bias"], np.float64)
  h = np.maximum(dense(np.asarray(X, np.float64), params["fc1"]), 0.0)
  return dense(h, params["fc2"])


def test_init_equals_base_and_adapter_math(base):
  model, variables = base
  qmodel = _qmodel(model, None)
  qvars = jaxq.flax.init_quant_params(qmodel, variables, X, rngs={"params": jax.random.key(2)})
  p = qvars["params"]
  assert p["fc1"]["lora_a"].shape == (16, 4) and p["fc1"]["lora_b"].shape == (4, 32)
  assert np.all(np.asarray(p["fc2"]["lora_b"]) == 0)
  np.testing.assert_array_equal(qmodel.apply(qvars, X), model.apply(variables, X))
  # Non-zero adapters: the output is the hand-computed x W + (alpha / r) x A B + b.
  p = jax.tree_util.tree_map(lambda v: v, p)
  for name in ("fc1", "fc2"):
    p[name]["lora_b"] = 0.1 * jax.random.normal(jax.random.key(3), p[name]["lora_b"].shape)
  np.testing.assert_allclose(qmodel.apply({"params": p}, X), _adapted(p), rtol=1e-5,
                             atol=1e-5)


def test_training_moves_only_the_adapters_then_freeze_and_merge(base):
  model, variables = base
  qmodel = _qmodel(model, NF4)
  qvars = jaxq.flax.init_quant_params(qmodel, variables, X, rngs={"params": jax.random.key(2)})
  params = qvars["params"]
  y = jnp.sin(jnp.arange(48.0).reshape(6, 8))
  tx = optax.multi_transform({True: optax.adam(1e-2), False: optax.set_to_zero()},
                             lora.trainable(params))
  loss = lambda p: jnp.mean((qmodel.apply({"params": p}, X) - y) ** 2)  # noqa: E731

  @jax.jit
  def step(p, s):
    l, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  grads = jax.grad(loss)(params)
  assert float(jnp.max(jnp.abs(grads["fc1"]["kernel"]))) == 0.0  # the base gets none
  state = tx.init(params)
  losses = []
  p = params
  for _ in range(5):
    p, state, l = step(p, state)
    losses.append(float(l))
  assert losses[-1] < losses[0]
  for name in ("fc1", "fc2"):
    np.testing.assert_array_equal(p[name]["kernel"], params[name]["kernel"])
    np.testing.assert_array_equal(p[name]["bias"], params[name]["bias"])
    assert float(jnp.max(jnp.abs(p[name]["lora_b"]))) > 0

  # freeze: NF4 QArray bases (two codes a byte), the same outputs as the QAT model.
  frozen = lora.freeze(qmodel, {"params": p})
  kernel = frozen["params"]["fc1"]["kernel"]
  assert isinstance(kernel, QArray)
  assert kernel.nbytes <= 16 * 32 // 2 + 4 * (16 * 32 // 16) + 8
  np.testing.assert_allclose(qmodel.apply(frozen, X), qmodel.apply({"params": p}, X),
                             rtol=1e-6, atol=1e-6)

  # merge: W_dequant + (alpha / r) A B in a float model.
  merged = lora.merge(qmodel, frozen)
  fc1 = merged["params"]["fc1"]
  assert "lora_a" not in fc1 and not isinstance(fc1["kernel"], QArray)
  want = (np.asarray(jaxq.dequantize(kernel), np.float64)
          + 2.0 * np.asarray(p["fc1"]["lora_a"], np.float64) @ np.asarray(
              p["fc1"]["lora_b"], np.float64))
  np.testing.assert_allclose(fc1["kernel"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.apply(merged, X), qmodel.apply(frozen, X), rtol=1e-5,
                             atol=1e-5)


def test_bad_input_names_the_field_and_layer(base):
  model, variables = base

  class WithEmbed(nn.Module):

    @nn.compact
    def __call__(self, ids):
      return nn.Dense(4, name="head")(nn.Embed(10, 8, name="emb")(ids))

  emb_model = jaxq.quantize_model(WithEmbed(), [jaxq.Rule(".*", weight=None,
                                                          lora=jaxq.LoRA(2))])
  with pytest.raises(ValueError, match="'emb'.*LoRA"):
    emb_model.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
  qmodel = _qmodel(model, None)
  with pytest.raises(ValueError, match="Rule.lora.*jaxq.calibrate"):
    jaxq.calibrate(qmodel, variables, [X])
  with pytest.raises(ValueError, match="Rule.lora.*jaxq.quantize_params"):
    jaxq.quantize_params(variables["params"], [jaxq.Rule(lora=jaxq.LoRA(2))])
  with pytest.raises(ValueError, match="Rule.smooth.*jaxq.quantize_params"):
    jaxq.quantize_params(variables["params"], [jaxq.Rule(
        act=jaxq.QuantSpec(granularity="tensor"), smooth=0.5)])
  with pytest.raises(ValueError, match="LoRA.rank"):
    jaxq.LoRA(0)
  with pytest.raises(ValueError, match="'params' rng"):
    jaxq.flax.init_quant_params(qmodel, variables, X)


class NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(16, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 8, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


def test_nnx_lora_matches_hand_computation_and_trains_only_adapters(base):
  model, variables = base
  nmodel = NnxMLP(nnx.Rngs(0))
  for name in ("fc1", "fc2"):
    layer = getattr(nmodel, name)
    layer.kernel.set_value(variables["params"][name]["kernel"])
    layer.bias.set_value(variables["params"][name]["bias"])
  qmodel = jaxq.nnx.quantize_model(nmodel, [jaxq.Rule("fc.*", weight=None,
                                                      lora=jaxq.LoRA(4, 8.0))])
  np.testing.assert_array_equal(qmodel(X), model.apply(variables, X))  # B = 0 at init
  assert not isinstance(qmodel.fc1.kernel, nnx.Param)  # the base is frozen
  for name in ("fc1", "fc2"):
    layer = getattr(qmodel, name)
    layer.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(3), layer.lora_b.shape))
  hand = {name: {k: getattr(getattr(qmodel, name), k).get_value()
                 for k in ("kernel", "bias", "lora_a", "lora_b")} for name in ("fc1", "fc2")}
  np.testing.assert_allclose(qmodel(X), _adapted(hand), rtol=1e-5, atol=1e-5)

  kernel0 = np.asarray(qmodel.fc1.kernel.get_value())
  a0 = np.asarray(qmodel.fc1.lora_a.get_value())
  opt = nnx.Optimizer(qmodel, optax.adamw(1e-2, weight_decay=0.1), wrt=nnx.Param)
  y = jnp.sin(jnp.arange(48.0).reshape(6, 8))

  @nnx.jit
  def step(m, o):
    loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(X) - y) ** 2))(m)
    o.update(m, g)
    return loss

  losses = [float(step(qmodel, opt)) for _ in range(4)]
  assert losses[-1] < losses[0]
  np.testing.assert_array_equal(qmodel.fc1.kernel.get_value(), kernel0)
  assert not np.array_equal(qmodel.fc1.lora_a.get_value(), a0)

  with pytest.raises(ValueError, match="Rule.lora.*jaxq.nnx.calibrate"):
    jaxq.nnx.calibrate(qmodel, [X])

  class WithEmbed(nnx.Module):

    def __init__(self, rngs):
      self.emb = nnx.Embed(10, 8, rngs=rngs)
      self.head = nnx.Linear(8, 4, rngs=rngs)

  with pytest.raises(ValueError, match="'emb'.*LoRA"):
    jaxq.nnx.quantize_model(WithEmbed(nnx.Rngs(0)), [jaxq.Rule(".*", weight=None,
                                                               lora=jaxq.LoRA(2))])
