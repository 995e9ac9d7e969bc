"""jaxq.checkpoint: bitwise save/restore of quantized training state."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxq import checkpoint
from jaxq.flax.linen import quantize_model
from jaxq.spec import QuantSpec, Rule


def test_roundtrip_bitwise(tmp_path):
  m = nn.Dense(4)
  q = quantize_model(m, [Rule(".*", weight=QuantSpec(bits=4, estimator="lsq"),
                              act=QuantSpec(granularity="tensor", calibration="ema"))])
  x = jax.random.normal(jax.random.key(0), (5, 8))
  v = q.init(jax.random.key(1), x)
  tx = optax.adamw(1e-3)
  opt = tx.init(v["params"])
  g = jax.grad(lambda p: jnp.sum(q.apply({**v, "params": p}, x) ** 2))(v["params"])
  _, opt = tx.update(g, opt, v["params"])
  state = {"variables": v, "opt_state": opt, "step": jnp.int32(7),
           "bf16": jnp.arange(5, dtype=jnp.bfloat16) / 3}
  checkpoint.save(tmp_path / "ckpt" / "state.msgpack", state)
  target = jax.tree.map(jnp.zeros_like, state)
  r = checkpoint.restore(tmp_path / "ckpt" / "state.msgpack", target)
  assert jax.tree.structure(r) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(state)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.atleast_1d(np.asarray(a)).view(np.uint8),
                                  np.atleast_1d(np.asarray(b)).view(np.uint8))
  bad = {"variables": {"params": {}}}
  with pytest.raises(ValueError):
    checkpoint.restore(tmp_path / "ckpt" / "state.msgpack", bad)
