"""optax composition: quantizer parameters with their own learning rate, no weight decay.

Learned quantizer steps (LSQ scales, PACT clipping levels) are parameters of a very
different kind from weights: they are few, their scale is set by the data range, and
weight decay would pull them to zero (shrinking the range, i.e. clipping everything).
The usual recipe (Esser et al. 2020 train them with the weights but without decay;
many QAT codebases use a smaller learning rate) is expressed in optax with
``optax.multi_transform`` and a decay mask:

  tx = jaxq.optim.quant_aware(
      optax.adamw(1e-3, weight_decay=1e-4, mask=jaxq.optim.decay_mask),
      optax.adam(1e-4))
  opt_state = tx.init(params)

With :func:`jaxq.flax.quantize_model` the quantizer parameters live in "params" under
the reserved names ``jaxq_*`` (see :data:`jaxq.flax.linen.RESERVED_NAMES`);
:func:`split_quant_params` labels them. With the params-tree API the learnable state is a
separate pytree (``qstate``); optimise ``{"params": params, "qstate": qstate}`` with
``optax.multi_transform({"float": ..., "jaxq": ...}, {"params": "float", "qstate":
"jaxq"})`` (labels may be a prefix of the tree), or use :func:`quant_aware`, which labels
everything under a top-level ``"qstate"`` key as quantizer state too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxq.params import key_name

PyTree = Any
QUANT_LABEL = "jaxq"
FLOAT_LABEL = "float"
#: Prefix of every parameter name jaxq adds to a model's "params".
RESERVED_PREFIX = "jaxq_"
#: Top-level key under which :func:`quant_aware` treats a params-API ``qstate``.
QSTATE_KEY = "qstate"

__all__ = ["QUANT_LABEL", "FLOAT_LABEL", "is_quant_param", "split_quant_params",
           "decay_mask", "quant_aware"]


def is_quant_param(path: tuple) -> bool:
  """Whether a ``jax.tree_util`` key path names quantizer state.

  True when any key starts with ``"jaxq_"`` (the reserved names of
  :mod:`jaxq.flax.linen`) or the first key is ``"qstate"``.
  """
  names = [key_name(k) for k in path]
  return bool(names) and (names[0] == QSTATE_KEY
                          or any(n.startswith(RESERVED_PREFIX) for n in names))


def split_quant_params(params: PyTree) -> PyTree:
  """Labels for ``optax.multi_transform``: ``"jaxq"`` for quantizer state, else ``"float"``."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: QUANT_LABEL if is_quant_param(p) else FLOAT_LABEL, params)


def decay_mask(params: PyTree, *, min_rank: int = 2) -> PyTree:
  """Mask for ``optax.adamw(mask=...)``: decay weights of rank >= ``min_rank`` only.

  Quantizer state, biases and normalisation scales (rank 1) get no weight decay.
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, x: (not is_quant_param(p)) and jnp.ndim(x) >= min_rank, params)


def quant_aware(float_tx: optax.GradientTransformation,
                quant_tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``float_tx`` for the model's parameters, ``quant_tx`` for quantizer state."""
  return optax.multi_transform({FLOAT_LABEL: float_tx, QUANT_LABEL: quant_tx},
                               split_quant_params)
