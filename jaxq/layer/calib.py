"""What ``calibrate`` records for one layer so that ``convert`` can smooth and GPTQ-round
it (Contract 7), Flax-free: the adapters keep a :class:`LayerCalibration` per matched
layer, create it with :func:`calibration_init` and fold every calibration batch into it
with :func:`calibration_update` (pure, jit-able, on the layer's ``(M, K)`` input view).

Pieces, each present only when the layer's rule needs it (:func:`calibration_needs`):

* ``stats`` (:class:`SmoothStats`, any ``Rule.smooth``): per input channel the finite
  min / max (the static activation range of ``x / s`` is recomputed exactly from them,
  :func:`jaxq.layer.smooth.smoothed_act_qparams`), ``max |x_k|`` (SmoothQuant) and
  ``sum |x_k|`` (AWQ). ``4 K + 4`` floats.
* ``hessian`` (:class:`jaxq.gptq.HessianState`, ``QuantSpec(rounding="gptq")``):
  ``X^T X`` in float32. ``4 K^2`` bytes.
* ``tokens`` (:class:`TokenReservoir`, ``Rule.smooth="auto"``): a uniform sample without
  replacement of at most ``size`` input rows over all calibration batches (bottom-k of
  a counter-based hash of each token's index, so it is order-exact, deterministic and
  needs no key), with their token indices so that the later ones can be held back.
  ``size * (4 K + 8)`` bytes: 8 MiB per layer for K = 4096 and the default 512 rows.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import gptq
from jaxq import numerics
from jaxq import smoothing
from jaxq.spec import Rule

__all__ = [
    "DEFAULT_RESERVOIR", "SmoothStats", "TokenReservoir", "LayerCalibration",
    "calibration_needs", "calibration_init", "calibration_update", "reservoir_init",
    "reservoir_update", "reservoir_tokens", "smooth_stats_init", "smooth_stats_update",
    "stats_range",
]

#: Default number of calibration rows a ``smooth="auto"`` layer keeps.
DEFAULT_RESERVOIR = 512
_SEED = 0x5EED


class SmoothStats(NamedTuple):
  """Per-input-channel statistics of a layer's inputs ``x: (M, K)``."""
  lo: jax.Array  # f32[K]: finite min of x_k (0 when none)
  hi: jax.Array  # f32[K]: finite max of x_k (0 when none)
  channels: smoothing.ChannelStats  # max |x_k|, sum |x_k|, tokens


class TokenReservoir(NamedTuple):
  """A uniform sample of at most ``R`` input rows (the ``R`` smallest priorities)."""
  rows: jax.Array  # f32[R, K]
  index: jax.Array  # i32[R]: global token index of each row (-1: empty slot)
  priority: jax.Array  # f32[R]: hash priority in [0, 1) (inf: empty slot)
  seen: jax.Array  # i32[]: tokens offered so far


class LayerCalibration(NamedTuple):
  """Everything ``convert`` needs to smooth / GPTQ-round one layer (None: not needed)."""
  stats: SmoothStats | None
  hessian: gptq.HessianState | None
  tokens: TokenReservoir | None


def smooth_stats_init(k: int) -> SmoothStats:
  return SmoothStats(jnp.full((k,), jnp.inf, jnp.float32),
                     jnp.full((k,), -jnp.inf, jnp.float32), smoothing.stats_init(k))


def smooth_stats_update(stats: SmoothStats, x2: jax.Array) -> SmoothStats:
  """Adds the rows of ``x2: (M, K)``; NaN / Inf do not move ``lo`` / ``hi`` (as min-max
  observers), and make their channel keep ``s = 1`` (:mod:`jaxq.smoothing`)."""
  x2 = jnp.asarray(x2, jnp.float32)
  if x2.shape[0] == 0:
    return stats
  finite = jnp.isfinite(x2)
  lo = jnp.min(jnp.where(finite, x2, jnp.inf), axis=0)
  hi = jnp.max(jnp.where(finite, x2, -jnp.inf), axis=0)
  return SmoothStats(jnp.minimum(stats.lo, lo), jnp.maximum(stats.hi, hi),
                     smoothing.stats_update(stats.channels, x2))


