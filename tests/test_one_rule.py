"""One Rule, one meaning: quantize_params and quantize_model (Linen and NNX) quantize a
layer's kernel identically, bit for bit, or all reject the rule naming the layer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from jaxq import nnx as jnnx
from jaxq.spec import QuantSpec, Rule

W4C = QuantSpec(bits=4)
W4G = QuantSpec(bits=4, granularity="group", group_size=2)
W3T = QuantSpec(bits=3, granularity="tensor")


class Holder(nn.Module):
  """One Linen layer under the name "layer" (rules match "layer")."""

  make: object

  @nn.compact
  def __call__(self, x):
    return self.make(name="layer")(x)


class Layers(nn.Module):
  """Every Linen layer kind side by side, each called on its own input."""

  @nn.compact
  def __call__(self, xs):
    return {name: make(name=name)(xs[name]) for name, (make, _) in LINEN.items()}


LINEN = {
    "dense": (lambda name: nn.Dense(6, name=name), (3, 8)),
    "conv": (lambda name: nn.Conv(6, (3, 3), padding="SAME", name=name), (2, 5, 5, 4)),
    "conv_g": (lambda name: nn.Conv(6, (3, 3), padding="SAME", name=name), (2, 5, 5, 4)),
    "dense_general_in": (lambda name: nn.DenseGeneral(6, axis=(-2, -1), name=name),
                         (3, 2, 4)),
    "dense_general_out": (lambda name: nn.DenseGeneral((2, 4), name=name), (3, 8)),
    "einsum": (lambda name: nn.Einsum((4, 6), "btc,cd->btd", name=name), (2, 3, 4)),
    "einsum_t": (lambda name: nn.Einsum((4, 6), "btc,cd->btd", name=name), (2, 3, 4)),
}
# Channel, group and tensor specs over the layer kinds.
LINEN_RULES = [Rule("dense|conv_g|dense_general_in", weight=W4G),
               Rule("einsum_t", weight=W3T), Rule(".*", weight=W4C)]


def _inputs(table):
  keys = jax.random.split(jax.random.key(0), len(table))
  return {name: jax.random.normal(k, shape) for k, (name, (_, shape)) in
          zip(keys, table.items())}


def test_linen_quantize_model_equals_quantize_params():
  model = Layers()
  xs = _inputs(LINEN)
  params = jax.jit(model.init)(jax.random.key(1), xs)["params"]
  got = jax.jit(jaxq.quantize_model(model, LINEN_RULES).apply)({"params": params}, xs)
  qparams = jax.jit(lambda p: jaxq.quantize_params(p, LINEN_RULES))(params)
  apply = jax.jit(model.apply)
  want, ref = apply({"params": qparams}, xs), apply({"params": params}, xs)
  for name in LINEN:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert not np.array_equal(want[name], ref[name]), name


class NnxLayers(nnx.Module):

  def __init__(self, rngs):
    for name, (make, _) in NNX.items():
      setattr(self, name, make(rngs))

  def __call__(self, xs):
    return {name: getattr(self, name)(xs[name]) for name in NNX}


class NnxHolder(nnx.Module):

  def __init__(self, layer):
    self.layer = layer

  def __call__(self, x):
    return self.layer(x)


NNX = {
    "linear": (lambda r: nnx.Linear(8, 6, rngs=r), (3, 8)),
    "conv": (lambda r: nnx.Conv(4, 6, (3, 3), padding="SAME", rngs=r), (2, 5, 5, 4)),
    "linear_general": (lambda r: nnx.LinearGeneral((2, 4), 6, axis=(-2, -1), rngs=r),
                       (3, 2, 4)),
    "einsum": (lambda r: nnx.Einsum("bhd,hdo->bo", (2, 4, 6), (6,), rngs=r), (3, 2, 4)),
}
NNX_RULES = [Rule("conv|linear_general", weight=W4G), Rule(".*", weight=W4C)]


def test_nnx_quantize_model_equals_quantize_params():
  model = nnx.jit(lambda: NnxLayers(nnx.Rngs(1)))()
  xs = _inputs(NNX)
  qmodel = jnnx.quantize_model(model, NNX_RULES)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ref = nnx.clone(model)
  nnx.update(ref, jax.jit(lambda p: jaxq.quantize_params(p, NNX_RULES))(params))
  fwd = nnx.jit(lambda m, v: m(v))
  got, want, unquantized = fwd(qmodel, xs), fwd(ref, xs), fwd(model, xs)
  for name in NNX:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert not np.array_equal(got[name], unquantized[name]), name


def test_an_input_axis_is_rejected_by_every_api():
  rules = [Rule("layer", weight=QuantSpec(axis=0))]
  msg = r"layer.*QuantSpec.axis=0 is not an output axis.*\[1, -1\]"
  model = Holder(LINEN["dense"][0])
  x = jnp.ones((3, 8))
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  with pytest.raises(ValueError, match=msg):
    jaxq.quantize_params(params, rules)
  with pytest.raises(ValueError, match=msg):
    jaxq.quantize_model(model, rules).apply({"params": params}, x)
  with pytest.raises(ValueError, match=msg):
    jnnx.quantize_model(NnxHolder(nnx.Linear(8, 6, rngs=nnx.Rngs(0))), rules)
  # a Conv kernel (kh, kw, in, out): only the output channel can keep scales
  conv_rules = [Rule("layer", weight=QuantSpec(granularity="group", group_size=2, axis=2))]
  with pytest.raises(ValueError, match=r"layer.*QuantSpec.axis=2.*\[3, -1\]"):
    jnnx.quantize_model(NnxHolder(nnx.Conv(4, 6, (3, 3), rngs=nnx.Rngs(0))), conv_rules)


class OddKernel(nn.Module):
  """A custom module with a 1-D param named "kernel", around a Dense "layer"."""

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", nn.initializers.ones, (x.shape[-1],))
    return nn.Dense(6, name="layer")(x * k)


def test_convert_errors_name_the_layer():
  model = OddKernel()
  x = jnp.ones((2, 6))
  v = jax.jit(model.init)(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"layer ''.*'kernel' of shape \(6,\).*rank < 2"):
    jaxq.convert(jaxq.quantize_model(model, [Rule(".*", weight=QuantSpec(8))]), v)
  bad = jaxq.quantize_model(model, [Rule("layer", weight=QuantSpec(4, granularity="group",
                                                                      group_size=4))])
  with pytest.raises(ValueError, match=r"layer 'layer'.*group_size=4 does not divide"):
    jaxq.convert(bad, v)
