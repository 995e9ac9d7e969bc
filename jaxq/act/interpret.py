"""The backward pass of :func:`~jaxq.act.compressed_vjp`, decompressing each residual
right before its first use.

The backward jaxpr is evaluated equation by equation, as ``jax.core.eval_jaxpr`` does;
before the first equation that reads compressed residual ``j``, its codes get a data
dependency on one of that equation's other operands (:func:`after`), so XLA cannot
decompress it earlier: only the float residuals the current step of the backward pass
needs are alive at a time, not the whole set (nor every layer's at once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Literal


def after(c, x: jax.Array):
  """``c`` (a CompressedArray, or any dataclass of them with ``parts``) unchanged in value
  but computed after ``x``: ``lo - min(isnan(x[0]), 0)``.

  ``jax.lax.optimization_barrier`` would say the same, but XLA:CPU expands barriers away
  before scheduling, and its scheduler then hoists the decompression of every layer into
  the forward pass (float activations alive from forward to backward: no memory saved).
  A data dependency survives every pass; ``min(isnan(.), 0)`` is exactly 0 yet not
  foldable, and costs one scalar op per group (``x - (+0) == x`` bitwise, -0 included).
  """
  dep = jnp.minimum(jnp.isnan(x.reshape(-1)[0]).astype(jnp.float32), 0.0)
  if hasattr(c, "parts"):
    return dataclasses.replace(c, parts=tuple(after(p, x) for p in c.parts))
  return dataclasses.replace(c, lo=c.lo - dep)


def _bind(eqn, invals: list) -> list:
  """``eqn`` applied to ``invals`` exactly as ``jax.core.eval_jaxpr`` applies it (its bind
  parameters from ``get_bind_params``, in the equation's context). The one place in jaxq
  that binds jaxpr equations itself: JAX has no public per-equation evaluator."""
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def eval_lazily(closed, compressed: Sequence[Any], others: Sequence[Any],
                decompress: Callable[[Any], jax.Array]) -> list:
  """Evaluates ``closed`` (a ClosedJaxpr over ``len(compressed)`` residuals, then
  ``others``), decompressing ``compressed[j]`` right before the first equation that reads
  it (after one of that equation's floating-point operands, see :func:`after`)."""
  jaxpr = closed.jaxpr
  env: dict[Any, Any] = dict(zip(jaxpr.constvars, closed.consts))
  n = len(compressed)
  env.update(zip(jaxpr.invars[n:], others))
  pending = {v: j for j, v in enumerate(jaxpr.invars[:n])}

  def read(v):
    return v.val if isinstance(v, Literal) else env[v]

  for eqn in jaxpr.eqns:
    need = [v for v in eqn.invars if not isinstance(v, Literal) and v in pending]
    if need:
      anchor = next((read(v) for v in eqn.invars
                     if not isinstance(v, Literal) and v not in pending
                     and isinstance(read(v), jax.Array) and read(v).size
                     and jnp.issubdtype(read(v).dtype, jnp.floating)), None)
      for v in need:
        c = compressed[pending.pop(v)]
        env[v] = decompress(c if anchor is None else after(c, anchor))
    env.update(zip(eqn.outvars, _bind(eqn, [read(v) for v in eqn.invars])))
  for v, j in pending.items():  # residuals only passed through to the outputs
    env[v] = decompress(compressed[j])
  return [read(v) for v in jaxpr.outvars]
