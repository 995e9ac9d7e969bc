"""Per-sample (SampleBits) and per-residual bit widths of jaxq.act.compressed_vjp."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxq import act
from jaxq.act.samples import compress_samples, decompress_samples
from jaxq.act.linen import compressed_call

SB = act.SampleBits({4: 0.25, 2: 0.25, 1: 0.5})  # an average of 2 bits


def _flat(tree):
  return jnp.concatenate([jnp.ravel(l) for l in jax.tree_util.tree_leaves(tree)])


def _rel(a, b):
  a, b = _flat(a), _flat(b)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _mlp(w1, w2, x):
  return jnp.sum(jnp.sin(x @ w1 @ w2))


@functools.lru_cache(maxsize=None)
def _mlp_args():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(3), 4)
  scale = jnp.exp(jax.random.normal(k4, (64, 1)))  # samples of different ranges
  return (jax.random.normal(k1, (32, 64)) / 6, jax.random.normal(k2, (64, 16)) / 8,
          jax.random.normal(k3, (64, 32)) * scale)


# ----------------------------------------------------------------------------- SampleBits
def test_sample_bits_counts_budget_and_validation():
  assert SB.fractions == ((4, 0.25), (2, 0.25), (1, 0.5)) and SB.avg_bits == 2.0
  assert SB.fallback == 2 and SB.widths == (1, 2, 4)
  for batch in range(1, 70):
    counts = SB.counts(batch)
    assert sum(n for _, n in counts) == batch
    assert sum(b * n for b, n in counts) <= 2 * batch
  assert SB.counts(64) == ((4, 16), (2, 16), (1, 32))
  assert hash(SB) == hash(act.SampleBits([(1, 0.5), (2, 0.25), (4, 0.25)]))
  for bad in ({3: 1.0}, {2: 0.5}, {2: 1.5, 1: -0.5}, {}, "x"):
    with pytest.raises(ValueError, match="fractions"):
      act.SampleBits(bad)
  with pytest.raises(ValueError, match="fallback"):
    act.SampleBits({2: 1.0}, fallback=3)
  with pytest.raises(ValueError, match="batch_size"):
    act.SampleBits({2: 1.0}, batch_size=0)
  # from a measured profile: calc_precision's widths, as fractions
  sb = act.SampleBits.from_sensitivity([100.0, 100.0, 1.0, 1.0], 2.5, choices=(1, 2, 4))
  assert dict(sb.fractions) == {4: 0.5, 1: 0.5} and sb.avg_bits <= 2.5
  # gradient estimates of a training set: alike -> one width; mostly fitted -> mixed;
  # with batch_size, whole samples of the batch (nearby profiles give equal SampleBits)
  assert act.SampleBits.from_sensitivity(np.ones(100), 2).fractions == ((2, 1.0),)
  g = np.geomspace(1e-9, 1.0, 1000)
  sb = act.SampleBits.from_sensitivity(g, 2, choices=(1, 2, 4), batch_size=64)
  assert len(sb.fractions) == 3 and sb.avg_bits <= 2 and sb.batch_size == 64
  assert sb.avg_bits < 2 and sb.fallback == 2  # the budget's width, not the average's
  assert all(abs(f * 64 - round(f * 64)) < 1e-9 for _, f in sb.fractions)
  assert act.SampleBits.from_sensitivity(g * (1 + 1e-3 * np.sin(g)), 2, choices=(1, 2, 4),
                                         batch_size=64) == sb


def test_sample_sensitivity_reference():
  x = np.random.default_rng(0).normal(size=(3, 5, 7)).astype(np.float32)
  x[1, 0, 0] = np.nan
  got = act.sample_sensitivity(jnp.asarray(x), group_size=16)
  want = []
  for n in range(3):  # rows of 7 < 16 merge into one row of 35: 3 groups of 12
    row = x[n].reshape(-1)
    row = np.concatenate([row, np.full(-row.size % 12, row[-1])]).reshape(-1, 12)
    r = np.nanmax(row, 1) - np.nanmin(row, 1)
    want.append(12 * np.sum(r.astype(np.float64) ** 2))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_compress_samples_ranks_and_roundtrips():
  x = jax.random.normal(jax.random.key(0), (16, 8, 32)) * jnp.arange(1, 17.0)[:, None, None]
  counts = ((4, 4), (2, 4), (1, 8))
  c = jax.jit(lambda x: compress_samples(x, counts, 64))(x)
  # the 4 widest-range samples (12..15) at 4 bits, the next 4 at 2, the rest at 1
  np.testing.assert_array_equal(np.sort(np.asarray(c.perm[:4])), [12, 13, 14, 15])
  np.testing.assert_array_equal(np.sort(np.asarray(c.perm[4:8])), [8, 9, 10, 11])
  assert [p.bits for p in c.parts] == [4, 2, 1] and c.perm.dtype == jnp.uint8
  y = decompress_samples(c)
  assert y.shape == x.shape and y.dtype == x.dtype
  width = {int(s): b for (b, n), ids in zip(counts, np.split(np.asarray(c.perm), [4, 8]))
           for s in ids}
  for s in range(16):  # nearest rounding: <= half a step of the sample's width
    span = float(x[s].max() - x[s].min())
    assert float(jnp.abs(y[s] - x[s]).max()) <= 0.5 * span / (2**width[s] - 1) + 1e-4
  with pytest.raises(ValueError, match="add up"):
    compress_samples(x, ((2, 3),), 64)
  xb = x.astype(jnp.bfloat16)  # dtype kept; stochastic rounding: within one step
  yb = decompress_samples(compress_samples(xb, counts, 64, jnp.uint32(5)))
  assert yb.dtype == jnp.bfloat16 and yb.shape == x.shape
  for s in range(16):
    span = float(x[s].max() - x[s].min())
    err = float(jnp.abs(yb[s].astype(jnp.float32) - xb[s].astype(jnp.float32)).max())
    assert err <= span / (2**width[s] - 1) * 1.02 + 0.1


def test_compress_samples_ranks_by_weighted_sensitivity():
  x = jnp.linspace(-1.0, 1.0, 64) * jnp.arange(1, 9.0)[:, None]  # R_n ~ (n + 1)^2
  counts = ((4, 2), (1, 6))
  # weights falling faster than the ranges rise: the order reverses
  c = compress_samples(x, counts, 32, weight=jnp.arange(1, 9.0) ** -4)
  np.testing.assert_array_equal(np.asarray(c.perm), np.arange(8))
  c = compress_samples(x, counts, 32, weight=jnp.ones(8))  # equal weights: by range
  np.testing.assert_array_equal(np.asarray(c.perm), np.arange(8)[::-1])


def test_output_grad_sqnorm_reference():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(6, 10)) * 3, jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 6))
  g = act.output_grad_sqnorm(optax.softmax_cross_entropy_with_integer_labels, z, y)
  e = np.exp(np.asarray(z, np.float64))
  want = np.sum((e / e.sum(1, keepdims=True) - np.eye(10)[np.asarray(y)]) ** 2, axis=1)
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
  # pytree outputs, bf16: every leaf's rows add up
  out = {"a": z.astype(jnp.bfloat16), "b": jnp.ones((6, 2, 3))}
  g2 = act.output_grad_sqnorm(lambda o: jnp.sum(o["a"].astype(jnp.float32) ** 2, 1)
                              + 0.5 * jnp.sum(o["b"], (1, 2)), out)
  want2 = np.sum(4 * np.asarray(out["a"], np.float64) ** 2, 1) + 6 * 0.25
  assert g2.dtype == jnp.float32
  np.testing.assert_allclose(g2, want2, rtol=2e-2)


def _dense(w, x):
  return x @ w


def _dense_chain(bits):
  """Three Dense layers, each its own compressed region (ActNN's per-layer setting: the
  compressed residual, the layer input, feeds only ``dW``)."""
  layer = _dense if bits is None else act.compressed_vjp(_dense, bits, 32, compress_args=(1,))

  def f(ws, x, key, weight):
    for i, w in enumerate(ws):
      kw = {} if bits is None else dict(key=jax.random.fold_in(key, i), sample_weight=weight)
      x = layer(w, x, **kw)
      if i < len(ws) - 1:
        x = jnp.tanh(x)
    return x

  return f


def test_sample_weight_cuts_gradient_error_where_few_samples_carry_the_gradient():
  """Per-sample losses spanning orders of magnitude (late training: most samples fitted).
  Ranked by G_n R_n, {4: 1/4, 2: 1/4, 1: 1/2} (an average of 2 bits) matches uniform 4-bit;
  ranked by the range alone it is worse than uniform 2-bit."""
  k = jax.random.split(jax.random.key(0), 5)
  ws = [jax.random.normal(k[i], (32, 32)) / np.sqrt(32) for i in range(3)]
  x = jax.random.normal(k[3], (64, 32))
  c = jnp.exp(3 * jax.random.normal(k[4], (64,)))
  per_sample = lambda out: c * jnp.sum(out ** 2, axis=1)  # noqa: E731
  weight = act.output_grad_sqnorm(per_sample, _dense_chain(None)(ws, x, None, None))
  keys = jax.random.split(jax.random.key(1), 16)

  def loss_fn(bits, w=None):
    return lambda ws, key: jnp.sum(per_sample(_dense_chain(bits)(ws, x, key, w)))

  ref = _flat(jax.grad(loss_fn(None))(ws, None))

  def error(bits, w=None):
    loss = loss_fn(bits, w)
    gs = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(ws, keys)
    return np.mean([float(jnp.linalg.norm(_flat(jax.tree_util.tree_map(lambda t: t[i], gs))
                                          - ref) / jnp.linalg.norm(ref)) for i in range(16)])

  u2, u4, ranked, weighted = error(2), error(4), error(SB), error(SB, weight)
  assert weighted < u2 / 3 and weighted < ranked / 3 and weighted < 1.5 * u4, (
      u2, u4, ranked, weighted)
  with pytest.raises(ValueError, match="sample_weight"):
    act.compressed_vjp(_dense, 2, 32, (1,))(ws[0], x, sample_weight=weight)
  with pytest.raises(ValueError, match=r"sample_weight must be a float array of shape \(64,\)"):
    act.compressed_vjp(_dense, SB, 32, (1,))(ws[0], x, sample_weight=weight[:8])
  with pytest.raises(ValueError, match="sample_weight needs the batch size"):
    act.compressed_vjp(_dense, SB, 32)(ws[0], x, sample_weight=weight)


# ----------------------------------------------------------------------------- compressed_vjp
@pytest.mark.parametrize("weighted", [False, True])
def test_sample_bits_forward_exact_and_gradient_unbiased(weighted):
  args = _mlp_args()
  weight = jnp.linspace(0.0, 1.0, 64) ** 3 if weighted else None
  g = functools.partial(act.compressed_vjp(_mlp, bits=SB, group_size=32, compress_args=(2,)),
                        sample_weight=weight)
  np.testing.assert_array_equal(g(*args, key=jax.random.key(0)), _mlp(*args))
  v, _ = jax.jit(jax.value_and_grad(lambda *a: g(*a, key=jax.random.key(0))))(*args)
  np.testing.assert_array_equal(v, jax.jit(_mlp)(*args))
  exact = jax.jit(jax.grad(_mlp, argnums=(0, 1, 2)))(*args)
  grad = jax.jit(jax.vmap(jax.grad(lambda a, b, c, k: g(a, b, c, key=k), argnums=(0, 1, 2)),
                          in_axes=(None, None, None, 0)))
  gs = grad(*args, jax.random.split(jax.random.key(7), 1024))
  err_one = np.mean([_rel(jax.tree_util.tree_map(lambda t, i=i: t[i], gs), exact)
                     for i in range(4)])
  err_mean = _rel(jax.tree_util.tree_map(lambda t: t.mean(0), gs), exact)
  assert err_mean < err_one / 12, (err_mean, err_one)  # ~ err_one / sqrt(1024)


def test_sample_bits_bytes_within_budget():
  args = _mlp_args()
  n2 = act.residual_nbytes(act.compressed_vjp(_mlp, 2, 32, (2,)), *args)
  g = act.compressed_vjp(_mlp, SB, 32, (2,))
  ns = act.residual_nbytes(g, *args)
  # codes: sum_b n_b b <= 2 B per element; per-group lo/scale as uniform; + uint8 perm
  res = act.compressed_residuals(_mlp, *args, group_size=32, compress_args=(2,))
  perms = sum(r.shape[0] for r in res)
  assert ns <= n2 + perms, (ns, n2, perms)
  # per-sample storage really is mixed-width: some residual holds 4-, 2- and 1-bit parts
  _, res_tree = jax.vjp(lambda *a: g(*a, key=jax.random.key(0)), *args)
  leaves = jax.tree_util.tree_leaves(res_tree)
  assert {1, 2, 4} <= {int(l.shape[-1]) * 8 // 32 for l in leaves
                        if l.dtype == jnp.uint8 and l.ndim == 2}


def test_sample_bits_fallback_and_remat():
  """Residuals without the batch axis use the fallback width; jax.checkpoint(policy)."""
  args = _mlp_args()
  g = act.compressed_vjp(_mlp, SB, 32, (2,))
  key = jax.random.key(3)
  base = jax.jit(jax.grad(lambda a, b, c: g(a, b, c, key=key), argnums=(0, 1)))(*args)
  rem = jax.checkpoint(lambda a, b, c: g(a, b, c, key=key), policy=act.policy)
  got = jax.jit(jax.grad(rem, argnums=(0, 1)))(*args)
  for a, b in zip(got, base):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
  # batch_size that matches nothing: every residual per tensor at the fallback (2 bits),
  # the same codes and seeds as bits=2
  g2 = act.compressed_vjp(_mlp, 2, 32, (2,))
  gf = act.compressed_vjp(_mlp, act.SampleBits({4: 0.5, 1: 0.5}, fallback=2,
                                               batch_size=999), 32, (2,))
  a = jax.jit(jax.grad(lambda a, b, c: g2(a, b, c, key=key)))(*args)
  b = jax.jit(jax.grad(lambda a, b, c: gf(a, b, c, key=key)))(*args)
  np.testing.assert_array_equal(a, b)


def test_per_sample_widths_only_for_weight_only_residuals():
  """``x`` feeds only ``dW1``; ``tanh(x w1)`` (read by ``dW2`` and by the tanh derivative)
  and the derivative factor scale the cotangent passed down: those stay per tensor."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  w1, w2 = jax.random.normal(k1, (32, 16)), jax.random.normal(k2, (16, 8))
  x = jax.random.normal(k3, (64, 32))
  fn = lambda w1, w2, x: jnp.sum(jnp.tanh(x @ w1) @ w2)  # noqa: E731
  res = act.compressed_residuals(fn, w1, w2, x, group_size=16, compress_args=(2,))
  assert [r.weight_only for r in res] == [True, False, False], res
  # x as a weight (not in compress_args): its cotangent is a weight gradient too
  assert [r.weight_only for r in act.compressed_residuals(fn, w1, w2, x, group_size=16)
          ] == [True, True]
  g = act.compressed_vjp(fn, SB, 16, compress_args=(2,))
  _, res_tree = jax.vjp(lambda *a: g(*a, key=jax.random.key(1)), w1, w2, x)
  perms = [l for l in jax.tree_util.tree_leaves(res_tree)
           if l.dtype == jnp.uint8 and l.shape == (64,)]
  assert len(perms) == 1  # only x is stored per sample
  np.testing.assert_array_equal(g(w1, w2, x, key=jax.random.key(1)), fn(w1, w2, x))


