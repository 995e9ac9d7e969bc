"""The memory saving of compressed_vjp is real in the compiled step, not only in the
residual count: XLA must not hoist the decompression of every block into the forward
pass (the ordering of :func:`jaxq.act.interpret.after`), nor keep the float residuals
alive next to their codes. Compile only; nothing is run."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxq import act

DEPTH, BATCH, DIM, HIDDEN = 12, 256, 128, 512


def _block(p, h):
  y = jax.nn.gelu(h @ p["w1"])
  return h + jnp.tanh(y @ p["w2"])


def _compiled_temp_bytes(block) -> int:
  params = [{"w1": jnp.zeros((DIM, HIDDEN)), "w2": jnp.zeros((HIDDEN, DIM))}
            for _ in range(DEPTH)]
  x = jnp.zeros((BATCH, DIM))

  def loss(params, x, key):
    h = x
    for i, p in enumerate(params):
      h = block(p, h, jax.random.fold_in(key, i))
    return jnp.sum(h ** 2)

  step = jax.jit(jax.grad(loss))
  return step.lower(params, x, jax.random.key(0)).compile().memory_analysis().temp_size_in_bytes


def test_compiled_temp_of_2bit_step_well_below_float():
  g = act.compressed_vjp(_block, bits=2, compress_args=(1,))
  float_temp = _compiled_temp_bytes(lambda p, h, k: _block(p, h))
  comp_temp = _compiled_temp_bytes(lambda p, h, k: g(p, h, key=k))
  # Float keeps each block's activations from forward to backward (19.5 MB measured);
  # compressed, the backward holds one block's decompressed residuals at a time next to
  # every block's 2-bit codes (7.1 MB). If XLA hoisted the decompression into the forward
  # pass, the float residuals would all be alive again and this ratio would be ~1.
  assert comp_temp < 0.45 * float_temp, (comp_temp, float_temp)
