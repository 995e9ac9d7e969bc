"""Tiny shared test models and the scikit-learn digits data (8x8x1 images, 10 classes).

* :func:`load_digits_split` -- normalized train/test arrays, no download.
* :class:`TinyViT` -- a Linen ViT: Conv patch embedding, pre-LN blocks with
  ``nn.MultiHeadDotProductAttention`` (DenseGeneral) and a Dense MLP, mean pooling.
* :class:`TinyCNN` -- nn.Conv -> nn.BatchNorm -> relu (x2) -> mean pool -> nn.Dense.
* :func:`train` / :func:`accuracy` -- a whole training run compiled as one ``lax.scan``
  (one compilation, fast on 2 CPU cores); works for any Linen model whose extra
  collections (batch_stats, quant_stats) are updated with ``mutable=``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


@functools.lru_cache(maxsize=None)
def _digits():
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  return d.images.astype(np.float32), d.target.astype(np.int32)


def load_digits_split(seed: int = 0, test_fraction: float = 0.25):
  """Returns ``(x_train, y_train, x_test, y_test)``; x: f32[N, 8, 8, 1], y: i32[N].

  Pixels (0..16) are standardized with the training set's mean and std.
  """
  images, labels = _digits()
  perm = np.random.default_rng(seed).permutation(len(labels))
  n_test = int(round(len(labels) * test_fraction))
  test, tr = perm[:n_test], perm[n_test:]
  x = images[..., None] / 16.0
  mean, std = x[tr].mean(), x[tr].std()
  x = (x - mean) / std
  return (jnp.asarray(x[tr]), jnp.asarray(labels[tr]), jnp.asarray(x[test]),
          jnp.asarray(labels[test]))


class MlpBlock(nn.Module):
  mlp: int
  dim: int

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.mlp)(x)
    x = nn.gelu(x)
    return nn.Dense(self.dim)(x)


class EncoderBlock(nn.Module):
  dim: int
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim)(y, y)
    x = x + y
    y = nn.LayerNorm()(x)
    return x + MlpBlock(self.mlp, self.dim)(y)


class TinyViT(nn.Module):
  """A tiny ViT for 8x8 inputs: patch embedding, ``depth`` pre-LN blocks, mean pooling."""

  patch: int = 2
  dim: int = 32
  depth: int = 2
  heads: int = 2
  mlp: int = 64
  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.Conv(self.dim, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", name="embed")(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w, c))
    x = x + pos
    for i in range(self.depth):
      x = EncoderBlock(self.dim, self.heads, self.mlp, name=f"block_{i}")(x)
    x = nn.LayerNorm(name="final_norm")(x)
    return nn.Dense(self.classes, name="head")(x.mean(axis=1))


class TinyCNN(nn.Module):
  """Conv -> BatchNorm -> relu, twice, then mean pooling and a Dense classifier."""

  features: tuple[int, ...] = (16, 32)
  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, f in enumerate(self.features):
      x = nn.Conv(f, (3, 3), strides=(1, 1) if i == 0 else (2, 2), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
    return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train(model: nn.Module, variables: dict[str, Any], x, y, *, steps: int = 300,
          batch_size: int = 64, tx: optax.GradientTransformation | None = None,
          seed: int = 0, rng_streams: tuple[str, ...] = ()):
  """Trains ``variables["params"]`` for ``steps`` minibatch steps; returns the variables.

  Collections other than "params" (e.g. "batch_stats", "quant_stats") are passed as
  mutable and updated every step. The model is called as ``model.apply(v, xb,
  train=True)``. ``rng_streams`` names rng streams (e.g. "jaxq") fed fresh keys per step.
  The whole run is one jitted ``lax.scan``.
  """
  tx = tx or optax.adam(3e-3)
  return _train_fn(model, tx, steps, batch_size, rng_streams)(variables, x, y,
                                                              jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def _train_fn(model, tx, steps, batch_size, rng_streams):
  @jax.jit
  def run(variables, x, y, key):
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    mutable = list(state)
    n = x.shape[0]

    def loss_fn(p, st, xb, yb, k):
      rngs = dict(zip(rng_streams, jax.random.split(k, max(len(rng_streams), 1))))
      if mutable:
        logits, new_st = model.apply({"params": p, **st}, xb, train=True, mutable=mutable,
                                     rngs=rngs)
      else:
        logits, new_st = model.apply({"params": p}, xb, train=True, rngs=rngs), {}
      return cross_entropy(logits, yb), dict(new_st)

    def step(carry, k):
      p, st, opt = carry
      k_idx, k_rng = jax.random.split(k)
      idx = jax.random.randint(k_idx, (batch_size,), 0, n)
      (loss, st), g = jax.value_and_grad(loss_fn, has_aux=True)(p, st, x[idx], y[idx],
                                                                k_rng)
      upd, opt = tx.update(g, opt, p)
      return (optax.apply_updates(p, upd), st, opt), loss

    carry = (params, state, tx.init(params))
    (params, state, _), losses = jax.lax.scan(step, carry, jax.random.split(key, steps))
    return {"params": params, **state}, losses

  def call(variables, x, y, key):
    out, _ = run(variables, x, y, key)
    return out

  return call


def accuracy(model: nn.Module, variables, x, y) -> float:
  """Test accuracy in percent, with ``train=False`` (BatchNorm running averages)."""
  logits = jax.jit(lambda v, xb: model.apply(v, xb, train=False))(variables, x)
  return float(jnp.mean(jnp.argmax(logits, -1) == y) * 100.0)