def test_per_residual_bits_tuple_and_linearity():
  args = _mlp_args()
  res = act.compressed_residuals(_mlp, *args, group_size=32, compress_args=(2,))
  assert all(r.linear for r in res) and res[0].shape == (64, 32)
  key = jax.random.key(1)
  grad = lambda bits: jax.jit(jax.grad(  # noqa: E731
      lambda a, b, c: act.compressed_vjp(_mlp, bits, 32, (2,))(a, b, c, key=key)))(*args)
  np.testing.assert_array_equal(grad((4,) * len(res)), grad(4))  # same seeds per slot
  mixed = grad(tuple(8 if i == 0 else 1 for i in range(len(res))))
  assert not np.array_equal(mixed, grad(8))
  with pytest.raises(ValueError, match="compressed residuals"):
    grad((2,) * (len(res) + 1))
  with pytest.raises(ValueError, match=r"bits\[1\]"):
    act.compressed_vjp(_mlp, (2, 3))

  def attn(w, x):  # softmax's exp(s - max) is used non-linearly by the backward
    p = jax.nn.softmax(x @ w, axis=-1)
    return jnp.sum(p @ w.T)

  # the probabilities (read linearly by p @ w.T's backward) are recomputed from the exp
  # and the kept row sums (jaxq.act.recompute), not stored
  res = act.compressed_residuals(attn, args[1].T, args[2][:, :16], group_size=32,
                                 compress_args=(1,))
  assert [(r.shape, r.linear) for r in res] == [((64, 16), True), ((64, 64), False)], res


