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
* "mse": the clipping range minimising the quantization error
  ``||x - fake_quant(x)||^2`` of *everything observed so far* (Nagel et al. 2021, "A
  White Paper on Neural Network Quantization", sec. 3.5), searched over
  ``MSE_CANDIDATES`` fractions ``k / K`` (k = 1..K) of the observed min-max range, both
  ends scaled alike (for a signed symmetric spec, of ``[-max|x|, max|x|]``); ties go to
  the wider range. Averaging per-batch
  optima instead clips an outlier that only one batch saw. The state adds a histogram
  of the data (as PyTorch's ``HistogramObserver``): ``hist: f32[stat_shape + (bins,)]``
  over the running finite range ``[hist_lo, hist_hi]``, ``bins = max(256, 8 * 2^bits)``
  (8 bins per integer level); when a batch widens the range, the old counts are
  spread onto the new bins in proportion to their overlap. The error of a candidate
  is integrated in closed form over each bin with the counts spread uniformly within
  it (:func:`_binned_error`), so it is exact up to that within-bin resolution; the
  widest candidate within ``MSE_HISTOGRAM_TOLERANCE`` (1%) of the smallest binned
  error is kept, so that the search does not lose to not clipping through binning
  noise. On the first batch the search runs on the batch itself (:func:`mse_range`,
  exact).
  :func:`mse_range` is the one-shot version (for weights).

Non-finite values: NaN and +-Inf are ignored by every statistic; a slice with no finite
value in a batch leaves that slice's state unchanged (its ``n`` is not incremented).
An empty batch (a zero-length final batch) leaves the whole state unchanged. Finite
float64 values beyond the float32 range (``jax_enable_x64``) count as +-3.4e38 (the
state is float32), not as +-Inf.

Empty state: before any update (``n == 0``) the range is ``[0, 0]``, for which
:func:`observer_qparams` gives the floor scale ``numerics.SCALE_EPS`` and zero point
``qmin`` / 0 -- finite, but meaningless until data has been observed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxq import estimators
from jaxq import numerics
from jaxq import quantizer
from jaxq.spec import QuantSpec, check_spec

#: Candidate clipping ranges of the "mse" observer.
MSE_CANDIDATES = 100
#: Histogram resolution of the "mse" observer: bins per integer level, and at least.
MSE_BINS_PER_LEVEL, MSE_MIN_BINS = 8, 256
#: The histogram search keeps the widest range whose binned error is within this
#: relative margin of the smallest: a gain below the binning's resolution is no reason
#: to clip.
MSE_HISTOGRAM_TOLERANCE = 0.01

State = dict[str, jax.Array]


def _axes(axes: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
  if axes is None:
    return tuple(range(ndim))
  if isinstance(axes, int):
    axes = (axes,)
  return tuple(sorted({numerics.normalize_axis(a, ndim, "axes") for a in axes}))


def mse_bins(spec: QuantSpec) -> int:
  """Histogram bins of the "mse" observer of ``spec``."""
  return max(MSE_MIN_BINS, MSE_BINS_PER_LEVEL * 2**spec.bits)


def observer_init(spec: QuantSpec, stat_shape: Sequence[int]) -> State:
  """Empty observer state for ranges of shape ``stat_shape``."""
  check_spec(spec)
  stat_shape = tuple(stat_shape)
  z = jnp.zeros(stat_shape, jnp.float32)
  state = {"lo": z, "hi": z, "n": z}
  if spec.calibration == "mse":
    state.update(hist_lo=z, hist_hi=z,
                 hist=jnp.zeros(stat_shape + (mse_bins(spec),), jnp.float32))
  return state


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
  spec = check_spec(spec)
  if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or (
      num_candidates < 1):
    raise ValueError(f"num_candidates must be a positive int; got {num_candidates!r}")
  x = jnp.asarray(x)
  x = x.astype(numerics.float_dtype(x))
  axes = _axes(axes, x.ndim)
  lo, hi, _ = _finite_minmax(x, axes)
  if x.size == 0:
    return lo, hi
  lo, hi = _clip_range(lo, hi, spec)
  finite = jnp.isfinite(x)
  xf = jnp.where(finite, x, 0.0)
  unit = _unit(lo, hi)  # errors in units of the range: no overflow near the float max
  qmin, qmax = spec.qmin, spec.qmax

  def error(frac):
    scale, zp = quantizer.qparams_from_range(lo * frac, hi * frac, spec)
    d = (estimators.fake_quant(xf, scale, zp, qmin, qmax) - xf) / unit
    return jnp.sum(jnp.where(finite, d * d, 0.0), axis=axes, keepdims=True)

  frac = _argmin_fraction(error, lo.shape, num_candidates)
  return lo * frac, hi * frac


def _clip_range(lo, hi, spec: QuantSpec):
  """The range the clipping candidates scale: ``[-max|x|, max|x|]`` for a signed
  symmetric spec, else ``[lo, hi]``."""
  if spec.symmetric and spec.signed:
    hi = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    lo = -hi
  return lo, hi


def _unit(lo, hi):
  """``max(|lo|, |hi|)`` (1 where both are 0): the scale errors are measured in."""
  a = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
  return jnp.where(a > 0, a, 1.0)


def _argmin_fraction(error, shape, num_candidates: int, tolerance: float = 0.0):
  """The widest fraction ``k / num_candidates`` (k = 1..num_candidates) whose
  ``error(frac)`` is within ``(1 + tolerance)`` of the smallest, per slice (with
  ``tolerance=0``: the minimiser, ties going to the wider range)."""
  fracs = jnp.arange(num_candidates, 0, -1, dtype=jnp.float32) / num_candidates
  errs = jax.lax.map(error, fracs)  # widest first
  ok = errs <= jnp.min(errs, axis=0) * (1 + tolerance)
  return fracs[jnp.argmax(ok, axis=0)].reshape(shape)


# ---------------------------------------------------------------------------------------
# "mse" over many batches: a histogram of everything observed
# ---------------------------------------------------------------------------------------


def _bin_width(lo, hi, bins: int):
  """Bin width in units of :func:`_unit` (1 where the range is a single point)."""
  unit = _unit(lo, hi)
  w = (hi / unit - lo / unit) / bins
  return unit, w, jnp.where(w > 0, w, 1.0)


def _histogram(x, reduced, lo, hi, bins: int):
  """Counts of the finite ``x`` of each slice in ``bins`` bins over ``[lo, hi]`` (f32[S]
  each, covering the slice's values); ``x`` reduces to ``reduced``. Returns f32[S, bins]."""
  n_slices = lo.size
  unit, _, w = _bin_width(lo, hi, bins)
  per = lambda a: a.reshape(reduced)  # pylint: disable=unnecessary-lambda-assignment
  finite = jnp.isfinite(x)
  pos = (jnp.where(finite, x, 0.0) / per(unit) - per(lo / unit)) / per(w)
  b = jnp.clip(jnp.floor(pos), 0, bins - 1).astype(jnp.int32)
  ids = jnp.broadcast_to(jnp.arange(n_slices, dtype=jnp.int32).reshape(reduced), x.shape)
  counts = jnp.zeros(n_slices * bins, jnp.float32)
  counts = counts.at[(ids * bins + b).ravel()].add(finite.ravel().astype(jnp.float32))
  return counts.reshape(n_slices, bins)


def _rebin(hist, old_lo, old_hi, lo, hi):
  """``hist`` (f32[S, B] over ``[old_lo, old_hi]``) on the B bins of the wider range
  ``[lo, hi]``: each old bin's count is split between the (at most two) new bins it
  overlaps, in proportion to the overlap."""
  n_slices, bins = hist.shape
  unit, _, w = _bin_width(lo, hi, bins)
  old_w = (old_hi / unit - old_lo / unit) / bins
  col = lambda a: a[:, None]  # pylint: disable=unnecessary-lambda-assignment
  edge = col(old_lo / unit) + jnp.arange(bins, dtype=jnp.float32) * col(old_w)
  start = (edge - col(lo / unit)) / col(w)
  ratio = col(old_w / w)
  j = jnp.clip(jnp.floor(start), 0, bins - 1)
  left = jnp.where(ratio > 0, jnp.clip((j + 1 - start) / jnp.where(ratio > 0, ratio, 1.0),
                                       0.0, 1.0), 1.0)
  rows = col(jnp.arange(n_slices, dtype=jnp.int32)) * bins
  j = j.astype(jnp.int32)
  out = jnp.zeros(n_slices * bins, jnp.float32)
  out = out.at[(rows + j).ravel()].add((hist * left).ravel())
  out = out.at[(rows + jnp.minimum(j + 1, bins - 1)).ravel()].add((hist * (1 - left)).ravel())
  same = col((old_lo == lo) & (old_hi == hi))
  return jnp.where(same, hist, out.reshape(n_slices, bins))


def _binned_error(u, v, s, lo_q, hi_q):
  """``integral_u^v (t - Q(t))^2 dt`` for ``Q(t) = clip(s * round(t / s), lo_q, hi_q)``,
  with ``lo_q``, ``hi_q`` multiples of ``s`` (the dequantized ends of the integer range).

  Inside ``[lo_q - s/2, hi_q + s/2]`` the error is the sawtooth ``r = t - s k``,
  ``k = round(t / s)``, whose integral from 0 is ``k s^3 / 12 + r^3 / 3``; beyond it,
  ``(t - hi_q)^2`` (``(t - lo_q)^2``), integrated as ``(t - hi_q)^3 / 3``.
  """
  h = s / 2
  a, b = lo_q - h, hi_q + h

  def saw(t):
    t = jnp.clip(t, a, b)
    k = jnp.floor(t / s + 0.5)
    return k, t - k * s

  ku, ru = saw(u)
  kv, rv = saw(v)
  inner = (kv - ku) * (s**3 / 12) + (rv**3 - ru**3) / 3
  upper = ((jnp.maximum(v, b) - hi_q) ** 3 - (jnp.maximum(u, b) - hi_q) ** 3) / 3
  lower = ((jnp.minimum(v, a) - lo_q) ** 3 - (jnp.minimum(u, a) - lo_q) ** 3) / 3
  return inner + upper + lower


def _histogram_range(hist, lo, hi, spec: QuantSpec):
  """The clipping range (f32[S] each) minimising the binned quantization error."""
  bins = hist.shape[-1]
  unit, w_raw, w = _bin_width(lo, hi, bins)
  clo, chi = _clip_range(lo, hi, spec)
  col = lambda a: a[:, None]  # pylint: disable=unnecessary-lambda-assignment
  u = col(lo / unit) + jnp.arange(bins, dtype=jnp.float32) * col(w_raw)
  v = u + col(w_raw)

  def error(frac):
    scale, zp = quantizer.qparams_from_range(clo * frac, chi * frac, spec)
    s = col(scale / unit)
    lo_q, hi_q = col((spec.qmin - zp) * scale / unit), col((spec.qmax - zp) * scale / unit)
    mean = _binned_error(u, v, s, lo_q, hi_q) / col(w)
    point = (u - jnp.clip(s * jnp.round(u / s), lo_q, hi_q)) ** 2  # a one-point range
    per_bin = jnp.where(col(w_raw) > 0, mean, point)
    return jnp.sum(hist * per_bin, axis=-1)

  frac = _argmin_fraction(error, lo.shape, MSE_CANDIDATES, MSE_HISTOGRAM_TOLERANCE)
  return clo * frac, chi * frac


def _mse_update(state: State, x, spec: QuantSpec, axes, reduced, blo, bhi, valid) -> State:
  """Folds ``x`` into the "mse" state: histogram, then the search (see module doc)."""
  shape = state["n"].shape
  flat = lambda a: a.reshape(-1)  # pylint: disable=unnecessary-lambda-assignment
  n, v = flat(state["n"]), flat(valid)
  first = n == 0
  hlo = jnp.where(first, flat(blo), jnp.minimum(flat(state["hist_lo"]), flat(blo)))
  hhi = jnp.where(first, flat(bhi), jnp.maximum(flat(state["hist_hi"]), flat(bhi)))
  hlo, hhi = jnp.where(v, hlo, flat(state["hist_lo"])), jnp.where(v, hhi, flat(state["hist_hi"]))
  old = state["hist"].reshape(n.size, -1)
  hist = _rebin(old, flat(state["hist_lo"]), flat(state["hist_hi"]), hlo, hhi)
  hist = hist + _histogram(x, reduced, hlo, hhi, old.shape[-1])
  hist = jnp.where(v[:, None], hist, old)
  lo, hi = jax.lax.cond(
      jnp.all(first | ~v),
      lambda: tuple(flat(a) for a in mse_range(x, spec, axes)),
      lambda: _histogram_range(hist, hlo, hhi, spec))
  return {
      "lo": jnp.where(v, lo, flat(state["lo"])).reshape(shape),
      "hi": jnp.where(v, hi, flat(state["hi"])).reshape(shape),
      "n": (n + v).reshape(shape),
      "hist_lo": hlo.reshape(shape), "hist_hi": hhi.reshape(shape),
      "hist": hist.reshape(state["hist"].shape),
  }


def _batch_range(x, spec: QuantSpec, axes):
  if spec.calibration in ("minmax", "ema", "mse"):
    return _finite_minmax(x, axes)
  valid = jnp.any(jnp.isfinite(x), axis=axes, keepdims=True)
  lo, hi = _percentile_range(x, spec, axes)
  return lo, hi, valid


def observer_update(state: State, x: jax.Array, spec: QuantSpec,
                    axes: int | Sequence[int] | None = None) -> State:
  """Folds the batch ``x`` into ``state``; ``x`` is reduced over ``axes`` (keepdims).

  The reduced shape must equal the state's ``stat_shape`` (or have its size, e.g.
  ``(1, 1, C)`` for ``(C,)``). ``axes=None`` reduces over all axes.
  """
  spec = check_spec(spec)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a floating-point array; got dtype {x.dtype}")
  if x.dtype == jnp.float64:  # finite values beyond float32 saturate rather than overflow
    big = float(jnp.finfo(jnp.float32).max)
    x = jnp.where(jnp.isfinite(x), jnp.clip(x, -big, big), x)
  x = x.astype(jnp.float32)
  axes = _axes(axes, x.ndim)
  shape = state["n"].shape
  reduced = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
  if reduced != shape and math.prod(reduced) != math.prod(shape):
    raise ValueError(
        f"x of shape {x.shape} reduced over axes {axes} gives statistics of shape "
        f"{reduced}, which does not match the observer state shape {shape}")
  want = {"lo", "hi", "n"} | ({"hist_lo", "hist_hi", "hist"} if spec.calibration == "mse"
                               else set())
  if not isinstance(state, dict) or set(state) != want:
    got = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"an observer state for calibration={spec.calibration!r} has the keys "
                     f"{sorted(want)} (from observer_init); got {got}")
  if x.size == 0:
    return state
  return _fold(state, x, spec, axes, reduced)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _fold(state: State, x, spec: QuantSpec, axes, reduced) -> State:
  """:func:`observer_update` after validation (one compiled program per spec and shape;
  inlined under an outer ``jit``)."""
  shape = state["n"].shape
  lo, hi, valid = (a.reshape(shape) for a in _batch_range(x, spec, axes))
  if spec.calibration == "mse":
    return _mse_update(state, x, spec, axes, reduced, lo, hi, valid)
  n = state["n"]
  if spec.calibration == "minmax":
    first = n == 0
    new_lo = jnp.where(first, lo, jnp.minimum(state["lo"], lo))
    new_hi = jnp.where(first, hi, jnp.maximum(state["hi"], hi))
  elif spec.calibration == "ema":
    d = jnp.float32(spec.ema_decay)
    new_lo = d * state["lo"] + (1 - d) * lo
    new_hi = d * state["hi"] + (1 - d) * hi
  else:  # "percentile": running mean
    new_lo = state["lo"] + (lo - state["lo"]) / (n + 1)
    new_hi = state["hi"] + (hi - state["hi"]) / (n + 1)
  return {
      "lo": jnp.where(valid, new_lo, state["lo"]),
      "hi": jnp.where(valid, new_hi, state["hi"]),
      "n": n + valid.astype(jnp.float32),
  }


def observer_range(state: State, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
  """The observed range ``(lo, hi)``, of the state's shape; ``(0, 0)`` where ``n == 0``."""
  spec = check_spec(spec)
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
