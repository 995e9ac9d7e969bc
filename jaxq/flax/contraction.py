"""The contraction of a quantized Flax layer call, its 2-D operand views, and the
quantization of those views: the one implementation that the Linen wrapper
(:mod:`jaxq.flax.linen`, and PTQ through it) and the NNX wrapper (:mod:`jaxq.flax.nnx`)
share. Nothing here depends on Linen or NNX; where the two keep their quantizer state
(Linen variables / NNX attributes) each wrapper passes in its own reader.

Operand views. A supported layer (Dense/Linear, DenseGeneral/LinearGeneral, Conv, Einsum)
computes one contraction ``compute(lhs, rhs)`` of its input activation ``lhs`` and its
kernel ``rhs``. Quantization works on 2-D views of the two operands: the activation as
``(M, K)`` (its contracted axes last and flattened; for Conv its channel axis) and the
kernel as ``(K, N)`` (contracted axes first; ``N`` = every output feature). Hence, for
weights, ``granularity="channel"`` is one scale per output feature (all non-contracted
kernel axes; ``spec.axis`` must name one of them, :func:`jaxq.params.check_weight_axis`)
and ``"group"`` groups ``group_size`` consecutive elements of the innermost contracted
kernel axis, which it must divide: the semantics of :func:`jaxq.quantize_params` on the
same kernel, bit for bit. For activations,
"tensor" is one scale, "channel" one per contracted feature, "group" one per group of
features (shared by all rows), and ``dynamic=True`` ranges per row (token) at run time.
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
from jax import lax

from jaxq import calibration
from jaxq import quantizer
from jaxq.params import check_weight_axis
from jaxq.spec import QuantSpec

__all__ = [
    "Contraction", "kernel_matrix", "resolve_op", "dot_general_contraction",
    "conv_contraction", "einsum_axes", "dot_general_hook", "conv_hook", "einsum_hook",
    "patched", "weight_view_spec", "act_view_spec", "is_learned", "is_observed",
    "state_names", "act_stat_shape", "observer_view", "weight_observer_qparams",
    "weight_qparams", "fake_quantized_compute", "RNG_STREAM", "ACT_STATS", "WEIGHT_SCALE",
    "WEIGHT_ZERO_POINT", "WEIGHT_ALPHA", "ACT_SCALE", "ACT_ZERO_POINT", "ACT_ALPHA",
    "WEIGHT_NAMES", "ACT_NAMES",
]

#: rng stream (Linen) / ``nnx.Rngs`` stream (NNX) of stochastic-rounding keys.
RNG_STREAM = "jaxq"
#: The activation observer's state (Linen "quant_stats" variable, NNX attribute).
ACT_STATS = "jaxq_act"
WEIGHT_SCALE, WEIGHT_ZERO_POINT, WEIGHT_ALPHA = (
    "jaxq_weight_scale", "jaxq_weight_zero_point", "jaxq_weight_alpha")
ACT_SCALE, ACT_ZERO_POINT, ACT_ALPHA = ("jaxq_act_scale", "jaxq_act_zero_point",
                                        "jaxq_act_alpha")
#: ``(scale, zero_point, alpha)`` names of the learned weight / activation steps.
WEIGHT_NAMES = (WEIGHT_SCALE, WEIGHT_ZERO_POINT, WEIGHT_ALPHA)
ACT_NAMES = (ACT_SCALE, ACT_ZERO_POINT, ACT_ALPHA)
_LEARNED_ESTIMATORS = ("lsq", "pact")
_ONE_SHOT_CALIBRATIONS = ("percentile", "mse")

Run = Callable[["Contraction"], jax.Array]


# --------------------------------------------------------------------------------------
# 2-D views
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Specs on the operand views
# --------------------------------------------------------------------------------------


def weight_view_spec(spec: QuantSpec, path: str, kernel_shape: Sequence[int],
                     rhs_contract: Sequence[int]) -> QuantSpec:
  """``spec`` as it applies to the ``(K, N)`` kernel view (checked against the kernel)."""
  if spec.scheme != "uniform":
    raise ValueError(f"layer '{path}': weight QuantSpec.scheme must be 'uniform'; got "
                     f"{spec.scheme!r} (log2/ptf are activation schemes)")
  check_weight_axis(spec, path, kernel_shape, rhs_contract)
  if spec.granularity == "group":
    inner = kernel_shape[rhs_contract[-1]]
    if inner % spec.group_size:
      raise ValueError(
          f"layer '{path}': weight group_size={spec.group_size} does not divide the "
          f"kernel's input axis (length {inner}, kernel shape {tuple(kernel_shape)})")
  return spec if spec.granularity == "tensor" else spec.replace(axis=-1)


def act_view_spec(spec: QuantSpec, path: str, k: int) -> QuantSpec:
  """``spec`` as it applies to the ``(M, K)`` activation view (``k`` input features)."""
  if spec.granularity == "group" and k % spec.group_size:
    raise ValueError(f"layer '{path}': activation group_size={spec.group_size} does not "
                     f"divide the number of input features {k}")
  if spec.dynamic:
    if spec.estimator != "ste" or spec.scheme != "uniform":
      raise ValueError(f"layer '{path}': a dynamic activation spec computes its range "
                       "per row at run time; it needs estimator='ste', scheme='uniform'")
    if spec.granularity == "channel":
      raise ValueError(f"layer '{path}': dynamic=True quantizes per row (token); use "
                       "granularity 'tensor' (per row) or 'group' (per row and group)")
    if spec.granularity == "tensor":
      return spec.replace(granularity="channel", axis=0)
    return spec.replace(axis=0)
  if spec.granularity == "channel" and spec.axis != -1:
    raise ValueError(f"layer '{path}': an activation 'channel' spec is per input feature "
                     f"(axis=-1); got axis={spec.axis}")
  return spec if spec.granularity == "tensor" else spec.replace(axis=-1)


def is_learned(spec: QuantSpec | None, *, act: bool) -> bool:
  """Whether ``spec``'s step is a learned parameter (LSQ, LSQ+, PACT on a uniform grid).

  ``dynamic`` is an activation option: a dynamic activation spec has no learned step; on
  a weight spec the flag has no effect.
  """
  return (spec is not None and spec.scheme == "uniform"
          and spec.estimator in _LEARNED_ESTIMATORS and not (act and spec.dynamic))


def is_observed(spec: QuantSpec | None) -> bool:
  """Whether an activation ``spec`` keeps its range in an observer
  (:mod:`jaxq.calibration`; "ema", "percentile", "mse" without a learned step)."""
  return (spec is not None and spec.scheme == "uniform" and not spec.dynamic
          and not is_learned(spec, act=True) and spec.calibration != "minmax")


def state_names(spec: QuantSpec, names: tuple[str, str, str]) -> dict[str, str]:
  """``{state key: variable name}`` of a learned quantizer (``names``: scale, zero
  point, alpha), in creation order."""
  scale, zp, alpha = names
  if spec.estimator == "pact":
    return {"alpha": alpha}
  if spec.symmetric:
    return {"scale": scale}
  return {"scale": scale, "zero_point": zp}


def act_stat_shape(spec: QuantSpec, k: int) -> tuple[int, ...]:
  """Shape of an activation quantizer's step / observer range for ``k`` input features."""
  return quantizer.stat_shape((1, k), spec, 1)