def test_adaptive_bits_per_residual_within_budget():
  """AdaptiveBits over the residuals of compressed_residuals: the tuple it gives stores
  no more bytes than uniform 2-bit, and the most sensitive residual gets the most bits."""
  args = _mlp_args()
  res = act.compressed_residuals(_mlp, *args, group_size=32, compress_args=(2,))
  names = range(len(res))
  ab = act.AdaptiveBits(names, avg_bits=2, choices=(1, 2, 4))
  sens = {i: float(10.0**i) for i in names}
  bits = ab.update_sensitivity(sens, {i: r.size for i, r in enumerate(res)})
  widths = ab.as_tuple()
  assert widths == tuple(bits[i] for i in names) and widths[-1] == max(widths) > 2
  assert sum(w * r.size for w, r in zip(widths, res)) <= 2 * sum(r.size for r in res)
  n2 = act.residual_nbytes(act.compressed_vjp(_mlp, 2, 32, (2,)), *args)
  na = act.residual_nbytes(act.compressed_vjp(_mlp, widths, 32, (2,)), *args)
  assert na <= n2, (na, n2)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8)(nn.gelu(nn.Dense(64)(nn.LayerNorm()(x))))


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return _Block()(nn.Dense(16)(x))


def test_compressed_call_with_sample_bits():
  x = jax.random.normal(jax.random.key(0), (32, 4, 16))
  m = _Net()
  params = m.init(jax.random.key(1), x)["params"]

  def loss(p, bits, key):
    def icpt(next_fun, args, kwargs, ctx):
      if isinstance(ctx.module, _Block) and ctx.method_name == "__call__" and bits:
        return compressed_call(ctx.module, "__call__", args, kwargs, bits=bits, key=key)
      return next_fun(*args, **kwargs)
    with nn.intercept_methods(icpt):
      return jnp.sum(m.apply({"params": p}, x) ** 2)

  l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(p, None, None)))(params)
  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(p, SB, jax.random.key(2))))(params)
  np.testing.assert_array_equal(l1, l0)
  assert _rel(g1, g0) < 1.0
