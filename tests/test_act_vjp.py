"""compressed_vjp (ActNN residual compression): exact forward, close/unbiased gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _models import TinyViT
from jaxq import act
from jaxq import numerics
from jaxq.act import pack
from jaxq.flax.linen import quantize_model
from jaxq.spec import Rule


def xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.lru_cache(maxsize=None)
def vit_setup(batch=16):
  model = TinyViT()
  kx, kp = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (batch, 8, 8, 1))
  y = jnp.arange(batch, dtype=jnp.int32) % 10
  params = model.init(kp, x)["params"]
  return model, params, x, y


def vit_loss_fn(model, bits=None):
  """Loss with the whole model under compressed_vjp (input x compressed too)."""
  def f(params, x):
    return model.apply({"params": params}, x)

  fc = f if bits is None else act.compressed_vjp(f, bits=bits, compress_args=(1,))

  def loss(params, x, y, key=None):
    logits = fc(params, x) if bits is None else fc(params, x, key=key)
    return xent(logits, y)
  return loss


def flat(tree):
  return jnp.concatenate([jnp.ravel(l) for l in jax.tree_util.tree_leaves(tree)])


def cosine(a, b):
  a, b = flat(a), flat(b)
  return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def rel_err(a, b):
  a, b = flat(a), flat(b)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@functools.lru_cache(maxsize=None)
def vit_grad(bits):
  model, *_ = vit_setup()
  return jax.jit(jax.value_and_grad(vit_loss_fn(model, bits)))


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bits", [0, 3, 16, 2.0, True, "2"])
def test_bad_bits_raise(bits):
  with pytest.raises(ValueError, match="bits"):
    act.compressed_vjp(jnp.sin, bits=bits)


def test_bad_group_size_raises():
  with pytest.raises(ValueError, match="group_size"):
    act.compressed_vjp(jnp.sin, bits=2, group_size=6)
  with pytest.raises(ValueError, match="group_size"):
    act.compressed_vjp(jnp.sin, bits=1, group_size=0)
  with pytest.raises(ValueError, match="compress_args"):
    act.compressed_vjp(jnp.sin, compress_args=(-1,))
  g = act.compressed_vjp(jnp.sin, compress_args=(3,))
  with pytest.raises(ValueError, match="compress_args"):
    g(jnp.ones(4))


# ----------------------------------------------------------------------------- noise, pack
def test_hash_uniform_moments_and_independence():
  u = numerics.hash_uniform(jnp.uint32(7), (1 << 20,))
  assert u.dtype == jnp.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
  np.testing.assert_allclose(float(u.mean()), 0.5, atol=2e-3)
  np.testing.assert_allclose(float(u.var()), 1 / 12, atol=1e-3)
  hist = np.histogram(np.asarray(u), bins=16, range=(0, 1))[0] / u.size
  np.testing.assert_allclose(hist, 1 / 16, atol=2e-3)
  v = numerics.hash_uniform(jnp.uint32(8), (1 << 20,))
  assert abs(float(jnp.corrcoef(u, v)[0, 1])) < 5e-3          # different seeds
  assert abs(float(jnp.corrcoef(u[:-1], u[1:])[0, 1])) < 5e-3  # neighbours


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shape,dtype", [((37, 5), jnp.float32), ((4, 64), jnp.bfloat16),
                                         ((3, 7, 11), jnp.float16)])
def test_compress_roundtrip(bits, shape, dtype):
  x = jax.random.normal(jax.random.key(1), shape).astype(dtype)
  c = act.compress(x, bits, group_size=32)
  x_hat = act.decompress(c)
  assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
  x64, xh64 = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
  # per-group error <= half a step (nearest); steps come from the group's range
  span = float(x64.max() - x64.min())
  eps = float(jnp.finfo(dtype).eps) * np.abs(x64).max() * 2
  assert np.abs(xh64 - x64).max() <= 0.5 * span / (2**bits - 1) + eps + 1e-6
  s = pack.layout(shape, 32, bits)[2]
  assert s <= 32 and c.packed.dtype == jnp.uint8 and c.packed.shape[1] == s * bits // 8


def test_compress_constant_and_keeps_leading_axis():
  x = jnp.full((8, 512), 3.25)
  np.testing.assert_array_equal(act.decompress(act.compress(x, 2)), x)
  c = act.compress(jnp.ones((8, 512)), 2, group_size=256)
  assert c.rows == 8 and c.packed.shape == (16, 64)


def test_stochastic_compress_is_unbiased():
  x = jax.random.normal(jax.random.key(2), (4, 256))
  seeds = jnp.arange(2000, dtype=jnp.uint32)
  dec = jax.jit(jax.vmap(lambda s: act.decompress(act.compress(x, 2, 256, seed=s))))(seeds)
  step = (x.max(axis=1) - x.min(axis=1))[:, None] / 3
  err_one = jnp.abs(dec[0] - x) / step
  err_mean = jnp.abs(dec.mean(0) - x) / step
  # std of the mean <= 0.5 / sqrt(2000) ~ 0.011 steps; nearest rounding would be ~0.25
  assert float(err_mean.max()) < 0.06 and float(err_one.mean()) > 0.15


# ----------------------------------------------------------------------------- compressed_vjp
def _mlp(w1, w2, x):
  return jnp.sum(jnp.sin(x @ w1 @ w2))


def _mlp_args():
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  return (jax.random.normal(k1, (32, 64)) / 6, jax.random.normal(k2, (64, 16)) / 8,
          jax.random.normal(k3, (64, 32)))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_forward_bitwise_identical(bits):
  args = _mlp_args()
  g = act.compressed_vjp(_mlp, bits, group_size=32, compress_args=(2,))
  np.testing.assert_array_equal(g(*args), _mlp(*args))
  np.testing.assert_array_equal(g(*args, key=jax.random.key(0)), _mlp(*args))
  # the forward that runs under differentiation (jax.vjp inside the custom_vjp rule)
  v, _ = jax.jit(jax.value_and_grad(lambda *a: g(*a, key=jax.random.key(0))))(*args)
  v0, _ = jax.jit(jax.value_and_grad(_mlp))(*args)
  np.testing.assert_array_equal(v, v0)


def test_vit_forward_exact_gradients_8bit_close_4bit_cosine():
  model, params, x, y = vit_setup()
  np.testing.assert_array_equal(
      jax.jit(vit_loss_fn(model, 2))(params, x, y, jax.random.key(1)),
      jax.jit(vit_loss_fn(model))(params, x, y))
  v, exact = vit_grad(None)(params, x, y)
  v8, g8 = vit_grad(8)(params, x, y)
  assert rel_err(g8, exact) < 0.02
  v4, g4 = vit_grad(4)(params, x, y, jax.random.key(5))
  assert cosine(g4, exact) > 0.95
  for vb in (v8, v4):  # forward bitwise identical under jit(value_and_grad)
    np.testing.assert_array_equal(vb, v)


def test_gradient_is_unbiased_over_keys():
  """Mean over keys of stochastically-compressed gradients converges to the exact one."""
  args = _mlp_args()
  exact = jax.jit(jax.grad(_mlp, argnums=(0, 1, 2)))(*args)
  g = act.compressed_vjp(_mlp, bits=2, group_size=64, compress_args=(2,))
  grad = jax.jit(jax.vmap(jax.grad(lambda a, b, c, k: g(a, b, c, key=k), argnums=(0, 1, 2)),
                          in_axes=(None, None, None, 0)))
  keys = jax.random.split(jax.random.key(7), 1024)
  gs = grad(*args, keys)
  one = [jax.tree_util.tree_map(lambda t: t[i], gs) for i in range(4)]
  err_one = np.mean([rel_err(o, exact) for o in one])
  mean = jax.tree_util.tree_map(lambda t: t.mean(0), gs)
  err_mean = rel_err(mean, exact)
  # unbiased: error of the mean ~ err_one / sqrt(1024) = err_one / 32
  assert err_mean < err_one / 12, (err_mean, err_one)
  # round-to-nearest is deterministic: its error does not average away
  err_nearest = rel_err(jax.jit(jax.grad(g, argnums=(0, 1, 2)))(*args), exact)
  assert err_nearest > 2 * err_mean


def test_weights_and_plain_args_kept_exact():
  """Arguments (and casts of them) are saved as they are; compress_args are compressed."""
  w = jax.random.normal(jax.random.key(0), (64, 64))
  x = jax.random.normal(jax.random.key(1), (32, 64))
  ct = jax.random.normal(jax.random.key(2), (32, 64)).astype(jnp.bfloat16)

  def dense(w, x):  # the bf16 copies of w and x are residuals computed inside fn
    return x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)

  exact = jax.vjp(dense, w, x)[1](ct)
  g = act.compressed_vjp(dense, bits=1)
  got = jax.vjp(lambda w, x: g(w, x), w, x)[1](ct)
  for a, b in zip(got, exact):  # nothing compressed: bitwise exact
    np.testing.assert_array_equal(a, b)
  assert act.residual_nbytes(g, w, x) == 0
  gx = act.compressed_vjp(dense, bits=1, compress_args=(1,))
  dw, dx = jax.vjp(lambda w, x: gx(w, x), w, x)[1](ct)
  np.testing.assert_array_equal(dx, exact[1])  # uses the (kept) weight
  assert rel_err(dw, exact[0]) > 0.1           # uses the 1-bit x
  # 1-bit codes plus one (lo, scale) per row of 64
  assert act.residual_nbytes(gx, w, x) == x.size // 8 + 8 * x.shape[0]

  def two_layer(w, x):
    return jnp.sum(jnp.sin(x @ w) ** 2)

  assert act.residual_nbytes(act.compressed_vjp(two_layer, bits=2), w, x) < (
      act.residual_nbytes(two_layer, w, x) / 8)


def test_bf16_residuals_pytree_args_and_int_leaves():
  def f(p, batch):
    h = jnp.tanh(batch["x"].astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16))
    logits = (h @ p["v"].astype(jnp.bfloat16)).astype(jnp.float32)
    return xent(logits, batch["y"])

  k = jax.random.split(jax.random.key(4), 3)
  p = {"w": jax.random.normal(k[0], (32, 64)) / 6, "v": jax.random.normal(k[1], (64, 10)) / 8}
  batch = {"x": jax.random.normal(k[2], (64, 32)), "y": jnp.arange(64, dtype=jnp.int32) % 10}
  g = act.compressed_vjp(f, bits=8, compress_args=(1,))
  v0, exact = jax.jit(jax.value_and_grad(f))(p, batch)
  grad = jax.value_and_grad(lambda p, b, k: g(p, b, key=k))
  v, got = jax.jit(grad)(p, batch, jax.random.key(0))
  np.testing.assert_array_equal(v, v0)
  assert jax.tree_util.tree_map(lambda a: a.dtype, got) == jax.tree_util.tree_map(
      lambda a: a.dtype, exact)
  assert cosine(got, exact) > 0.99
  # the bf16 residual (tanh output) comes back as bf16 in the backward pass
  jaxpr = str(jax.make_jaxpr(grad)(p, batch, jax.random.key(0)))
  assert "bf16[64,64]" in jaxpr and "u8[" in jaxpr


def test_vmap_and_remat_and_policy():
  args = _mlp_args()
  g = act.compressed_vjp(_mlp, bits=4, group_size=32, compress_args=(2,))
  key = jax.random.key(3)
  base = jax.jit(jax.grad(lambda a, b, c: g(a, b, c, key=key), argnums=(0, 1)))(*args)
  for pol in (None, act.policy):
    rem = jax.checkpoint(lambda a, b, c: g(a, b, c, key=key), policy=pol)
    got = jax.jit(jax.grad(rem, argnums=(0, 1)))(*args)
    for a, b in zip(got, base):  # same codes; fusion may reassociate float sums
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
  # vmap over examples of a compressed per-example function
  per_ex = jax.jit(jax.vmap(jax.grad(lambda x, w1, w2: g(w1, w2, x[None]), argnums=0),
                            in_axes=(0, None, None)))(args[2], args[0], args[1])
  exact = jax.jit(jax.vmap(jax.grad(lambda x, w1, w2: _mlp(w1, w2, x[None])),
                           in_axes=(0, None, None)))(args[2], args[0], args[1])
  assert per_ex.shape == exact.shape and cosine(per_ex, exact) > 0.98


def test_policy_saves_only_compressed_residuals():
  """Under jax.checkpoint(policy=act.policy) exactly compressed_vjp's residuals are saved
  (the packed codes and what it keeps), so nothing of the compressed region recomputes."""
  model, params, x, y = vit_setup()
  loss = vit_loss_fn(model, 2)
  n_comp = act.residual_nbytes(loss, params, x, y)
  n_pol = act.residual_nbytes(jax.checkpoint(loss, policy=act.policy), params, x, y)
  # the same, less the loss's own residuals (outside the compressed region: recomputed)
  n_xent = act.residual_nbytes(xent, jnp.zeros((x.shape[0], 10)), y)
  assert n_pol == n_comp - n_xent
  # full remat saves nothing but the inputs; plain compression saves the codes
  assert act.residual_nbytes(jax.checkpoint(loss), params, x, y) < n_comp
  # per-block: blocks under compressed_vjp and jax.checkpoint(policy) inside one model
  g = act.compressed_vjp(_mlp, bits=4, group_size=32, compress_args=(2,))
  outer = lambda w1, w2, x: _mlp(w1, w2, jnp.tanh(x)) + g(w1, w2, jnp.cos(x))  # noqa: E731
  args = _mlp_args()
  n_plain = act.residual_nbytes(outer, *args)
  n_pol = act.residual_nbytes(jax.checkpoint(outer, policy=act.policy), *args)
  assert n_pol < n_plain / 4


# dim 32: each token's row is its own group, so (lo, scale) cost 2 bits per element here
@pytest.mark.parametrize("bits,ratio", [(8, 3), (4, 4.5), (2, 6.5)])
def test_vit_residual_bytes_shrink(bits, ratio):
  model, params, x, y = vit_setup()
  n_float = act.residual_nbytes(vit_loss_fn(model), params, x, y)
  n_comp = act.residual_nbytes(vit_loss_fn(model, bits), params, x, y)
  assert n_float / n_comp >= ratio, (n_float, n_comp)


def test_eager_grad_matches_jit_and_keeps_weights():
  """A plain eager ``jax.grad`` compresses the same residuals as the jitted one, never a
  weight (nor a transposed/cast copy of one), and gives the same gradient."""
  model = TinyViT(dim=32, depth=1)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  y = jnp.arange(3) % 10
  params = model.init(jax.random.key(1), x)["params"]
  qm = quantize_model(model, [Rule(path=r"block_\d+", weight=None, act=None,
                                   act_compress=2)])
  loss = lambda p: xent(qm.apply({"params": p}, x), y)  # noqa: E731
  log, real = [], pack.compress

  def spy(v, *a, **k):
    log.append((tuple(v.shape), jnp.dtype(v.dtype).name))
    return real(v, *a, **k)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pack, "compress", spy)
    g_eager = jax.grad(loss)(params)
    eager_log, log[:] = list(log), []
    g_jit = jax.jit(jax.grad(loss))(params)
    jit_log = list(log)
  assert eager_log and eager_log == jit_log
  # Every weight shape, as stored and transposed: none of them is compressed.
  weight_shapes = set()
  for w in jax.tree_util.tree_leaves(params["block_0"]):
    weight_shapes |= {tuple(w.shape), tuple(w.shape[::-1]), (w.size,)}
  assert not weight_shapes & {s for s, _ in eager_log}, eager_log
  for a, b in zip(jax.tree_util.tree_leaves(g_eager), jax.tree_util.tree_leaves(g_jit)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # With nearest rounding the residuals are the same: compare against exact gradients.
  g_exact = jax.grad(lambda p: xent(model.apply({"params": p}, x), y))(params)
  num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(
      jax.tree_util.tree_leaves(g_eager), jax.tree_util.tree_leaves(g_exact)))
  den = sum(float(jnp.sum(b ** 2)) for b in jax.tree_util.tree_leaves(g_exact))
  assert num < 0.5 * den, (num, den)
