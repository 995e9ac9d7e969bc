"""LoRA on one contraction: a low-rank adapter over a frozen (quantized) kernel.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") learns
``W + (alpha / r) A B`` with the kernel ``W`` frozen; QLoRA (Dettmers et al. 2023) keeps
``W`` in 4 bits (NF4, :mod:`jaxq.nf4`). On the 2-D views of :mod:`jaxq.layer.views`
(activation ``x2 (M, K)``, kernel ``w2 (K, N)``) a matched layer computes

    y = base(x) + (alpha / r) * out(dropout(x2) @ A @ B),   A: (K, r), B: (r, N)

where ``base`` is the layer's own (quantized, QAT or frozen-QArray) contraction with the
kernel behind ``lax.stop_gradient`` (:func:`frozen_base`), so the kernel gets no
gradient, and the rule's activation spec applies to ``base`` only: the adapter sees the
float input. By kind (:func:`lora_contraction`):

* dot_general (Dense, DenseGeneral with several contracted / output axes): the views
  are exact, ``out`` reshapes ``(M, N)`` to the layer's output (``op.out_from_matrix``);
  cost ``M r (K + N)``.
* conv (no feature groups): ``A`` reshaped to a ``(window..., in, r)`` kernel runs
  through the layer's own conv (same strides, padding, dilation), then a 1x1 ``(r, N)``
  conv ``B`` (a matmul over the channel axis). Exact because the ``(K, N)`` view of a
  conv kernel ``(window..., in, out)`` flattens ``(window..., in)`` row-major, as the
  reshape of ``A`` does: ``conv(x, unview(A B)) = conv(x, A_kernel) @ B``.
* einsum, grouped conv: their ``(K, N)`` view need not match the activation's ``K``
  order (an einsum may contract ``lhs`` axes in another order than the kernel's) or the
  contraction is not a matmul on the views, so the adapter runs as the layer's own op
  on the kernel-shaped update: ``compute(dropout(x), unview((alpha / r) A B))``. Exact
  by linearity of the contraction in the kernel; it costs one more contraction of the
  layer's size (instead of rank ``r``) and a ``K x N`` temporary.

Initialisation (PEFT's, after Hu et al.): ``A ~ U(-1/sqrt(K), 1/sqrt(K))`` (the
Kaiming-uniform bound with ``a = sqrt(5)``, i.e. a default Dense/Conv init on ``K``
fan-in), ``B = 0``, so the adapted layer starts equal to its base. Dropout (rate ``p``,
inverted: kept inputs scaled by ``1 / (1 - p)``) masks the adapter's input only, when a
key is given (training); without one it is off (evaluation).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxq.layer import nf4_base
from jaxq.layer.views import Contraction, kernel_matrix
from jaxq.qarray import QArray, dequantize
from jaxq.spec import LoRA, QuantSpec

__all__ = ["LORA_A", "LORA_B", "DROPOUT_STREAM", "kernel_view_shape", "lora_shapes",
           "init_lora", "check_lora_params", "frozen_base", "base_weight_spec",
           "lora_contraction", "merge_kernel", "check_lora_matches"]

#: Names of the adapter matrices in a layer's "params" (Linen) / attributes (NNX).
LORA_A, LORA_B = "lora_a", "lora_b"
#: rng stream (Linen) / ``nnx.Rngs`` stream (NNX) of the adapter's dropout.
DROPOUT_STREAM = "dropout"


def kernel_view_shape(kernel_shape: Sequence[int], rhs_contract: Sequence[int]
                      ) -> tuple[int, int]:
  """``(K, N)`` of a kernel's 2-D view: contracted axes x every other axis."""
  nd = len(kernel_shape)
  contracted = {a % nd for a in rhs_contract}
  k = math.prod(kernel_shape[a] for a in contracted)
  n = math.prod(d for a, d in enumerate(kernel_shape) if a not in contracted)
  return k, n


def lora_shapes(op: Contraction, lora: LoRA) -> tuple[tuple[int, int], tuple[int, int]]:
  """Shapes of ``(A, B)`` for the contraction ``op``: ``((K, r), (r, N))``."""
  k, n = kernel_view_shape(op.rhs.shape, op.rhs_contract)
  return (k, lora.rank), (lora.rank, n)


def init_lora(key: jax.Array, k: int, n: int, rank: int, dtype=jnp.float32
              ) -> tuple[jax.Array, jax.Array]:
  """``(A, B)``: ``A ~ U(-1/sqrt(k), 1/sqrt(k))`` of shape ``(k, rank)``, ``B = 0`` of
  shape ``(rank, n)`` (module docstring)."""
  bound = 1.0 / math.sqrt(k)
  a = jax.random.uniform(key, (k, rank), dtype, -bound, bound)
  return a, jnp.zeros((rank, n), dtype)


def check_lora_params(op: Contraction, path: str, lora: LoRA, a, b) -> None:
  """ValueError naming ``path`` unless ``a`` / ``b`` have :func:`lora_shapes`."""
  want_a, want_b = lora_shapes(op, lora)
  for name, x, want in ((LORA_A, a, want_a), (LORA_B, b, want_b)):
    if tuple(jnp.shape(x)) != want:
      raise ValueError(
          f"layer '{path}': {name} has shape {tuple(jnp.shape(x))}; a LoRA of rank "
          f"{lora.rank} on a kernel of shape {tuple(op.rhs.shape)} (view K x N = "
          f"{want_a[0]} x {want_b[1]}) needs {want}")