# --------------------------------------------------------------------------------------
# Quantizing the operand views
# --------------------------------------------------------------------------------------


def observer_view(v2: jax.Array, spec: QuantSpec, group_axis: int):
  """``(view, axes)`` an observer of the 2-D operand view ``v2`` reduces (no gradient)."""
  view = quantizer.quant_view(lax.stop_gradient(v2), spec, group_axis)
  return view, quantizer.quant_axes(2, spec, group_axis)


def weight_observer_qparams(spec: QuantSpec, w2: jax.Array) -> dict[str, jax.Array]:
  """``{"scale", "zero_point"}`` of a one-shot observer (``spec.calibration``) of the
  ``(K, N)`` kernel view ``w2``."""
  w = w2.astype(jnp.float32)
  st = calibration.observer_init(spec, quantizer.stat_shape(w.shape, spec, 0))
  view, axes = observer_view(w, spec, 0)
  st = calibration.observer_update(st, view, spec, axes)
  scale, zp = calibration.observer_qparams(st, spec)
  return {"scale": scale, "zero_point": zp}


def weight_qparams(spec: QuantSpec, w2: jax.Array,
                   learned: Callable[[], dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """:func:`jaxq.quantizer.fake_quantize` kwargs of the kernel view ``w2 (K, N)``:
  ``learned()`` (the layer's learned step) for LSQ/PACT, a one-shot observer range for
  "percentile" / "mse", and ``{}`` (min-max of ``w2``) otherwise."""
  if is_learned(spec, act=False):
    return learned()
  if spec.calibration in _ONE_SHOT_CALIBRATIONS:
    return weight_observer_qparams(spec, w2)
  return {}


def fake_quantized_compute(op: Contraction, wspec: QuantSpec | None,
                           aspec: QuantSpec | None,
                           weight_kwargs: Callable[[jax.Array], dict[str, jax.Array]],
                           act_kwargs: Callable[[jax.Array], dict[str, jax.Array]],
                           rng: Callable[[], jax.Array | None]) -> jax.Array:
  """``op.compute(Q_a(lhs), Q_w(rhs))``: the operands quantize-dequantized on their views.

  ``wspec`` / ``aspec`` (None: that operand stays in float) are the view specs
  (:func:`weight_view_spec`, :func:`act_view_spec`); the kernel view ``w2 (K, N)`` is
  quantized with ``group_axis=0`` and ``**weight_kwargs(w2)``, the activation view
  ``x2 (M, K)`` with ``group_axis=1`` and ``**act_kwargs(x2)``
  (:func:`jaxq.quantizer.fake_quantize`). ``rng()`` (a key, or None: round to nearest)
  is called once when a spec rounds stochastically; its two halves go to the weight
  and the activation.
  """
  lhs, rhs = op.lhs, op.rhs
  needs_key = any(s is not None and s.rounding == "stochastic" for s in (wspec, aspec))
  key = rng() if needs_key else None
  kw_key, ka_key = (None, None) if key is None else tuple(jax.random.split(key))
  if wspec is not None:
    w2, w_unview = op.rhs_matrix()
    rhs = w_unview(quantizer.fake_quantize(w2, wspec, group_axis=0, key=kw_key,
                                           require_key=False, **weight_kwargs(w2)))
  if aspec is not None:
    x2, x_unview = op.lhs_matrix()
    lhs = x_unview(quantizer.fake_quantize(x2, aspec, group_axis=1, key=ka_key,
                                           require_key=False, **act_kwargs(x2)))
  return op.compute(lhs, rhs)
