"""jaxq.act.linen.compressed_call: Linen methods under compressed_vjp via interceptors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxq import act
from jaxq.act.linen import compressed_call


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(16)(nn.gelu(nn.Dense(64)(x)))


class Model(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(16, name="inp")(x)
    x = x + Mlp(name="mlp")(nn.LayerNorm()(x))
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(3)(x)


def _interceptor(bits, seen, key=None):
  def interceptor(next_fun, args, kwargs, ctx):
    if isinstance(ctx.module, (Mlp, nn.Dense)) and ctx.method_name == "__call__":
      seen.append(ctx.module.path)
      return compressed_call(ctx.module, ctx.method_name, args, kwargs, bits=bits, key=key)
    return next_fun(*args, **kwargs)
  return interceptor


def _flat(t):
  return jnp.concatenate([jnp.ravel(l) for l in jax.tree_util.tree_leaves(t)])


def test_compressed_call_init_apply_grads_and_batch_stats():
  m = Model()
  x = jax.random.normal(jax.random.key(0), (8, 16))
  seen = []
  with nn.intercept_methods(_interceptor(8, seen)):
    v = m.init(jax.random.key(1), x)
  v0 = m.init(jax.random.key(1), x)
  chex_equal = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), v, v0)
  assert all(jax.tree_util.tree_leaves(chex_equal))       # same params as without
  assert ("mlp", "Dense_0") in seen and ("inp",) in seen  # paths kept inside regions

  def loss(p, bits=None, train=False, key=None):
    variables = {"params": p, "batch_stats": v["batch_stats"]}
    mut = ["batch_stats"] if train else False
    if bits is None:
      out = m.apply(variables, x, train=train, mutable=mut)
    else:
      with nn.intercept_methods(_interceptor(bits, [], key)):
        out = m.apply(variables, x, train=train, mutable=mut)
    if train:
      out, st = out
      return jnp.sum(out**2), st
    return jnp.sum(out**2), {}

  (l0, _), g0 = jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])
  (l8, _), g8 = jax.jit(jax.value_and_grad(lambda p: loss(p, 8), has_aux=True))(v["params"])
  np.testing.assert_array_equal(l8, l0)
  e, c = _flat(g0), _flat(g8)
  assert float(jnp.linalg.norm(e - c) / jnp.linalg.norm(e)) < 0.02
  # training mode: batch_stats updated through the compressed regions as without them
  (lt, st), gt = jax.jit(jax.value_and_grad(
      lambda p: loss(p, 4, True, jax.random.key(3)), has_aux=True))(v["params"])
  (lt0, st0), _ = jax.jit(jax.value_and_grad(lambda p: loss(p, None, True),
                                             has_aux=True))(v["params"])
  np.testing.assert_array_equal(lt, lt0)
  for a, b in zip(jax.tree_util.tree_leaves(st), jax.tree_util.tree_leaves(st0)):
    np.testing.assert_array_equal(a, b)
  e, c = _flat(_ := jax.jit(jax.grad(lambda p: loss(p, None, True)[0]))(v["params"])), _flat(gt)
  assert float(e @ c / jnp.linalg.norm(e) / jnp.linalg.norm(c)) > 0.95


def test_calc_precision_greedy_budget():
  bits = act.calc_precision([1.0, 100.0, 10.0, 0.1], [10, 10, 10, 10], 2)
  assert (bits * 10).sum() <= 2 * 40 and bits[1] == bits.max() and bits[3] == bits.min()
  np.testing.assert_array_equal(act.calc_precision([1, 1], [1, 1], 8), [8, 8])
  np.testing.assert_array_equal(act.calc_precision([1, 1], [1, 1], 1), [1, 1])
  import pytest  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="avg_bits"):
    act.calc_precision([1.0], [1], 0.5)
  with pytest.raises(ValueError, match="choices"):
    act.calc_precision([1.0], [1], 2, choices=(3,))


def test_probe_gives_sensitivity_and_adaptive_bits():
  k = jax.random.split(jax.random.key(0), 3)
  w = jax.random.normal(k[0], (32, 16))
  x = jax.random.normal(k[1], (64, 32))
  ct = jax.random.normal(k[2], (64, 16))
  layer = act.compressed_vjp(lambda w, h: h @ w, bits=4, group_size=32, compress_args=(1,))
  _, vjp = jax.vjp(lambda pr: layer(w, x, probe=pr), jnp.zeros(3))
  (pg,) = vjp(ct)
  span = x.max(axis=1) - x.min(axis=1)  # one group of 32 per row
  np.testing.assert_allclose(pg, [float(jnp.sum(32 * span**2)), x.size,
                                  float(jnp.sum(ct**2)) / 64], rtol=1e-4)
  ab = act.AdaptiveBits(["a", "b"], avg_bits=2.5, interval=10)
  bits = ab.update({"a": pg * jnp.array([100.0, 1, 1]), "b": pg})
  assert ab.sensitivity["a"] > ab.sensitivity["b"] and bits["a"] > bits["b"]
  assert (bits["a"] + bits["b"]) / 2 <= 2.5 and bits == {"a": 4, "b": 1}
  assert ab.due(0) and ab.due(10) and not ab.due(3)


def test_sensitivity_from_gradients_and_update_sensitivity():
  """Empirical C (GACT): numpy reference; C from 1-bit and 2-bit agree for a linear layer
  (the ``C / (2^b - 1)^2`` model); ``update_sensitivity`` allocates under the budget."""
  sensitivity_from_gradients = act.sensitivity_from_gradients
  import pytest  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  ref = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=(3,))}
  g = {"w": ref["w"] + rng.normal(size=(5, 4, 3)), "b": ref["b"] + rng.normal(size=(5, 3))}
  want = 9 * np.mean([np.sum((g["w"][k] - ref["w"])**2) + np.sum((g["b"][k] - ref["b"])**2)
                      for k in range(5)])
  np.testing.assert_allclose(sensitivity_from_gradients(g, ref, 2), want, rtol=1e-5)
  with pytest.raises(ValueError, match="leading sample"):
    sensitivity_from_gradients(ref, ref, 2)

  k = jax.random.split(jax.random.key(1), 3)
  w, x = jax.random.normal(k[0], (32, 16)), jax.random.normal(k[1], (64, 32))
  ct = jax.random.normal(k[2], (64, 16))
  exact = x.T @ ct
  c = {}
  for b in (1, 2):
    layer = act.compressed_vjp(lambda w, h: h @ w, bits=b, group_size=32, compress_args=(1,))
    dw = jax.vmap(lambda key, layer=layer: jax.vjp(
        lambda w: layer(w, x, key=key), w)[1](ct)[0])(jax.random.split(k[0], 64))
    c[b] = float(sensitivity_from_gradients(dw, exact, b))
  assert 0.3 < c[1] / c[2] < 3.0, c

  ab = act.AdaptiveBits(["a", "b", "c"], avg_bits=2)
  bits = ab.update_sensitivity({"a": 100.0, "b": 1.0, "c": 1.0}, {"a": 1, "b": 1, "c": 1})
  assert bits == {"a": 4, "b": 1, "c": 1}
  with pytest.raises(ValueError, match="sizes lacks"):
    ab.update_sensitivity({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 1})
  with pytest.raises(ValueError, match="finite"):
    ab.update_sensitivity({"a": np.nan, "b": 1.0, "c": 1.0}, {"a": 1, "b": 1, "c": 1})
