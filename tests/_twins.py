"""A Linen model and its NNX twin with the same weights, for scenario tables run on both APIs.

Both are a tiny pre-LN transformer on ``(batch, tokens, features)`` inputs with the same
module paths (``embed``, ``block/norm1``, ``block/attn/{query,key,value,out}``,
``block/norm2``, ``block/fc1``, ``block/fc2``, ``head``), so one rule list quantizes
both alike. :func:`twins` builds them (the NNX weights copied from the Linen init);
:func:`linen_run` / :func:`nnx_run` give a quantized twin's output, its loss
gradients (learned quantizer steps included, under the same names in both APIs) and its
quantizer statistics after one training step.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxq
from jaxq.flax import nnx as jnnx

DIM, HEADS, MLP, CLASSES, TOKENS, FEATURES = 16, 2, 32, 5, 6, 8


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(name="norm1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=DIM,
                                            name="attn")(y, y)
    y = nn.LayerNorm(name="norm2")(x)
    return x + nn.Dense(DIM, name="fc2")(nn.gelu(nn.Dense(MLP, name="fc1")(y)))


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = LinenBlock(name="block")(nn.Dense(DIM, name="embed")(x))
    return nn.Dense(CLASSES, name="head")(x.mean(axis=1))


class NnxBlock(nnx.Module):
  """A pre-LN transformer block (also tests/test_nnx.py's)."""

  def __init__(self, rngs, dim=DIM, heads=HEADS, mlp=MLP):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False,
                                       rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, mlp, rngs=rngs)
    self.fc2 = nnx.Linear(mlp, dim, rngs=rngs)

  def __call__(self, x):
    y = self.norm1(x)
    x = x + self.attn(y, y)
    return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(FEATURES, DIM, rngs=rngs)
    self.block = NnxBlock(rngs)
    self.head = nnx.Linear(DIM, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.head(self.block(self.embed(x)).mean(axis=1))


class Stack(nnx.Module):
  """NNX layer stack: three Linear layers stacked by nnx.vmap, run by nnx.scan."""

  def __init__(self):
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
      return nnx.Linear(8, 8, rngs=nnx.Rngs(params=key))

    self.layers = make(jax.random.split(jax.random.key(0), 3))

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(h, layer):
      return nnx.relu(layer(h))

    return body(x, self.layers)


def data(seed=0, batch=4):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, TOKENS, FEATURES)).astype(np.float32)
  x[..., 3] *= 6.0  # inter-channel variation (what PTF is for)
  return jnp.asarray(x)


@functools.lru_cache(maxsize=None)
def _linen_params():
  return LinenNet().init(jax.random.key(0), data())["params"]


@functools.lru_cache(maxsize=None)
def _nnx_model():
  model = nnx.jit(lambda: NnxNet(nnx.Rngs(0)))()
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, _linen_params())
  nnx.update(model, state)
  return model


def twins():
  """``(linen_model, linen_params, nnx_model)`` with the same float weights (a fresh
  copy of the NNX model each call)."""
  return LinenNet(), _linen_params(), nnx.clone(_nnx_model())


def _loss(out):
  return jnp.sum(out * jnp.linspace(-1.0, 1.0, out.size).reshape(out.shape))


def linen_run(rules, x, *, int8="forward"):
  """``(out, grads, stats)`` of the Linen twin quantized with ``rules``: initialised on
  ``x`` (learned steps and observers from ``x``), then one training step on ``x``."""
  model, params, _ = twins()
  q = jaxq.quantize_model(model, rules, int8=int8)
  variables = jax.jit(lambda v, x: jaxq.flax.init_quant_params(q, v, x))(
      {"params": params}, x)

  @jax.jit
  def step(variables):
    def loss(p):
      out, new = q.apply({**variables, "params": p}, x, mutable=["quant_stats"])
      return _loss(out), (out, new.get("quant_stats", {}))
    return jax.value_and_grad(loss, has_aux=True)(variables["params"])

  (_, (out, new_stats)), g = step(variables)
  return out, g, new_stats


def nnx_step(q, x):
  """One jitted training step of an NNX model: ``(out, grads)`` (grads as a pure dict)."""
  (_, out), g = _nnx_step(q, x)
  return out, nnx.to_pure_dict(g)


@nnx.jit
def _nnx_step(m, x):
  return nnx.value_and_grad(lambda m: (_loss(out := m(x)), out), has_aux=True)(m)


def nnx_run(rules, x, *, int8="forward", rngs=None):
  """As :func:`linen_run` for the NNX twin, also returning the quantized model: two
  training steps on ``x``, the first initialising the learned activation steps and
  observers from ``x`` (as Linen's ``init``); the second's output and gradients."""
  _, _, model = twins()
  q = jnnx.quantize_model(model, rules, int8=int8, rngs=rngs)
  q.train()
  nnx_step(q, x)
  out, g = nnx_step(q, x)
  return out, g, nnx.to_pure_dict(nnx.state(q, jnnx.QuantStats)), q


def flat(tree) -> dict:
  """``{"a/b/c": array}`` of a nested dict."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
