"""jaxq.optim: labels, decay mask, separate learning rate for quantizer parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxq.optim import decay_mask, quant_aware, split_quant_params


def _params():
  return {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,)),
                      "jaxq_weight_scale": jnp.ones((1, 3)), "jaxq_act_scale": jnp.ones((1, 1))}}


def test_labels_and_mask():
  p = _params()
  assert split_quant_params(p) == {"Dense_0": {"kernel": "float", "bias": "float",
                                               "jaxq_weight_scale": "jaxq",
                                               "jaxq_act_scale": "jaxq"}}
  assert decay_mask(p) == {"Dense_0": {"kernel": True, "bias": False,
                                       "jaxq_weight_scale": False, "jaxq_act_scale": False}}
  assert split_quant_params({"params": {"k": jnp.ones(2)}, "qstate": {"k": jnp.ones(2)}}) == {
      "params": {"k": "float"}, "qstate": {"k": "jaxq"}}


def test_quant_aware_lr_and_no_decay():
  p = _params()
  tx = quant_aware(optax.adamw(0.1, weight_decay=0.5, mask=decay_mask), optax.sgd(1e-3))
  opt = tx.init(p)
  g = jax.tree.map(jnp.zeros_like, p)
  u, _ = tx.update(g, opt, p)
  np.testing.assert_allclose(u["Dense_0"]["kernel"], -0.1 * 0.5 * 1.0, rtol=1e-6)  # decay
  np.testing.assert_array_equal(u["Dense_0"]["bias"], 0.0)
  np.testing.assert_array_equal(u["Dense_0"]["jaxq_weight_scale"], 0.0)
  g = jax.tree.map(jnp.ones_like, p)
  u, _ = tx.update(g, opt, p)
  np.testing.assert_allclose(u["Dense_0"]["jaxq_act_scale"], -1e-3, rtol=1e-6)
