"""Activation-compressed training (ActNN) of a tiny ViT on scikit-learn digits.

Every variant trains from the same initialisation with the same optimizer, minibatches
and number of steps; only how the encoder blocks save their activations differs:

* float: as they are;
* ``quantize_model(model, [Rule("block_\\d+", weight=None, act=None, act_compress=b)])``
  with stochastic rounding from the "jaxq" rng stream, b = 4 and b = 2.

4-bit must end within 1.5 points of float test accuracy, 2-bit within 4 points. Adaptive
per-sample widths at an average of 2 bits (every Dense/Conv layer a region) must give a
gradient closer to the exact one than uniform 2-bit.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from _models import TinyViT, accuracy, cross_entropy, load_digits_split
from jaxq import act
from jaxq.flax.linen import quantize_model
from jaxq.spec import Rule

SEED = 0
STEPS, INTERVAL, BATCH = 600, 200, 64
# Cosine decay to 0: the compression noise (like SGD noise) is averaged out at the end.
TX = optax.adam(optax.cosine_decay_schedule(3e-3, STEPS))
MODEL = TinyViT(dim=32, depth=2)


@functools.lru_cache(maxsize=None)
def _setup(seed: int):
  xtr, ytr, xte, yte = load_digits_split(seed)
  params = MODEL.init(jax.random.key(seed), xtr[:2])["params"]
  return params, (xtr, ytr, xte, yte), jax.random.split(jax.random.key(seed + 1), STEPS)


@functools.lru_cache(maxsize=None)
def _chunk_fn(model: nn.Module, steps: int):
  """Jitted ``steps`` Adam steps (one ``lax.scan``), carrying params and optimizer state."""

  @jax.jit
  def run(params, opt, x, y, keys):
    def step(carry, k):
      p, o = carry
      k_idx, k_rng = jax.random.split(k)
      idx = jax.random.randint(k_idx, (BATCH,), 0, x.shape[0])
      loss_fn = lambda p: cross_entropy(  # noqa: E731
          model.apply({"params": p}, x[idx], rngs={"jaxq": k_rng}), y[idx])
      loss, g = jax.value_and_grad(loss_fn)(p)
      upd, o = TX.update(g, o, p)
      return (optax.apply_updates(p, upd), o), loss

    (params, opt), losses = jax.lax.scan(step, (params, opt), keys)
    return params, opt, losses

  return run


def _train(models, seed: int):
  """Trains from ``_setup(seed)``; ``models(chunk_index, params, key)`` gives the model of
  each ``INTERVAL``-step chunk. Returns ``(test accuracy in %, training losses, params)``."""
  params, (xtr, ytr, xte, yte), keys = _setup(seed)
  opt, losses = TX.init(params), []
  for c in range(STEPS // INTERVAL):
    ks = keys[c * INTERVAL:(c + 1) * INTERVAL]
    model = models(c, params, ks[0])
    params, opt, l = _chunk_fn(model, INTERVAL)(params, opt, xtr, ytr, ks)
    losses.append(l)
  return accuracy(MODEL, {"params": params}, xte, yte), np.concatenate(losses), params


@functools.lru_cache(maxsize=None)
def _uniform(bits: int | None, seed: int):
  model = MODEL if bits is None else quantize_model(
      MODEL, [Rule(path=r"block_\d+", weight=None, act=None, act_compress=bits)])
  return _train(lambda c, p, k: model, seed)


# --------------------------------------------------------------------------------- tests
# Accuracies are averaged over 2 seeds (data split, init, minibatches, rounding): one test
# image is 0.22 points, and a single seed's 4-bit result wanders by up to ~1.8 points
# around float (measured: seeds 0/1/2 gave +0.4/-1.8/+0.4), the 2-seed mean by < 1.
# After the first compile a run costs 2-4 s of CPU, so the second seed is nearly free.
SEEDS = (0, 1)


@functools.lru_cache(maxsize=None)
def _mean_acc(bits: int | None) -> float:
  return float(np.mean([_uniform(bits, s)[0] for s in SEEDS]))


def test_row_statistics_kept_exactly():
  """LayerNorm / softmax per-row statistics stay float; activations are compressed."""
  shapes = [(64, 16, 32), (64, 16, 1), (64, 16), (32, 8)]
  avals = [jax.ShapeDtypeStruct(sh, jnp.float32) for sh in shapes]
  assert act.residuals.row_statistics(avals) == {1, 2}


def _digits_grad_error(bits: int, params, keys=3) -> float:
  """Mean over keys of |g - g_exact| / |g_exact| on 64 training digits, every encoder
  block compressed at ``bits`` (blank patches give tokens of std ~0.02 next to ordinary
  ones: the case per-row groups exist for)."""
  xtr, ytr = _setup(SEED)[1][:2]
  x, y = xtr[:BATCH], ytr[:BATCH]
  qmodel = quantize_model(MODEL, [Rule(r"block_\d+", weight=None, act=None,
                                       act_compress=bits)])

  def grad(model, key):
    rngs = None if key is None else {"jaxq": key}
    g = jax.grad(lambda p: cross_entropy(model.apply({"params": p}, x, rngs=rngs), y))(
        params)
    return jnp.concatenate([jnp.ravel(l) for l in jax.tree_util.tree_leaves(g)])

  exact = jax.jit(lambda: grad(MODEL, None))()
  run = jax.jit(lambda k: grad(qmodel, k))
  return float(np.mean([jnp.linalg.norm(run(k) - exact) / jnp.linalg.norm(exact)
                        for k in jax.random.split(jax.random.key(7), keys)]))


def test_4bit_gradient_error_on_digits():
  assert _digits_grad_error(4, _setup(SEED)[0]) <= 0.15
  assert _digits_grad_error(4, _uniform(None, SEED)[2]) <= 0.15


def test_4bit_within_1p5_of_float():
  acc_float, acc4 = _mean_acc(None), _mean_acc(4)
  assert acc_float > 90.0, acc_float  # the float reference itself learned the task
  assert acc4 >= acc_float - 1.5, (acc4, acc_float)


def test_2bit_within_4_of_float():
  acc_float, acc2 = _mean_acc(None), _mean_acc(2)
  assert acc2 >= acc_float - 4.0, (acc2, acc_float)


def test_adaptive_2bit_gradient_closer_to_float_than_uniform_2bit():
  """Every Dense/Conv layer its own region (ActNN's per-layer setting: each region saves
  only its input, read by ``dW`` alone, so rounding noise adds up instead of
  compounding), on the float-trained ViT. Per-sample widths at an average of 2 bits,
  chosen from the training set's gradient estimates and ranked by ``G_n R_n``, give a
  gradient several times closer to the exact one than uniform 2-bit (measured 3.8x over
  10 training runs: ``benchmarks/exp_act_sample_weight.py``, which also trains with it)."""
  params = _uniform(None, SEED)[2]
  xtr, ytr = _setup(SEED)[1][:2]
  per_sample = optax.softmax_cross_entropy_with_integer_labels
  g_est = act.output_grad_sqnorm(per_sample, MODEL.apply({"params": params}, xtr), ytr)
  widths = act.SampleBits.from_sensitivity(g_est, 2, (1, 2, 4), batch_size=BATCH)
  assert widths.avg_bits <= 2 and len(widths.fractions) == 3, widths  # mostly fitted
  x, y, weight = xtr[:BATCH], ytr[:BATCH], g_est[:BATCH]
  layers = r"embed|head|.*/(query|key|value|out|Dense_\d+)"

  def grad(bits, key, w=None):
    model = MODEL if bits is None else quantize_model(
        MODEL, [Rule(layers, weight=None, act=None, act_compress=bits)])

    def loss(p):
      with act.linen.sample_weights(w) if w is not None else contextlib.nullcontext():
        rngs = None if key is None else {"jaxq": key}
        return cross_entropy(model.apply({"params": p}, x, rngs=rngs), y)

    g = jax.jit(jax.grad(loss))(params)
    return jnp.concatenate([jnp.ravel(l) for l in jax.tree_util.tree_leaves(g)])

  exact = grad(None, None)
  error = lambda *a: np.mean([float(jnp.linalg.norm(grad(*a[:1], k, *a[1:]) - exact)  # noqa: E731
                                    / jnp.linalg.norm(exact))
                              for k in jax.random.split(jax.random.key(5), 3)])
  uniform, adaptive = error(2), error(widths, weight)
  assert adaptive < uniform / 2, (adaptive, uniform)
