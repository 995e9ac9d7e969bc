"""jaxq.flax.nnx.quantize_model: Flax NNX QAT (paths, numerics, state, modes, training)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxq import calibration
from jaxq import quantizer
from jaxq.flax import nnx as jnnx
from jaxq.spec import QuantSpec, Rule
from tests._models import load_digits_split
from tests._twins import NnxBlock

W8 = QuantSpec()  # int8 symmetric per output channel
A8 = QuantSpec(granularity="tensor")


# ---------------------------------------------------------------------------------------
# Small NNX models
# ---------------------------------------------------------------------------------------


class TinyViT(nnx.Module):
  """Patch embedding (Linear on 2x2 patches), ``depth`` pre-LN blocks, mean pool."""

  def __init__(self, dim=32, depth=1, heads=2, mlp=64, classes=10, *, rngs):
    self.embed = nnx.Linear(4, dim, rngs=rngs)
    self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, 16, dim)) * 0.02)
    self.blocks = nnx.List([NnxBlock(rngs, dim, heads, mlp) for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, classes, rngs=rngs)

  def __call__(self, x):
    b = x.shape[0]
    x = x.reshape(b, 4, 2, 4, 2, 1).transpose(0, 1, 3, 2, 4, 5).reshape(b, 16, 4)
    x = self.embed(x) + self.pos[...]
    for blk in self.blocks:
      x = blk(x)
    return self.head(self.norm(x).mean(axis=1))


class TinyCNN(nnx.Module):
  """Conv -> BatchNorm -> relu, twice, mean pool, Linear."""

  def __init__(self, *, rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.head(x.mean(axis=(1, 2)))


class Mixed(nnx.Module):
  """One of each supported layer type (and a ConvTranspose, which is not supported)."""

  def __init__(self, *, rngs):
    self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.general = nnx.LinearGeneral(4, (2, 3), rngs=rngs)
    self.einsum = nnx.Einsum("...hd,hdo->...o", (2, 3, 5), (5,), rngs=rngs)
    self.layers = nnx.List([nnx.Linear(5, 5, rngs=rngs) for _ in range(2)])
    self.embed = nnx.Embed(7, 5, rngs=rngs)
    self.deconv = nnx.ConvTranspose(2, 2, (3, 3), rngs=rngs)

  def __call__(self, x):
    x = self.general(self.conv(x))
    x = self.einsum(x)
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return x


_call = nnx.jit(lambda m, x: m(x))


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# Reference fake quantization, jitted (one compilation instead of one per eager op).
_fq = jax.jit(quantizer.fake_quantize, static_argnums=1)


@functools.lru_cache(maxsize=None)
def _cached(make):
  return nnx.jit(lambda: make(rngs=nnx.Rngs(0)))()


def _new(make):
  """A fresh copy of a once-initialised model (initialisers compile once per test run)."""
  return nnx.clone(_cached(make))


def _flat_shapes(model, *filters):
  """``{"a/b/kernel": shape}`` of the model's state (optionally filtered)."""
  state = nnx.state(model, *filters) if filters else nnx.state(model)
  flat = jax.tree_util.tree_flatten_with_path(state.to_pure_dict())[0]
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): jnp.shape(v)
          for path, v in flat}


# ---------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------


def test_rule_matching_nothing_is_bitwise_identity():
  model = _new(Mixed)
  x = _x((2, 6, 6, 2))
  ref = _call(model, x)
  with pytest.warns(UserWarning, match="'nothing'.*matches no module"):
    qs = [jnnx.quantize_model(model, Rule("nothing"))]
  qs += [jnnx.quantize_model(model, r) for r in ([Rule(".*", weight=None, act=None)], [])]
  for q in qs:
    np.testing.assert_array_equal(_call(q, x), ref)
    assert jnnx.quantized_layers(q) == {}
    assert _flat_shapes(q) == _flat_shapes(model)