def frozen_base(op: Contraction, path: str, kernel: jax.Array | QArray | None = None
                ) -> Contraction:
  """``op`` on the frozen base kernel: ``stop_gradient`` of ``kernel`` (default
  ``op.rhs``), dequantized in ``op.rhs``'s dtype when it is a :class:`QArray` (the
  frozen base after :func:`jaxq.lora.freeze`; ``op.rhs`` is then a placeholder of its
  shape): by the op's ``compute``, blockwise, for a 2-D NF4 Dense kernel
  (:mod:`jaxq.layer.nf4_base`: no float copy kept for the backward pass)."""
  if kernel is None:
    kernel = op.rhs
  if isinstance(kernel, QArray):
    if kernel.shape != tuple(op.rhs.shape):
      raise ValueError(f"layer '{path}': its frozen QArray kernel has shape "
                       f"{kernel.shape}; the layer expects {tuple(op.rhs.shape)}")
    if nf4_base.applies(op, kernel):  # no float copy kept for the backward pass
      return dataclasses.replace(op, compute=nf4_base.nf4_base_compute(op, kernel))
    kernel = dequantize(kernel).astype(op.rhs.dtype)
  return Contraction(op.kind, op.lhs, lax.stop_gradient(kernel), op.lhs_contract,
                     op.rhs_contract, op.compute, op.matmul_ok, op.out_shape)


def base_weight_spec(weight: QuantSpec | None, kernel) -> QuantSpec | None:
  """The weight spec of the base path: the rule's for a float kernel (fake-quantized
  as in QAT), None for a frozen QArray kernel (already quantized)."""
  return None if isinstance(kernel, QArray) else weight


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if rate == 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def _low_rank_conv(op: Contraction) -> bool:
  """A conv without feature groups: its kernel's input axis is the input's channels."""
  return op.kind == "conv" and op.rhs.shape[-2] == op.lhs.shape[-1]


def lora_contraction(op: Contraction, base_result: jax.Array, a: jax.Array, b: jax.Array,
                     lora: LoRA, dropout_key: jax.Array | None = None) -> jax.Array:
  """``base_result + (alpha / r) * adapter(dropout(op.lhs))`` (module docstring).

  Args:
    op: the layer's contraction (its ``lhs`` is the float input the adapter sees).
    base_result: the layer's base output, e.g. ``qat_contraction(frozen_base(op, ...),
      ...)``; the result has its dtype.
    a, b: the adapter ``(K, r)`` and ``(r, N)`` (:func:`lora_shapes`), cast to the
      input's dtype for the products.
    lora: the rule's :class:`~jaxq.LoRA`.
    dropout_key: a PRNG key for the adapter's input dropout; None turns it off.
  """
  dtype = op.lhs.dtype
  a, b = jnp.asarray(a).astype(dtype), jnp.asarray(b).astype(dtype)
  if op.matmul_ok:
    x2, _ = op.lhs_matrix()
    x2 = _dropout(x2, lora.dropout, dropout_key)
    return _add(base_result, op.out_from_matrix((x2 @ a) @ b), lora)
  x = _dropout(op.lhs, lora.dropout, dropout_key)
  if _low_rank_conv(op):
    a_kernel = a.reshape(tuple(op.rhs.shape[:-1]) + (lora.rank,))
    delta = op.compute(x, a_kernel) @ b
  else:
    _, unview = kernel_matrix(op.rhs, op.rhs_contract)
    delta = op.compute(x, unview(a @ b).astype(op.rhs.dtype))
  return _add(base_result, delta, lora)


def _add(base_result: jax.Array, delta: jax.Array, lora: LoRA) -> jax.Array:
  scaled = delta * jnp.asarray(lora.scaling, delta.dtype)
  return base_result + scaled.astype(base_result.dtype)


def merge_kernel(kernel: jax.Array | QArray, a: jax.Array, b: jax.Array, lora: LoRA,
                 rhs_contract: Sequence[int]) -> jax.Array:
  """The float kernel ``W + (alpha / r) A B``, the update mapped back through the
  ``(K, N)`` view of the contraction over ``rhs_contract``; ``W`` is the dequantized
  base when ``kernel`` is a :class:`QArray`. Computed in float32 (HIGHEST precision),
  returned in the kernel's dtype."""
  w = dequantize(kernel) if isinstance(kernel, QArray) else jnp.asarray(kernel)
  w2, unview = kernel_matrix(w, tuple(ax % w.ndim for ax in rhs_contract))
  update = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                      precision=lax.Precision.HIGHEST)
  if update.shape != w2.shape:
    raise ValueError(f"A @ B has shape {update.shape}; the kernel of shape "
                     f"{tuple(w.shape)} contracted over {tuple(rhs_contract)} has the "
                     f"view {w2.shape}")
  return unview(w2.astype(jnp.float32) + lora.scaling * update).astype(w.dtype)


def check_lora_matches(rules: Sequence, adapted: set[int],
                       unadaptable: Mapping[int, Sequence[str]], layers: str) -> None:
  """ValueError for a rule with ``lora`` that adapted no layer although it matched
  modules owning parameters that are not an adaptable layer (e.g. a LayerNorm):
  ``unadaptable`` maps a rule's index to those modules ("'path' (Class)"), ``adapted``
  holds the indices of the rules that adapted a layer, ``layers`` names the adaptable
  classes. (A module owning a kernel jaxq cannot adapt, e.g. an Embed, is an error
  wherever it is matched; containers are not counted.)"""
  for i, found in unadaptable.items():
    if i not in adapted and rules[i].lora is not None:
      raise ValueError(
          f"rule {rules[i].path!r} has Rule.lora={rules[i].lora} but matches only modules "
          f"jaxq cannot adapt: {', '.join(found)}; LoRA adapts {layers}")
