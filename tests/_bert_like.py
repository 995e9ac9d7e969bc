"""A BERT-like pre-LN block (attention + MLP) with injected LayerNorm outlier channels
(a few hidden channels 20-100x larger than the rest, as LLM.int8 observed), as a Linen
module and its NNX twin with the same parameter paths; tests/test_layer_smooth.py runs
the same block through the layer functions directly, without Flax.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

D, H, T = 64, 4, 16  # hidden (= ffn: every kernel is D x D), heads, tokens
LAYERS = ("q", "k", "v", "out", "fc1", "fc2")
OUTLIERS = [3, 17, 40]


def block_params(seed: int = 0) -> dict:
  """Linen "params": random D x D kernels; LayerNorm gain 20 / 60 / 100 on the outlier
  channels, which the layers fed by the LayerNorm read with correspondingly small rows."""
  rng = np.random.default_rng(seed)
  p = {n: rng.normal(size=(D, D)) / np.sqrt(D) for n in LAYERS}
  gamma = np.ones(D)
  gamma[OUTLIERS] = [20.0, 60.0, 100.0]
  for name in ("q", "k", "v", "fc1"):
    p[name][OUTLIERS] /= gamma[OUTLIERS, None]
  out = {n: {"kernel": jnp.asarray(v, jnp.float32)} for n, v in p.items()}
  out["gamma"] = jnp.asarray(gamma, jnp.float32)
  return out


def inputs(n: int, seed: int) -> jax.Array:
  """``(n, T, D)`` token embeddings with an anisotropic spectrum (as real activations)."""
  rng = np.random.default_rng(1234)
  basis = np.linalg.qr(rng.normal(size=(D, D)))[0]
  mix = basis * (1.0 + np.arange(D)) ** -0.5 @ basis.T * 4.0
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, T, D)) @ mix, jnp.float32)


def _ln(h, gamma):
  mu = h.mean(-1, keepdims=True)
  return (h - mu) / jnp.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * gamma


def block(gamma, h, linear):
  """Pre-LN attention + MLP; ``linear(name, x)`` is the layer ``name`` applied to x."""
  b = h.shape[0]
  x = _ln(h, gamma)
  q, k, v = (linear(n, x).reshape(b, T, H, D // H) for n in ("q", "k", "v"))
  att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // H), -1)
  ctx = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, T, D)
  h = h + linear("out", ctx)
  return h + linear("fc2", jax.nn.gelu(linear("fc1", _ln(h, gamma))))


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, h):
    gamma = self.param("gamma", nn.initializers.ones, (D,))
    layers = {n: nn.Dense(D, use_bias=False, name=n) for n in LAYERS}
    return block(gamma, h, lambda n, x: layers[n](x))


class NnxBlock(nnx.Module):
  def __init__(self, params: dict):
    rngs = nnx.Rngs(0)
    self.gamma = nnx.Param(params["gamma"])
    for n in LAYERS:
      layer = nnx.Linear(D, D, use_bias=False, rngs=rngs)
      layer.kernel.set_value(params[n]["kernel"])
      setattr(self, n, layer)

  def __call__(self, h):
    return block(self.gamma.get_value(), h, lambda n, x: getattr(self, n)(x))


def cosines(y, ref) -> np.ndarray:
  """Per-token cosine of ``y`` and ``ref`` (float64)."""
  y, ref = (np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1]) for a in (y, ref))
  return np.sum(y * ref, 1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)