def test_state_keeps_float_paths_and_shapes():
  model = _new(TinyViT)
  rules = [Rule(".*", weight=QuantSpec(bits=4, estimator="lsq"),
                act=QuantSpec(bits=4, granularity="tensor", estimator="lsq"))]
  q = jnnx.quantize_model(model, rules)
  float_shapes, q_shapes = _flat_shapes(model, nnx.Param), _flat_shapes(q, nnx.Param)
  for path, shape in float_shapes.items():
    assert q_shapes[path] == shape, path
  extra = {p.rsplit("/", 1)[-1] for p in set(q_shapes) - set(float_shapes)}
  assert extra == {"jaxq_weight_scale", "jaxq_act_scale"}
  layers = jnnx.quantized_layers(q)
  assert set(layers) == {"embed", "head", "blocks/0/fc1", "blocks/0/fc2",
                         "blocks/0/attn/query", "blocks/0/attn/key", "blocks/0/attn/value",
                         "blocks/0/attn/out"}
  assert isinstance(q.blocks[0].attn.query, jnnx.QuantizedLinearGeneral)
  assert isinstance(q.head, jnnx.QuantizedLinear) and isinstance(q.head, nnx.Linear)
  # The original model is untouched; quantize_model copied it (sharing the arrays).
  assert type(model.head) is nnx.Linear and not hasattr(model.head, "jaxq_config")
  assert q.head.kernel.get_value() is model.head.kernel.get_value()
  # A float checkpoint (the float model's Param state) restores into the quantized model.
  nnx.update(q, nnx.state(model, nnx.Param))


def test_first_matching_rule_wins_and_inplace():
  model = _new(Mixed)
  rules = [Rule("layers/1", weight=None, act=None), Rule("layers/.*", weight=W8),
           Rule("conv", weight=QuantSpec(bits=4))]
  out = jnnx.quantize_model(model, rules, inplace=True)
  assert out is model
  layers = jnnx.quantized_layers(model)
  assert set(layers) == {"layers/0", "conv"}
  assert layers["conv"].weight.bits == 4 and layers["layers/0"].act is None


def test_errors():
  model = _new(Mixed)
  with pytest.raises(ValueError,
                     match="only layers jaxq cannot quantize.*'deconv' \\(ConvTranspose\\)"):
    jnnx.quantize_model(model, Rule("deconv"))
  # ConvTranspose matched alongside supported layers: float
  jnnx.quantize_model(model, Rule(".*"))
  with pytest.raises(ValueError, match="group_size=4 does not divide"):
    jnnx.quantize_model(model, Rule("layers/0", weight=QuantSpec(granularity="group",
                                                                 group_size=4)))
  with pytest.raises(ValueError, match="activation group_size=3 does not divide"):
    jnnx.quantize_model(model, Rule("layers/0", act=QuantSpec(granularity="group",
                                                              group_size=3)))
  with pytest.raises(ValueError, match="scheme must be 'uniform'"):
    jnnx.quantize_model(model, Rule("layers/0", weight=QuantSpec(scheme="log2",
                                                                 signed=False)))
  with pytest.raises(ValueError, match="batch_axis"):
    jnnx.quantize_model(nnx.LinearGeneral(3, 4, batch_axis={0: 2}, rngs=nnx.Rngs(0)),
                        Rule(".*"))
  with pytest.raises(ValueError, match="already quantized"):
    jnnx.quantize_model(jnnx.quantize_model(model, Rule("conv")), Rule("conv"))
  with pytest.raises(ValueError, match="'jaxq' stream"):
    jnnx.quantize_model(model, Rule(".*"), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="rules"):
    jnnx.quantize_model(model, "conv")
  with pytest.raises(TypeError, match="flax.nnx.Module"):
    jnnx.quantize_model(lambda x: x, Rule(".*"))


# ---------------------------------------------------------------------------------------
# Numerics against jaxq.quantizer on the operands
# ---------------------------------------------------------------------------------------


def test_linear_and_conv_match_reference():
  rngs = nnx.Rngs(1)
  lin = nnx.Linear(6, 5, rngs=rngs)
  conv = nnx.Conv(3, 4, (3, 3), strides=2, padding="CIRCULAR", rngs=rngs)
  x_lin, x_conv = _x((7, 6)), _x((2, 5, 5, 3), 1)
  wspec = QuantSpec(bits=4)
  aspec = QuantSpec(bits=6, granularity="tensor", symmetric=False)
  ql = jnnx.quantize_model(lin, Rule(".*", weight=wspec, act=aspec))
  qc = jnnx.quantize_model(conv, Rule(".*", weight=wspec, act=aspec))

  w = _fq(lin.kernel.get_value(), wspec)
  xq = _fq(x_lin, aspec)
  np.testing.assert_allclose(_call(ql, x_lin), xq @ w + lin.bias.get_value(), rtol=1e-6, atol=1e-6)

  ref_conv = nnx.clone(conv)
  ref_conv.kernel.set_value(_fq(conv.kernel.get_value(), wspec))
  # CIRCULAR padding copies input values, so the per-tensor range is the input's.
  ref = _call(ref_conv, _fq(x_conv, aspec))
  np.testing.assert_allclose(_call(qc, x_conv), ref, rtol=1e-5, atol=1e-5)
  assert not np.allclose(_call(qc, x_conv), _call(conv, x_conv), atol=1e-3)


