"""The backward pass of :func:`~jaxq.act.compressed_vjp`, decompressing each residual
right before its first use.

The backward jaxpr is evaluated equation by equation, as ``jax.core.eval_jaxpr`` does;
before the first equation that reads compressed residual ``j``, its codes get a data
dependency on one of that equation's other operands (:func:`after`), so XLA cannot
decompress it earlier: only the float residuals the current step of the backward pass
needs are alive at a time, not the whole set (nor every layer's at once). Residuals kept
as they are get the same dependency (see :func:`eval_lazily`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Literal


def zero_after(x: jax.Array) -> jax.Array:
  """``min(isnan(x[0]), 0)``: exactly ``+0.0`` (``y - (+0) == y`` bitwise, -0 included),
  computed after ``x``."""
  return jnp.minimum(jnp.isnan(x.reshape(-1)[0]).astype(jnp.float32), 0.0)


def after(c, x: jax.Array):
  """``c`` (a CompressedArray, or any dataclass of them with ``parts``) unchanged in value
  but computed after ``x``: ``lo - dep`` and ``packed | dep`` with ``dep =``
  :func:`zero_after` ``(x)`` (the codes too: else XLA unpacks them, 4x their size, as
  soon as they are packed).

  ``jax.lax.optimization_barrier`` would say the same, but XLA:CPU expands barriers away
  before scheduling, and its scheduler then hoists the decompression of every layer into
  the forward pass (float activations alive from forward to backward: no memory saved).
  A data dependency survives every pass; ``min(isnan(.), 0)`` is exactly 0 yet not
  foldable, and costs one op per group and per byte of codes.
  """
  dep = zero_after(x)
  if hasattr(c, "parts"):
    return dataclasses.replace(c, parts=tuple(after(p, x) for p in c.parts))
  return dataclasses.replace(c, lo=c.lo - dep, packed=c.packed | dep.astype(c.packed.dtype))


def bind_equation(eqn, invals: list) -> list:
  """``eqn`` applied to ``invals`` exactly as ``jax.core.eval_jaxpr`` applies it (its bind
  parameters from ``get_bind_params``, in the equation's context). The one place in jaxq
  that binds jaxpr equations itself: JAX has no public per-equation evaluator."""
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def eval_lazily(closed, compressed: Sequence[Any], kept: Sequence[Any],
                cts: Sequence[Any], decompress: Callable[[Any], jax.Array]) -> list:
  """Evaluates ``closed`` (a ClosedJaxpr over the residuals ``compressed``, then ``kept``,
  then the output cotangents ``cts``), decompressing ``compressed[j]`` right before the
  first equation that reads it (after one of that equation's floating-point operands,
  see :func:`after`).

  A floating-point ``kept[i]`` is likewise read there as ``kept[i] - (+0)``, computed
  after that operand. Otherwise XLA's common-subexpression elimination merges what the
  backward pass computes from it with the forward pass's identical computation and keeps
  the result alive from forward to backward: the full-size broadcast of LayerNorm's
  ``1/sigma`` or of its scale, a weight's transposed copy (measured: the compiled step's
  temporaries grew by ~16 MB per ViT-Tiny block at batch 64, more than its 2-bit codes).
  """
  jaxpr = closed.jaxpr
  env: dict[Any, Any] = dict(zip(jaxpr.constvars, closed.consts))
  n, m = len(compressed), len(kept)
  env.update(zip(jaxpr.invars[n:], list(kept) + list(cts)))
  pending = {v: j for j, v in enumerate(jaxpr.invars[:n])}
  delayed = {v for v, x in zip(jaxpr.invars[n:n + m], kept)
             if jnp.issubdtype(x.dtype, jnp.floating)}

  def read(v):
    return v.val if isinstance(v, Literal) else env[v]

  def is_anchor(v):
    if isinstance(v, Literal) or v in pending or v in delayed:
      return False
    x = read(v)
    return isinstance(x, jax.Array) and x.size and jnp.issubdtype(x.dtype, jnp.floating)

  for eqn in jaxpr.eqns:
    need = [v for v in eqn.invars
            if not isinstance(v, Literal) and (v in pending or v in delayed)]
    if need:
      anchor = next((read(v) for v in eqn.invars if is_anchor(v)), None)
      for v in need:
        if v in delayed:
          delayed.discard(v)
          if anchor is not None:
            env[v] = env[v] - zero_after(anchor).astype(env[v].dtype)
        else:
          c = compressed[pending.pop(v)]
          env[v] = decompress(c if anchor is None else after(c, anchor))
    env.update(zip(eqn.outvars, bind_equation(eqn, [read(v) for v in eqn.invars])))
  for v, j in pending.items():  # residuals only passed through to the outputs
    env[v] = decompress(compressed[j])
  return [read(v) for v in jaxpr.outvars]
