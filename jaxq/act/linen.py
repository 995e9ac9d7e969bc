"""Flax Linen glue: run a bound module's method with its activations compressed.

:func:`compressed_call` lifts a method call through ``flax.core.lift.pack`` (the machinery
of Flax's own ``nn.custom_vjp``/``nn.remat``) into a pure function of the module's
variables and the call's arguments, and runs that under
:func:`~jaxq.act.compressed_vjp`: parameters are arguments saved as they are (gradients
flow to them), the floating-point positional inputs are compressed activations. Module
paths, rng streams and method interceptors inside the region behave as without it, and
mutable collections (``batch_stats``, ``intermediates``, ...) are updated as usual (their
new values are outputs of the region, not differentiated).

Intended use is inside an ``nn.intercept_methods`` interceptor::

    def interceptor(next_fun, args, kwargs, ctx):
      if isinstance(ctx.module, EncoderBlock) and ctx.method_name == "__call__":
        return compressed_call(ctx.module, ctx.method_name, args, kwargs, bits=2,
                               key=key)
      return next_fun(*args, **kwargs)

Running the method inside the lifted region calls the interceptors again on a clone of
the module (same path, same class); :func:`compressed_call` recognises that nested call of
the clone and runs its method body directly, so an interceptor that always answers with
``compressed_call`` does not recurse.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import lift
from flax.linen import transforms as nn_transforms

from jaxq.act.adaptive import has_sample_bits
from jaxq.act.calls import resolve_method
from jaxq.act.vjp import compressed_vjp

_state = threading.local()


@contextlib.contextmanager
def sample_weights(weight: jax.Array):
  """Per-sample gradient-norm estimates (``f32[B]``) for every :func:`compressed_call`
  with :class:`~jaxq.act.SampleBits` widths inside the block that passes no
  ``sample_weight`` itself, e.g. the regions of ``Rule(act_compress=SampleBits(...))``
  in a ``quantize_model`` wrapper::

    with jaxq.act.linen.sample_weights(g_est[idx]):
      logits = qmodel.apply(variables, x, rngs={"jaxq": key})

  Regions with a plain integer width ignore it. Enter it where the model is applied
  (inside the jitted loss when ``weight`` is traced). Nests; the innermost wins.
  """
  stack = _weight_stack()
  stack.append(weight)
  try:
    yield
  finally:
    stack.pop()


def _weight_stack() -> list:
  if not hasattr(_state, "weights"):
    _state.weights = []
  return _state.weights


def _plain_calls() -> set:
  if not hasattr(_state, "plain"):
    _state.plain = set()
  return _state.plain


def _raw(fn: Callable[..., Any]) -> Callable[..., Any]:
  """The user's function under Flax's method-state wrapper (no interceptors)."""
  return fn.__wrapped__ if getattr(fn, "method_handler_wrapped", False) else fn


def _is_dynamic(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray))


def _lifted_transform(body, *, bits, group_size, key, probe, sample_weight, act_positions):
  """``flax.core.lift``-level transform of ``body(scope, *dyn)`` under compressed_vjp."""

  def inner(scope_fn, repack_fn, variable_groups, rng_groups, *dyn):
    params, others = variable_groups

    def f(params, others, *dyn):
      scope = scope_fn((params, others), rng_groups)
      y = body(scope, *dyn)
      return y, repack_fn(scope)

    g = compressed_vjp(f, bits=bits, group_size=group_size,
                       compress_args=tuple(2 + p for p in act_positions))
    return g(params, others, *dyn, key=key, probe=probe, sample_weight=sample_weight)

  return lift.pack(inner, ("params", True), ("params", True), (True,),
                   name="jaxq_compressed")


def compressed_call(module: nn.Module, method: str | Callable[..., Any],
                    args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
                    bits: Any, group_size: int = 256, key: jax.Array | None = None,
                    probe: jax.Array | None = None,
                    sample_weight: jax.Array | None = None) -> Any:
  """Calls ``method`` of the bound ``module`` with its whole computation compressed.

  Equivalent to ``getattr(module, method)(*args, **kwargs)`` in the forward pass
  (bitwise); in the backward pass every activation the method's computation saves is
  decompressed from ``bits``-bit per-group codes (ActNN, Chen et al. 2021). Works in
  ``init`` and ``apply`` (outer ``jax.jit``/``jax.grad``), with rngs and mutable
  collections.

  Args:
    module: a bound Linen module (e.g. ``ctx.module`` in an interceptor).
    method: a method name (``ctx.method_name``) or an unbound function
      ``f(module, *args, **kwargs)``.
    args: positional arguments; floating-point arrays among them are the activation
      inputs and are saved compressed too.
    kwargs: keyword arguments; arrays among them are passed through uncompressed, the
      rest are static.
    bits, group_size: as in :func:`jaxq.act.compressed_vjp`: an int width, a
      :class:`jaxq.act.SampleBits` (per-sample widths; the batch is the leading axis of
      the first floating-point positional argument), or a per-residual tuple.
    key: PRNG key for stochastic rounding; None rounds to nearest.
    probe: optional ``f32[3]`` whose gradient receives the statistics of
      :mod:`jaxq.act.adaptive` for this call.
    sample_weight: with :class:`jaxq.act.SampleBits` widths, each sample's gradient-norm
      estimate (``f32[B]``), as in :func:`jaxq.act.compressed_vjp`; default: the
      innermost :func:`sample_weights` block's, if any.
  """
  if not isinstance(module, nn.Module) or module.scope is None:
    raise TypeError(f"module must be a bound flax.linen.Module, got {module!r}")
  fn = resolve_method(module, method)
  kwargs = dict(kwargs or {})
  if sample_weight is None and _weight_stack() and has_sample_bits(bits):
    sample_weight = _weight_stack()[-1]
  plain = _plain_calls()
  if id(module) in plain:
    # The nested call of the clone this function itself issued: run the body.
    plain.discard(id(module))
    return _raw(fn)(module, *args, **kwargs)

  leaves, treedef = jax.tree_util.tree_flatten((tuple(args), kwargs))
  dyn_idx = [i for i, l in enumerate(leaves) if _is_dynamic(l)]
  n_pos = len(jax.tree_util.tree_leaves(tuple(args)))
  act_positions = [j for j, i in enumerate(dyn_idx)
                   if i < n_pos and jnp.issubdtype(leaves[i].dtype, jnp.floating)]
  static = [None if i in set(dyn_idx) else l for i, l in enumerate(leaves)]

  def _jaxq_compressed_region(mdl, *dyn):
    full = list(static)
    for i, v in zip(dyn_idx, dyn):
      full[i] = v
    a, kw = jax.tree_util.tree_unflatten(treedef, full)
    plain.add(id(mdl))
    try:
      return fn(mdl, *a, **kw)
    finally:
      plain.discard(id(mdl))

  def transform(core_fn):
    return _lifted_transform(core_fn, bits=bits, group_size=group_size, key=key,
                             probe=probe, sample_weight=sample_weight,
                             act_positions=act_positions)

  lifted = nn_transforms.decorator_lift_transform(transform, _jaxq_compressed_region,
                                                    multi_scope=False)
  return lifted(module, *[leaves[i] for i in dyn_idx])