def test_linear_general_and_einsum_match_reference():
  rngs = nnx.Rngs(2)
  lg = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=rngs)
  ein = nnx.Einsum("bhd,hdo->bo", (2, 3, 4), (4,), rngs=rngs)
  x = _x((5, 2, 3))
  aspec = QuantSpec(bits=8, granularity="channel")  # one scale per input feature (h, d)
  for layer in (lg, ein):
    q = jnnx.quantize_model(layer, Rule(".*", weight=W8, act=aspec))
    k = layer.kernel.get_value()
    wq = _fq(k.reshape(6, 4), W8).reshape(k.shape)
    xq = _fq(x.reshape(5, 6), aspec).reshape(x.shape)
    ref = jnp.einsum("bhd,hdo->bo", xq, wq) + layer.bias.get_value()
    np.testing.assert_allclose(_call(q, x), ref, rtol=1e-5, atol=1e-5)


def test_observer_updates_in_train_mode_and_is_read_in_eval_mode():
  lin = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  aspec = QuantSpec(bits=4, granularity="tensor", calibration="ema", ema_decay=0.5)
  q = jnnx.quantize_model(lin, Rule(".*", weight=None, act=aspec))
  x1, x2, x3 = _x((8, 4), 1), 3.0 * _x((8, 4), 2), 0.1 * _x((8, 4), 3)
  # Never updated: reading it in eval mode is an error naming the layer, eagerly and under
  # nnx.jit (where the count is traced: the flag set by q.eval() decides).
  q.eval()
  with pytest.raises(ValueError, match="layer '': its activation observer.*never updated"):
    q(x3)
  with pytest.raises(ValueError, match="never updated"):
    _call(q, x3)
  q.train()
  step = nnx.jit(lambda m, x: m(x))
  step(q, x1)
  step(q, x2)
  st = calibration.observer_init(aspec, (1, 1))
  for xb in (x1, x2):
    st = calibration.observer_update(st, xb, aspec, (0, 1))
  got = nnx.state(q, jnnx.QuantStats).to_pure_dict()["jaxq_act"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, st)
  scale, zp = calibration.observer_qparams(st, aspec)
  ref = _call(lin, _fq(x3, aspec, scale=scale, zero_point=zp))
  before = jax.tree.map(np.asarray, got)
  q.eval()
  np.testing.assert_allclose(step(q, x3), ref, rtol=1e-6, atol=1e-6)
  # Evaluation mode does not write the statistics; nnx.view switches modes too.
  jax.tree.map(np.testing.assert_array_equal,
               nnx.state(q, jnnx.QuantStats).to_pure_dict()["jaxq_act"], before)
  assert nnx.view(q, use_running_average=False).use_running_average is False


def test_stochastic_rounding_uses_the_jaxq_stream():
  lin = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
  spec = QuantSpec(bits=3, rounding="stochastic")
  x = _x((4, 16))
  nearest = jnnx.quantize_model(lin, Rule(".*", weight=spec))  # no stream: nearest
  np.testing.assert_array_equal(_call(nearest, x), _call(nearest, x))
  np.testing.assert_allclose(_call(nearest, x), x @ _fq(
      lin.kernel.get_value(), spec.replace(rounding="nearest")) + lin.bias.get_value(),
                             rtol=1e-6)
  q = jnnx.quantize_model(lin, Rule(".*", weight=spec), rngs=nnx.Rngs(jaxq=0))
  a, b = _call(q, x), _call(q, x)
  assert not np.allclose(a, b)
  # The stream is found inside the model when not given (here: held by a wrapper).
  class Holder(nnx.Module):
    def __init__(self):
      self.lin = nnx.clone(lin)
      self.rngs = nnx.Rngs(jaxq=1)

    def __call__(self, x):
      return self.lin(x)

  h = jnnx.quantize_model(Holder(), Rule("lin", weight=spec))
  assert not np.allclose(_call(h, x), _call(h, x))
  # Unbiased: the mean over many draws is much closer to the float result than one draw.
  draws = jnp.stack([_call(q, x) for _ in range(100)])
  ref = lin(x)
  err_one = float(jnp.mean(jnp.abs(draws[0] - ref)))
  err_mean = float(jnp.mean(jnp.abs(draws.mean(0) - ref)))
  assert err_mean < 0.3 * err_one, (err_mean, err_one)