def stats_range(stats: SmoothStats) -> tuple[jax.Array, jax.Array]:
  """``(lo, hi)`` per channel, ``(0, 0)`` where no finite value was seen."""
  seen = stats.lo <= stats.hi
  return jnp.where(seen, stats.lo, 0.0), jnp.where(seen, stats.hi, 0.0)


def reservoir_init(k: int, size: int = DEFAULT_RESERVOIR) -> TokenReservoir:
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 2:
    raise ValueError(f"reservoir size must be an int >= 2 (tokens kept per layer); got "
                     f"{size!r}")
  return TokenReservoir(jnp.zeros((size, k), jnp.float32), jnp.full((size,), -1, jnp.int32),
                        jnp.full((size,), jnp.inf, jnp.float32), jnp.zeros((), jnp.int32))


def _priority(index: jax.Array) -> jax.Array:
  """``f32`` in ``[0, 1)`` from a counter-based hash of the global token index."""
  h = numerics.mix32(numerics.mix32(index.astype(jnp.uint32) * np.uint32(0x9E3779B9)
                                    + np.uint32(_SEED)))
  return (h >> 8).astype(jnp.float32) * np.float32(2.0**-24)


def reservoir_update(res: TokenReservoir, x2: jax.Array) -> TokenReservoir:
  """Offers the rows of ``x2: (M, K)``: keeps the ``R`` rows of smallest priority
  ``hash(token index)`` among those kept and the new ones (bottom-k sampling: a uniform
  sample of all tokens offered, whatever the batch sizes). Rows with a NaN or Inf are
  offered like the others (the search then sees what serving will)."""
  m = x2.shape[0]
  if m == 0:
    return res
  idx = res.seen + jnp.arange(m, dtype=jnp.int32)
  rows = jnp.concatenate([res.rows, jnp.asarray(x2, jnp.float32)])
  index = jnp.concatenate([res.index, idx])
  priority = jnp.concatenate([res.priority, _priority(idx)])
  _, keep = jax.lax.top_k(-priority, res.rows.shape[0])
  return TokenReservoir(rows[keep], index[keep], priority[keep], res.seen + m)


def reservoir_tokens(res: TokenReservoir) -> jax.Array:
  """The kept rows in calibration order, ``(min(R, seen), K)`` (host; not jit-able)."""
  index = np.asarray(res.index)
  order = np.argsort(np.where(index < 0, np.iinfo(np.int32).max, index), kind="stable")
  order = order[index[order] >= 0]
  return jnp.asarray(res.rows)[order]


def calibration_needs(rule: Rule | None) -> bool:
  """Whether ``rule`` needs a :class:`LayerCalibration` (smoothing or GPTQ)."""
  return rule is not None and (rule.smooth is not None or (
      rule.weight is not None and rule.weight.rounding == "gptq"))


def calibration_init(rule: Rule, in_features: int, *,
                     reservoir: int = DEFAULT_RESERVOIR) -> LayerCalibration:
  """The empty calibration state of a layer with ``in_features`` inputs (K of its
  ``(M, K)`` input view) quantized by ``rule``."""
  gp = rule.weight is not None and rule.weight.rounding == "gptq"
  return LayerCalibration(
      smooth_stats_init(in_features) if rule.smooth is not None else None,
      gptq.hessian_init(in_features) if gp else None,
      reservoir_init(in_features, reservoir) if rule.smooth == "auto" else None)


def calibration_update(state: LayerCalibration, x2: jax.Array) -> LayerCalibration:
  """Folds one batch of the layer's input view ``x2: (M, K)`` into ``state`` (pure,
  jit-able). The Hessian takes finite rows only (a NaN would poison ``X^T X``)."""
  x2 = jnp.asarray(x2)
  if x2.ndim != 2:
    raise ValueError(f"x2 must be the (M, K) input view of the layer; got shape {x2.shape}")
  stats, h, tokens = state
  if stats is not None:
    stats = smooth_stats_update(stats, x2)
  if h is not None:
    finite = jnp.all(jnp.isfinite(x2), axis=1, keepdims=True)
    h = gptq.hessian_update(h, jnp.where(finite, x2, 0.0))
    h = h._replace(count=h.count - jnp.sum(~finite).astype(h.count.dtype))
  if tokens is not None:
    tokens = reservoir_update(tokens, x2)
  return LayerCalibration(stats, h, tokens)
