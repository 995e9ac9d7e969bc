"""Flax NNX glue: run an NNX module's method with its activations compressed.

:func:`compressed_call` is the NNX counterpart of :func:`jaxq.act.linen.compressed_call`.
The module's state is split out functionally (``nnx.split``), so that the method becomes
a pure function of the state and the call's array arguments::

    region(state, *arrays) = (method(nnx.merge(graphdef, state), ...), nnx.state(module))

and that function runs under :func:`~jaxq.act.compressed_vjp`. The state (weights,
learned quantizer steps, BatchNorm statistics, observers, rng counters) is an argument
saved as it is, never compressed (Contract 4); gradients flow to its floating-point
leaves. The floating-point positional arrays are the activation inputs and are saved
compressed. The state the method writes (``nnx.BatchNorm`` running statistics in
training mode, jaxq observers, ``nnx.Rngs`` counters) comes out of the region and is
written back to ``module`` with ``nnx.update``, as if the method had run on it directly.

Intended use (what ``jaxq.nnx.quantize_model`` does for ``Rule(act_compress=bits)``)::

    out = compressed_call(block, "__call__", (x,), bits=2, key=rngs.jaxq())
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxq.act.calls import resolve_method, split_arrays
from jaxq.act.vjp import compressed_vjp

__all__ = ["compressed_call"]


def compressed_call(module: nnx.Module, method: str | Callable[..., Any],
                    args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
                    bits: Any, group_size: int = 256, key: jax.Array | None = None,
                    probe: jax.Array | None = None,
                    sample_weight: jax.Array | None = None) -> Any:
  """Calls ``method`` of the NNX ``module`` with its whole computation compressed.

  Equal to ``method(module, *args, **kwargs)`` in the forward pass (bitwise, state
  updates included); in the backward pass every activation the computation saves is
  decompressed from ``bits``-bit per-group codes (ActNN, Chen et al. 2021). Works eagerly
  and under ``nnx.jit`` / ``nnx.grad`` / ``nnx.value_and_grad`` (and ``jax.jit`` /
  ``jax.grad`` of functions that ``nnx.merge`` the module).

  Args:
    module: an ``nnx.Module``.
    method: a method name or an unbound function ``f(module, *args, **kwargs)``; it is
      called on a copy of ``module`` (``nnx.merge`` of its state), so it must not look
      ``module`` up by identity.
    args: positional arguments; floating-point arrays among them are the activation
      inputs and are saved compressed too.
    kwargs: keyword arguments; arrays among them are passed through uncompressed, the
      rest are static.
    bits, group_size: as in :func:`jaxq.act.compressed_vjp` (an int width, a
      :class:`jaxq.act.SampleBits`, or a per-residual tuple).
    key: PRNG key for stochastic rounding; None rounds to nearest.
    probe, sample_weight: as in :func:`jaxq.act.compressed_vjp`.
  """
  if not isinstance(module, nnx.Module):
    raise TypeError(f"module must be a flax.nnx.Module, got {module!r}")
  fn = resolve_method(module, method)
  arrays, act, rebuild = split_arrays(args, kwargs or {})
  graphdef, state = nnx.split(module)

  def region(state, marker, *arrays):
    del marker
    m = nnx.merge(graphdef, state, copy=True)
    a, kw = rebuild(arrays)
    out = fn(m, *a, **kw)
    return out, nnx.state(m)

  # `marker`, a float scalar, is always listed as an activation: with no listed position
  # compressed_vjp would count every argument (the state too) as an activation.
  compress_args = (1,) + tuple(2 + j for j in act)
  g = compressed_vjp(region, bits=bits, group_size=group_size, compress_args=compress_args)
  out, new_state = g(state, jnp.zeros((), jnp.float32), *arrays, key=key, probe=probe,
                     sample_weight=sample_weight)
  nnx.update(module, new_state)
  return out
