"""jaxq.act.fold: elementwise derivative factors stored as one residual, exactly and
unbiasedly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.extend import core as jex_core

from jaxq import act
from jaxq.act import fold, recompute, residuals


def _act_mlp(activation):
  def fn(w1, w2, x):
    return activation(x @ w1) @ w2
  return fn


def _args(dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(k1, (32, 64), dtype) / 6, jax.random.normal(k2, (64, 16), dtype) / 8,
          jax.random.normal(k3, (48, 32), dtype))


ACTIVATIONS = {
    "gelu_tanh": jax.nn.gelu,
    "gelu_erf": lambda h: jax.nn.gelu(h, approximate=False),
    "silu": jax.nn.silu,
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_derivative_is_one_residual(name):
  """A Dense-activation-Dense MLP stores x (for dW1), h = act(x w1) (for dW2) and the
  activation's derivative J folded into one tensor; the backward pass is linear in each
  (JAX's linearization alone saves 2-5 separate factors of the tanh-GELU's derivative)."""
  fn = _act_mlp(ACTIVATIONS[name])
  res = act.compressed_residuals(fn, *_args(), group_size=32, compress_args=(2,))
  got = [(r.shape, r.linear, r.weight_only) for r in res]
  assert got == [((48, 32), True, True), ((48, 64), True, True), ((48, 64), True, False)], got


def _ln_attention(p, x):
  """Pre-LN self-attention with a GELU MLP on its output (no Flax: plain jnp)."""
  mu = x.mean(-1, keepdims=True)
  var = jnp.mean(x * x, -1, keepdims=True) - mu * mu
  y = (x - mu) * jax.lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]
  s = jnp.einsum("bqd,bkd->bqk", y @ p["wq"], y @ p["wk"]) / 4.0
  h = jax.nn.softmax(s, axis=-1) @ y
  return x + jax.nn.gelu(h @ p["w1"]) @ p["w2"]


def _ln_attention_args():
  ks = jax.random.split(jax.random.key(1), 6)
  d = 32
  p = {"scale": 1 + jax.random.normal(ks[0], (d,)) / 4, "bias": jax.random.normal(ks[1], (d,)),
       "wq": jax.random.normal(ks[2], (d, d)) / 6, "wk": jax.random.normal(ks[3], (d, d)) / 6,
       "w1": jax.random.normal(ks[4], (d, 64)) / 6, "w2": jax.random.normal(ks[5], (64, d)) / 8}
  return p, jax.random.normal(jax.random.key(2), (4, 16, d))


def _flat(fn, args):
  leaves, tree = jax.tree_util.tree_flatten(args)
  return (lambda *l: fn(*jax.tree_util.tree_unflatten(tree, l))), leaves


CASES = {
    "gelu_tanh": (_act_mlp(jax.nn.gelu), _args, (2,)),
    "silu": (_act_mlp(jax.nn.silu), _args, (2,)),
    "gelu_tanh_bf16": (_act_mlp(jax.nn.gelu), lambda: _args(jnp.bfloat16), (2,)),
    "ln_attention": (_ln_attention, _ln_attention_args, (1,)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_folded_backward_equals_unfolded(case):
  """With exact (uncompressed) residuals, the backward pass with folded regions and
  recomputed residuals computes JAX's cotangents, up to float reassociation
  (``ct * (a * b)`` for ``(ct * a) * b``)."""
  fn, make_args, compress_args = CASES[case]
  args = make_args()
  flat_fn, leaves = _flat(fn, args)
  positions = [p for p, a in enumerate(args) for _ in jax.tree_util.tree_leaves(a)]
  mask = [p in compress_args for p in positions]
  plan = residuals.trace_forward(flat_fn, leaves, mask, mask, 32)
  outs, res = residuals.run_forward(plan, leaves)
  ct = [jax.random.normal(jax.random.key(5), o.shape, o.dtype) for o in outs]
  closed = residuals.backward_jaxpr(plan, ct)
  ci, ki = plan.stored(True), plan.stored(False)
  comp, kept = [res[k] for k in ci], [res[k] for k in ki]
  folded = fold.fold(closed, len(comp), len(kept),
                     recompute.recipes(plan.jaxpr, plan.n_out, ci, ki, closed))
  assert folded.n_folded == 1
  assert len(folded.keep) + folded.n_folded < len(comp)
  want = jex_core.jaxpr_as_fun(closed)(*comp, *kept, *ct)
  got = jex_core.jaxpr_as_fun(folded.jaxpr)(*folded.stored(comp, kept), *kept, *ct)
  tol = 2e-2 if outs[0].dtype == jnp.bfloat16 else 2e-5
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol * float(jnp.abs(b).max()))


def test_layernorm_and_softmax_residuals_recomputed():
  """LayerNorm's full-size ``1/sigma * scale`` is recomputed exactly from its kept
  factors, softmax's probabilities from exp(s - max) and the kept row sums, and the
  GELU's derivative factors are folded into one: 9 residuals stored instead of JAX's 15,
  and no residual the backward pass used linearly becomes non-linear (``x - mean`` is
  not recomputed from ``x``, which LayerNorm's backward pass multiplies it with)."""
  p, x = _ln_attention_args()
  res = act.compressed_residuals(_ln_attention, p, x, group_size=32, compress_args=(1,))
  got = sorted((r.shape, r.linear) for r in res)
  assert got == sorted([((4, 16, 32), True)] * 5 + [((4, 16, 32), False),
                        ((4, 16, 16), False), ((4, 16, 64), True), ((4, 16, 64), True)]), got


def test_folded_gradient_unbiased_and_forward_exact():
  fn = lambda w1, w2, x: jnp.sum(jnp.sin(_act_mlp(jax.nn.gelu)(w1, w2, x)))  # noqa: E731
  args = _args()
  g = act.compressed_vjp(fn, bits=2, group_size=32, compress_args=(2,))
  np.testing.assert_array_equal(
      jax.jit(lambda *a: g(*a, key=jax.random.key(0)))(*args), jax.jit(fn)(*args))
  exact = jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(*args)
  grad = jax.jit(jax.vmap(jax.grad(lambda a, b, c, k: g(a, b, c, key=k), argnums=(0, 1, 2)),
                          in_axes=(None, None, None, 0)))
  gs = grad(*args, jax.random.split(jax.random.key(1), 512))

  def rel(a, b):
    a = jnp.concatenate([jnp.ravel(t) for t in a])
    b = jnp.concatenate([jnp.ravel(t) for t in b])
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

  err_one = np.mean([rel([t[i] for t in gs], exact) for i in range(4)])
  err_mean = rel([t.mean(0) for t in gs], exact)
  assert err_mean < err_one / 8, (err_mean, err_one)  # ~ err_one / sqrt(512)


def test_layout_hints_in_the_backward_pass_store_the_same_residuals():
  """A mesh adds sharding constraints and same-shape reshapes to the backward pass; they
  must not split a folded region: the sharded run must store (and so round) the same
  residuals as the one-device run (before: one more J on a 4x2 mesh, and parameters 13x
  the tolerance away from one device's after 3 steps, tests/test_sharding.py)."""
  hint = jax.sharding.NamedSharding(jax.make_mesh((1,), ("d",)), jax.sharding.PartitionSpec())

  def gelu_hinted(h):
    inner = jax.lax.with_sharding_constraint(0.7978845608 * (h + 0.044715 * h ** 3), hint)
    return 0.5 * h * (1.0 + jnp.tanh(inner))

  def stored(activation):
    res = act.compressed_residuals(_act_mlp(activation), *_args(), group_size=32,
                                   compress_args=(2,))
    return [(r.shape, r.linear) for r in res]

  assert stored(gelu_hinted) == stored(lambda h: jax.nn.gelu(h, approximate=True))
