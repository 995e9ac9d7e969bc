"""jaxq.layer.nf4_base: a frozen NF4 QLoRA base, dequantized blockwise in both passes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import lora
from jaxq.layer import nf4_base
from jaxq.layer.views import dot_general_contraction
from jaxq.qarray import dequantize, quantize


def _nf4(group_size):
  return jaxq.QuantSpec(bits=4, scheme="nf4", granularity="group", group_size=group_size)


@pytest.mark.parametrize("n,want", [(2048, 256), (96, 48), (192, 96), (6, 2), (2, None)])
def test_column_block(n, want):
  assert nf4_base.column_block(n) == want


def test_forward_and_input_gradient_equal_the_dequantized_matmul():
  k, n = 128, 96  # two column blocks of 48
  q = quantize(jax.random.normal(jax.random.key(0), (k, n)), _nf4(32))
  x = jax.random.normal(jax.random.key(1), (5, k))
  dn = (((1,), (0,)), ((), ()))
  op = dot_general_contraction(x, jnp.zeros((k, n)), dn,
                               lambda a, b: jax.lax.dot_general(a, b, dn), "fc")
  assert nf4_base.applies(op, q)
  compute = nf4_base.nf4_base_compute(op, q)
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x)))  # noqa: E731
  w = dequantize(q)
  np.testing.assert_allclose(compute(x, None), x @ w, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.grad(loss(lambda x: compute(x, None)))(x),
                             jax.grad(loss(lambda x: x @ w))(x), rtol=1e-5, atol=1e-5)


class Deep(nn.Module):

  @nn.compact
  def __call__(self, x):
    for i in range(6):
      x = jnp.tanh(nn.Dense(256, name=f"fc{i}")(x))
    return x


def _step_temp_bytes(weight):
  """Compiled temporaries of the adapters' gradient, LoRA over a float or a frozen base."""
  model, x = Deep(), jax.random.normal(jax.random.key(1), (32, 256))
  qmodel = jaxq.quantize_model(model, [jaxq.Rule("fc.*", weight=weight, lora=jaxq.LoRA(4))])
  params = jax.eval_shape(lambda: jaxq.flax.init_quant_params(
      qmodel, model.init(jax.random.key(0), x), x,
      rngs={"params": jax.random.key(2)})["params"])
  if weight is not None:
    params = jax.eval_shape(lambda p: lora.freeze(qmodel, p), params)
  adapters, rest = lora.split(params)
  loss = lambda ad, rest: jnp.sum(  # noqa: E731
      qmodel.apply({"params": lora.combine(ad, rest)}, x) ** 2)
  compiled = jax.jit(jax.grad(loss)).lower(adapters, rest).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_frozen_base_keeps_no_float_copy_of_the_kernels():
  # Dequantizing whole kernels, XLA:CPU keeps all six float kernels (1.5 MiB) alive.
  float_kernels = 6 * 256 * 256 * 4
  assert _step_temp_bytes(_nf4(64)) <= _step_temp_bytes(None) + float_kernels // 2
