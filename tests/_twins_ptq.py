"""Linen models and their Flax NNX twins (same layer names, shapes and numerics).

``twin(name)`` returns ``(linen_model, linen_variables, nnx_model, x)``: the NNX model
holds a copy of the Linen model's parameters (:func:`copy_params`), ``x`` is an input
batch. Twins: "mlp" (Dense / Linear), "cnn" (Conv, Dense), "attn" (DenseGeneral in
multi-head attention, Dense).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name="fc1")(x))
    return nn.Dense(8, name="fc2")(x)


class NnxMLP(nnx.Module):
  def __init__(self, *, rngs):
    self.fc1 = nnx.Linear(16, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 8, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
    return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))


class NnxCNN(nnx.Module):
  def __init__(self, *, rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.conv(x)).mean(axis=(1, 2)))


class LinenAttn(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, name="attn")(x, x)
    return nn.Dense(4, name="head")(x.mean(axis=1))


class NnxAttn(nnx.Module):
  def __init__(self, *, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, qkv_features=16,
                                       decode=False, rngs=rngs)
    self.head = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(self.attn(x, x).mean(axis=1))


_TWINS = {
    "mlp": (LinenMLP, NnxMLP, (32, 16)),
    "cnn": (LinenCNN, NnxCNN, (8, 6, 6, 1)),
    "attn": (LinenAttn, NnxAttn, (8, 5, 16)),
}


def copy_params(params: dict, model: nnx.Module) -> None:
  """Sets the ``nnx.Param``s of ``model`` to the Linen ``params`` of the same paths."""
  state = nnx.state(model, nnx.Param)
  mine = jax.tree_util.tree_structure(nnx.to_pure_dict(state))
  theirs = jax.tree_util.tree_structure(jax.tree_util.tree_map(jnp.asarray, dict(params)))
  assert mine == theirs, (mine, theirs)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)


def batch(name: str, seed: int) -> jax.Array:
  shape = _TWINS[name][2]
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return jnp.asarray(x)


def twin(name: str):
  """``(linen_model, linen_variables, nnx_model, x)`` of the twin ``name``."""
  linen_cls, nnx_cls, _ = _TWINS[name]
  x = batch(name, 0)
  lm = linen_cls()
  variables = lm.init(jax.random.key(0), x)
  nm = nnx_cls(rngs=nnx.Rngs(1))
  copy_params(variables["params"], nm)
  return lm, variables, nm, x