def test_nnx_jit_grad_optimizer_lsq_pact():
  model = _new(Mixed)
  rules = [Rule("conv", weight=QuantSpec(bits=4, estimator="lsq"),
                act=QuantSpec(bits=4, granularity="tensor", estimator="lsq",
                              symmetric=False)),
           Rule(".*", weight=QuantSpec(bits=4, estimator="lsq", symmetric=False),
                act=QuantSpec(bits=4, signed=False, estimator="pact",
                              granularity="tensor"))]
  q = jnnx.quantize_model(model, rules)
  x = _x((2, 6, 6, 2))
  opt = nnx.Optimizer(q, optax.adam(1e-2), wrt=nnx.Param)
  assert not bool(q.conv.jaxq_act_initialized.get_value())

  @nnx.jit
  def step(m, opt, x):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(m)
    opt.update(m, grads)
    return loss, grads

  _, g0 = step(q, opt, x)
  # First training call initialises the activation steps from the data (LSQ+: min-max).
  assert bool(q.conv.jaxq_act_initialized.get_value())
  xmin, xmax = float(x.min()), float(x.max())
  init_scale = (xmax - xmin) / 15.0
  np.testing.assert_allclose(q.conv.jaxq_act_scale.get_value(), init_scale, rtol=2e-2)
  losses = [float(step(q, opt, x)[0]) for _ in range(20)]
  assert losses[-1] < losses[0]
  _, g = step(q, opt, x)
  for name in ("jaxq_weight_scale", "jaxq_weight_zero_point", "jaxq_act_alpha"):
    assert float(jnp.abs(g["layers"][0][name].get_value()).sum()) > 0, name
  assert float(jnp.abs(g["conv"]["jaxq_act_scale"].get_value()).sum()) > 0


# ---------------------------------------------------------------------------------------
# Training on scikit-learn digits
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _data():
  return load_digits_split()


def _fit(model, steps, lr, seed=0, batch_size=64):
  """Trains ``model`` in place: one jitted lax.scan over nnx.split state, with optax."""
  x, y, _, _ = _data()
  model.train()
  gdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(lr)

  def loss_fn(p, r, xb, yb):
    m = nnx.merge(gdef, p, r, copy=True)
    logits = m(xb)
    _, new_p, new_r = nnx.split(m, nnx.Param, ...)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), (new_p, new_r)

  @jax.jit
  def run(params, rest, key):
    def step(carry, k):
      p, r, o = carry
      idx = jax.random.choice(k, x.shape[0], (batch_size,), replace=False)
      (loss, (p_new, r)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, r, x[idx], y[idx])
      # p_new carries in-call writes (activation steps initialised on first use).
      upd, o = tx.update(g, o, p_new)
      return (optax.apply_updates(p_new, upd), r, o), loss

    (p, r, _), losses = jax.lax.scan(step, (params, rest, tx.init(params)),
                                     jax.random.split(key, steps))
    return p, r, losses

  p, r, losses = run(params, rest, jax.random.key(seed))
  nnx.update(model, p, r)
  return losses


def _accuracy(model):
  _, _, xt, yt = _data()
  model.eval()
  logits = nnx.jit(lambda m, x: m(x))(model, xt)
  model.train()
  return float(jnp.mean(jnp.argmax(logits, -1) == yt) * 100.0)


def _qat_rules(bits: int):
  """W{bits}A{bits}; first and last layers at 8 bits (LSQ paper convention)."""
  if bits == 8:
    return [Rule(".*", weight=W8, act=QuantSpec(granularity="tensor", calibration="ema"))]
  edge = Rule("embed|conv1|head", weight=W8, act=A8)
  low = Rule(".*", weight=QuantSpec(bits=bits, estimator="lsq"),
             act=QuantSpec(bits=bits, granularity="tensor", symmetric=False,
                           estimator="lsq"))
  return [edge, low]


@pytest.mark.parametrize("arch", ["vit", "cnn"])
def test_digits_qat_accuracy(arch):
  """Float training, then QAT fine-tuning from the float weights (W8A8, W4A4 + LSQ)."""
  make, steps = {"vit": (functools.partial(TinyViT, depth=1), 300),
                 "cnn": (TinyCNN, 200)}[arch]
  model = nnx.jit(lambda: make(rngs=nnx.Rngs(0)))()
  _fit(model, steps=steps, lr=4e-3)
  acc_float = _accuracy(model)
  assert acc_float > 90.0, acc_float
  accs = {}
  for bits, steps, lr in ((8, 40, 1e-3), (4, 150, 1e-3)):
    q = jnnx.quantize_model(model, _qat_rules(bits))
    _fit(q, steps=steps, lr=lr, seed=bits)
    accs[bits] = _accuracy(q)
  assert accs[8] >= acc_float - 1.0, (acc_float, accs)
  assert accs[4] >= acc_float - 3.0, (acc_float, accs)
