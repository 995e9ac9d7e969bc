"""A ``jax.checkpoint`` policy for regions that contain :func:`~jaxq.act.compressed_vjp`.

``policy`` saves exactly the residuals that :func:`~jaxq.act.compressed_vjp` stores (the
bit-packed codes with their per-group ``lo``/``scale``, named ``jaxq_act_packed``, and the
residuals it keeps as they are, named ``jaxq_act_kept``) and nothing else. Inside a
compressed region nothing is then recomputed in the backward pass (the compressed codes
replace the float activations there); everything outside compressed regions is recomputed,
as with ``jax.checkpoint``'s default full rematerialisation. Use::

    block = nn.remat(Block, policy=jaxq.act.policy)
    f = jax.checkpoint(f, policy=jaxq.act.policy)

Combine with another policy via ``jax.checkpoint_policies.save_from_both_policies``.
"""

from __future__ import annotations

import jax

from jaxq.act.vjp import KEPT_NAME, PACKED_NAME

#: Names attached (``jax.ad_checkpoint.checkpoint_name``) to compressed_vjp's residuals.
NAMES = (PACKED_NAME, KEPT_NAME)

policy = jax.checkpoint_policies.save_only_these_names(*NAMES)
