"""The contraction a quantizable Flax layer performs, and its 2-D operand views.

A supported layer (Dense/Linear, DenseGeneral/LinearGeneral, Conv, Einsum) computes one
contraction ``compute(lhs, rhs)`` of its input activation ``lhs`` and its kernel ``rhs``.
Quantization works on 2-D views of the two operands: the activation as ``(M, K)`` (its
contracted axes last and flattened; for Conv its channel axis) and the kernel as
``(K, N)`` (contracted axes first; ``N`` = every output feature).

The hooks below replace a layer's contraction op (``dot_general``,
``conv_general_dilated``, ``einsum_op``) by one that hands the :class:`Contraction` to a
``run`` function; the Linen and NNX adapters (:mod:`jaxq.flax`) install them for the
duration of one layer call. Nothing here depends on Flax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Contraction", "kernel_matrix", "resolve_op", "dot_general_contraction",
    "conv_contraction", "einsum_axes", "dot_general_hook", "conv_hook", "einsum_hook",
    "patched", "Run",
]

Run = Callable[["Contraction"], jax.Array]


def _perm_view(x: jax.Array, front: Sequence[int], back: Sequence[int]):
  """``x`` transposed to ``front + back`` and reshaped to ``(prod(front), prod(back))``."""
  perm = tuple(front) + tuple(back)
  xt = x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)
  m = math.prod(x.shape[a] for a in front)
  k = math.prod(x.shape[a] for a in back)
  return xt.reshape(m, k), perm, xt.shape


def _perm_unview(x2: jax.Array, perm, tshape) -> jax.Array:
  xt = x2.reshape(tshape)
  if perm == tuple(range(len(perm))):
    return xt
  return jnp.transpose(xt, np.argsort(perm))


def kernel_matrix(kernel: jax.Array, rhs_contract: Sequence[int]):
  """``(w2 f[K, N], unview)``: ``kernel`` as contracted rows x output columns."""
  free = [a for a in range(kernel.ndim) if a not in rhs_contract]
  w2t, perm, tshape = _perm_view(kernel, free, rhs_contract)
  # _perm_view puts `front` first; we want (K, N): transpose the 2-D view.
  return w2t.T, lambda w2: _perm_unview(w2.T, perm, tshape)


@dataclasses.dataclass
class Contraction:
  """One contraction ``compute(lhs, rhs)`` a quantized layer performs.

  Attributes:
    kind: "dot_general" (Dense/Linear, DenseGeneral/LinearGeneral), "conv" or "einsum".
    lhs: the activation operand (after the layer's dtype promotion and padding).
    rhs: the kernel operand.
    lhs_contract: axes of ``lhs`` that form its ``K`` (for conv: the channel axis).
    rhs_contract: axes of ``rhs`` contracted with the activation (for conv: every
      kernel axis but the last).
    compute: the layer's own op applied to new operands (same arguments otherwise).
    matmul_ok: ``compute(lhs, rhs) == out_from_matrix(lhs_matrix() @ rhs_matrix())``
      (true for dot_general without batch dimensions).
    out_shape: the shape of the result when ``matmul_ok``.
  """

  kind: str
  lhs: jax.Array
  rhs: jax.Array
  lhs_contract: tuple[int, ...]
  rhs_contract: tuple[int, ...]
  compute: Callable[[jax.Array, jax.Array], jax.Array]
  matmul_ok: bool = False
  out_shape: tuple[int, ...] | None = None

  def lhs_matrix(self):
    """``(x2 f[M, K], unview)``: the activation as rows, and the inverse map."""
    free = [a for a in range(self.lhs.ndim) if a not in self.lhs_contract]
    x2, perm, tshape = _perm_view(self.lhs, free, self.lhs_contract)
    return x2, functools.partial(_perm_unview, perm=perm, tshape=tshape)

  def rhs_matrix(self):
    """``(w2 f[K, N], unview)``: the kernel as contracted rows x output columns."""
    return kernel_matrix(self.rhs, self.rhs_contract)

  def out_from_matrix(self, y2: jax.Array) -> jax.Array:
    return y2.reshape(self.out_shape)

  def lhs_contract_size(self) -> int:
    """``K`` of the activation view (the number of input features)."""
    return math.prod(self.lhs.shape[a] for a in self.lhs_contract)

  def inner_contract_size(self) -> int:
    """Length of the innermost contracted kernel axis (groups must divide it)."""
    return int(self.rhs.shape[self.rhs_contract[-1]])


# --------------------------------------------------------------------------------------
# The contraction of each layer kind, and the ops that hand it to a handler
# --------------------------------------------------------------------------------------


def resolve_op(op_cls, op, default):
  """The op a Flax layer calls: ``op_cls()`` when given, else ``op``, else ``default``."""
  if op_cls is not None:
    return op_cls()
  return op if op is not None else default


def dot_general_contraction(lhs, rhs, dimension_numbers, compute, path: str) -> Contraction:
  """The :class:`Contraction` of a ``dot_general`` (no batch dimensions)."""
  (lc, rc), (lb, rb) = dimension_numbers
  if lb or rb:
    raise ValueError(
        f"jaxq cannot quantize layer '{path}': a contraction with batch dimensions "
        "(DenseGeneral batch_dims, LinearGeneral batch_axis) is not supported (exclude it "
        "with a Rule(path=..., weight=None, act=None))")
  lc = tuple(a % lhs.ndim for a in lc)
  rc = tuple(a % rhs.ndim for a in rc)
  out_shape = (tuple(d for a, d in enumerate(lhs.shape) if a not in lc)
               + tuple(d for a, d in enumerate(rhs.shape) if a not in rc))
  return Contraction("dot_general", lhs, rhs, lc, rc, compute, matmul_ok=True,
                     out_shape=out_shape)


def conv_contraction(lhs, rhs, compute) -> Contraction:
  """The :class:`Contraction` of a Flax conv: channels-last input, kernel (..., in, out)."""
  return Contraction("conv", lhs, rhs, (lhs.ndim - 1,), tuple(range(rhs.ndim - 1)), compute)


def einsum_axes(einsum_str: str, path: str, lhs_ndim: int | None = None):
  """``(lhs_contract, rhs_contract, k_axes)`` of an explicit two-operand einsum.

  ``k_axes`` are the kernel axes whose lengths multiply to ``K`` (one per contracted
  input axis); ``lhs_contract`` is None when ``lhs_ndim`` is unknown (the input
  subscripts start with an ellipsis). Raises ValueError naming ``path`` otherwise.
  """
  s = einsum_str.replace(" ", "")
  if "->" not in s or s.count(",") != 1:
    raise ValueError(f"layer '{path}': einsum_str must be explicit with exactly two "
                     f"operands; got {einsum_str!r}")
  ins, out_s = s.split("->")
  lhs_s, rhs_s = ins.split(",")
  if "." in rhs_s:
    raise ValueError(f"layer '{path}': the kernel subscripts of {einsum_str!r} may not use "
                     "an ellipsis")
  if "." in lhs_s:
    if not lhs_s.startswith("..."):
      raise ValueError(f"layer '{path}': jaxq supports an ellipsis only at the start of "
                       f"the input subscripts; got {einsum_str!r}")
    letters = lhs_s[3:]
    offset = None if lhs_ndim is None else lhs_ndim - len(letters)
  else:
    letters, offset = lhs_s, 0
  # Every contracted input axis, by position (a repeated letter names several axes).
  contracted = [(i, c) for i, c in enumerate(letters) if c in rhs_s and c not in out_s]
  if not contracted:
    raise ValueError(f"layer '{path}': {einsum_str!r} contracts no axis")
  lc = None if offset is None else tuple(offset + i for i, _ in contracted)
  rc = tuple(i for i, c in enumerate(rhs_s) if c not in out_s)
  return lc, rc, tuple(rhs_s.index(c) for _, c in contracted)


def dot_general_hook(base, path: str, run: Run):
  """A ``dot_general`` that hands its :class:`Contraction` (computed by ``base`` with the
  caller's arguments, passed on exactly as given) to ``run``."""

  def qdot(lhs, rhs, dimension_numbers, *args, **kwargs):
    return run(dot_general_contraction(
        lhs, rhs, dimension_numbers,
        lambda l, r: base(l, r, dimension_numbers, *args, **kwargs), path))

  return qdot


def conv_hook(base, run: Run):
  """A ``conv_general_dilated`` that hands its :class:`Contraction` to ``run``."""

  def qconv(lhs, rhs, *args, **kwargs):
    return run(conv_contraction(lhs, rhs, lambda l, r: base(l, r, *args, **kwargs)))

  return qconv


def einsum_hook(base, path: str, run: Run):
  """An ``einsum_op(einsum_str, lhs, rhs, ...)`` that hands its :class:`Contraction` to
  ``run``."""

  def qeinsum(einsum_str, lhs, rhs, *args, **kwargs):
    lc, rc, _ = einsum_axes(einsum_str, path, lhs.ndim)
    return run(Contraction("einsum", lhs, rhs, lc, rc,
                           lambda l, r: base(einsum_str, l, r, *args, **kwargs)))

  return qeinsum


@contextlib.contextmanager
def patched(obj, **fields):
  """Sets attributes of ``obj`` (bypassing frozen dataclasses / NNX's ``__setattr__``)
  for the duration of the ``with`` block, then restores the old values."""
  old = {k: getattr(obj, k) for k in fields}
  try:
    for k, v in fields.items():
      object.__setattr__(obj, k, v)
    yield
  finally:
    for k, v in old.items():
      object.__setattr__(obj, k, v)
