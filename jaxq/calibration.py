"""Range observers: pure functions over explicit state, for calibration (PTQ) and QAT.

An observer turns a stream of tensors into a real range ``[lo, hi]`` per slice, from
which :func:`observer_qparams` derives ``(scale, zero_point)``. The state is a dict
pytree of float32 arrays with static shapes, so it can live in a Flax variable
collection and be updated inside ``jit``::

  state = observer_init(spec, stat_shape)
  for x in batches:
    state = observer_update(state, x, spec, axes)  # reduce x over `axes` (keepdims)
  scale, zero_point = observer_qparams(state, spec)

State: ``{"lo": f32[stat_shape], "hi": f32[stat_shape], "n": f32[stat_shape]}`` for
every method, where ``n`` counts the batches that contributed to each slice:

* "minmax": running min / max of the data (the PyTorch ``MinMaxObserver``).
* "ema": ``lo`` / ``hi`` hold the *biased* EMA of the per-batch min / max,
  ``b <- decay * b + (1 - decay) * v`` starting from ``b = 0``; the range is the
  bias-corrected ``b / (1 - decay^n)`` (Distiller, ``quantization/range_linear.py``,
  ``update_ema`` of ``FakeLinearQuantization``), ``decay = spec.ema_decay``.
* "percentile": running mean over batches of the per-batch percentiles: with a signed
  symmetric spec ``hi = P_p(|x|)`` and ``lo = -hi``; otherwise each tail,
  ``lo = P_{100-p}(x)``, ``hi = P_p(x)``; ``p = spec.percentile`` (linear
  interpolation, as ``np.percentile``).
* "mse": running mean over batches of the clipping range minimising
  ``||x - fake_quant(x)||^2`` per slice (Nagel et al. 2021, "A White Paper on Neural
  Network Quantization", sec. 3.5), searched over ``num_candidates`` fractions
  ``k / K`` (k = 1..K) of the batch's min-max range, both ends scaled alike (for a
  signed symmetric spec, of ``[-max|x|, max|x|]``). Ties go to the wider range.
  :func:`mse_range` is the one-shot version (for weights).

Non-finite values: NaN and +-Inf are ignored by every statistic; a slice with no finite
value in a batch leaves that slice's state unchanged (its ``n`` is not incremented).

Empty state: before any update (``n == 0``) the range is ``[0, 0]``, for which
:func:`observer_qparams` gives the floor scale ``numerics.SCALE_EPS`` and zero point
``qmin`` / 0 -- finite, but meaningless until data has been observed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxq import estimators
from jaxq import numerics
from jaxq import quantizer
from jaxq.spec import QuantSpec

#: Candidate clipping ranges of the "mse" observer.
MSE_CANDIDATES = 100

State = dict[str, jax.Array]


def _check(spec) -> QuantSpec:
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"spec must be a jaxq.QuantSpec; got {type(spec).__name__}")
  return spec


def _axes(axes: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
  if axes is None:
    return tuple(range(ndim))
  if isinstance(axes, int):
    axes = (axes,)
  return tuple(sorted({numerics.normalize_axis(a, ndim, "axes") for a in axes}))


def observer_init(spec: QuantSpec, stat_shape: Sequence[int]) -> State:
  """Empty observer state for ranges of shape ``stat_shape``."""
  _check(spec)
  z = jnp.zeros(tuple(stat_shape), jnp.float32)
  return {"lo": z, "hi": z, "n": z}


def _finite_minmax(x: jax.Array, axes: tuple[int, ...]):
  """Finite min / max over ``axes`` (keepdims) and whether each slice had any."""
  lo, hi = numerics.minmax(x, axes)
  valid = jax.lax.cond(
      jnp.all(jnp.isfinite(x)),
      lambda: jnp.ones(lo.shape, bool),
      lambda: jnp.any(jnp.isfinite(x), axis=axes, keepdims=True))
  return lo, hi, valid


def _percentile_range(x, spec: QuantSpec, axes):
  xn = jnp.where(jnp.isfinite(x), x, jnp.nan)
  p = float(spec.percentile)
  if spec.symmetric and spec.signed:
    hi = jnp.nanpercentile(jnp.abs(xn), p, axis=axes, keepdims=True)
    lo = -hi
  else:
    lo = jnp.nanpercentile(xn, 100.0 - p, axis=axes, keepdims=True)
    hi = jnp.nanpercentile(xn, p, axis=axes, keepdims=True)
  return jnp.nan_to_num(lo), jnp.nan_to_num(hi)


def mse_range(x: jax.Array, spec: QuantSpec, axes: int | Sequence[int] | None = None,
              num_candidates: int = MSE_CANDIDATES) -> tuple[jax.Array, jax.Array]:
  """Clipping range ``(lo, hi)`` (keepdims over ``axes``) minimising the quant MSE.

  Candidates are the fractions ``k / num_candidates`` (k = 1..num_candidates) of the
  finite min-max range of each slice (of ``[-max|x|, max|x|]`` for a signed symmetric
  spec); each is turned into qparams with :func:`jaxq.quantizer.qparams_from_range`
  and scored by ``sum((x - fake_quant(x))^2)`` over the finite entries of the slice.
  Ties go to the wider range. A slice with no finite value gives ``(0, 0)``.
  """
  spec = _check(spec)
  if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or (
      num_candidates < 1):
    raise ValueError(f"num_candidates must be a positive int; got {num_candidates!r}")
  x = jnp.asarray(x, jnp.float32)
  axes = _axes(axes, x.ndim)
  lo, hi, _ = _finite_minmax(x, axes)
  if spec.symmetric and spec.signed:
    hi = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    lo = -hi
  finite = jnp.isfinite(x)
  xf = jnp.where(finite, x, 0.0)
  qmin, qmax = spec.qmin, spec.qmax

  def step(carry, frac):
    best_err, best_frac = carry
    scale, zp = quantizer.qparams_from_range(lo * frac, hi * frac, spec)
    err = jnp.sum(jnp.where(finite, (estimators.fake_quant(xf, scale, zp, qmin, qmax) - xf) ** 2,
                            0.0), axis=axes, keepdims=True)
    better = err < best_err
    return (jnp.where(better, err, best_err), jnp.where(better, frac, best_frac)), None

  # From the widest range down, so that ties keep the wider range.
  fracs = jnp.arange(num_candidates, 0, -1, dtype=jnp.float32) / num_candidates
  init = (jnp.full(lo.shape, jnp.inf, jnp.float32), jnp.ones(lo.shape, jnp.float32))
  (_, frac), _ = jax.lax.scan(step, init, fracs)
  return lo * frac, hi * frac


def _batch_range(x, spec: QuantSpec, axes):
  if spec.calibration in ("minmax", "ema"):
    return _finite_minmax(x, axes)
  valid = jnp.any(jnp.isfinite(x), axis=axes, keepdims=True)
  if spec.calibration == "percentile":
    lo, hi = _percentile_range(x, spec, axes)
  else:
    lo, hi = mse_range(x, spec, axes)
  return lo, hi, valid


def observer_update(state: State, x: jax.Array, spec: QuantSpec,
                    axes: int | Sequence[int] | None = None) -> State:
  """Folds the batch ``x`` into ``state``; ``x`` is reduced over ``axes`` (keepdims).

  The reduced shape must equal the state's ``stat_shape`` (or have its size, e.g.
  ``(1, 1, C)`` for ``(C,)``). ``axes=None`` reduces over all axes.
  """
  spec = _check(spec)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a floating-point array; got dtype {x.dtype}")
  x = x.astype(jnp.float32)
  axes = _axes(axes, x.ndim)
  shape = state["n"].shape
  reduced = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
  if reduced != shape and math.prod(reduced) != math.prod(shape):
    raise ValueError(
        f"x of shape {x.shape} reduced over axes {axes} gives statistics of shape "
        f"{reduced}, which does not match the observer state shape {shape}")
  lo, hi, valid = (a.reshape(shape) for a in _batch_range(x, spec, axes))
  n = state["n"]
  if spec.calibration == "minmax":
    first = n == 0
    new_lo = jnp.where(first, lo, jnp.minimum(state["lo"], lo))
    new_hi = jnp.where(first, hi, jnp.maximum(state["hi"], hi))
  elif spec.calibration == "ema":
    d = jnp.float32(spec.ema_decay)
    new_lo = d * state["lo"] + (1 - d) * lo
    new_hi = d * state["hi"] + (1 - d) * hi
  else:  # running mean
    new_lo = state["lo"] + (lo - state["lo"]) / (n + 1)
    new_hi = state["hi"] + (hi - state["hi"]) / (n + 1)
  return {
      "lo": jnp.where(valid, new_lo, state["lo"]),
      "hi": jnp.where(valid, new_hi, state["hi"]),
      "n": n + valid.astype(jnp.float32),
  }


def observer_range(state: State, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
  """The observed range ``(lo, hi)``, of the state's shape; ``(0, 0)`` where ``n == 0``."""
  spec = _check(spec)
  lo, hi, n = state["lo"], state["hi"], state["n"]
  if spec.calibration == "ema":
    corr = 1.0 - jnp.power(jnp.float32(spec.ema_decay), n)
    safe = jnp.where(n > 0, corr, 1.0)
    lo, hi = lo / safe, hi / safe
  seen = n > 0
  return jnp.where(seen, lo, 0.0), jnp.where(seen, hi, 0.0)


def observer_qparams(state: State, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
  """``(scale, zero_point)`` of the observed range (:func:`quantizer.qparams_from_range`)."""
  return quantizer.qparams_from_range(*observer_range(state, spec), spec)
