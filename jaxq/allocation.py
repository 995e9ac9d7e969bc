"""Bit widths under an average-bits budget: ActNN's greedy ``calc_precision``.

Storing entry ``i`` (a layer, or a layer's sample) of ``n_i`` elements with ``b`` bits
and stochastic rounding adds gradient variance ``V_i(b) = C_i / (2^b - 1)^2`` (ActNN,
Chen et al. 2021, sec. 4; the derivation of ``C_i`` is in :mod:`jaxq.act.adaptive`).
:func:`calc_precision` picks ``b_i`` to minimise ``sum_i V_i(b_i)`` subject to
``sum_i b_i n_i <= avg_bits * sum_i n_i``. Pure NumPy: it runs between steps, on
host-side sensitivity estimates.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from jaxq.bitpack import PACK_BITS, check_pack_bits


def check_choices(choices) -> tuple[int, ...]:
  """Allowed widths as a sorted tuple of distinct packing widths (non-empty)."""
  try:
    out = tuple(sorted({check_pack_bits(int(c), "choices") for c in choices}))
  except TypeError:
    raise TypeError(f"choices must be a sequence of bit widths in {PACK_BITS}, "
                    f"got {choices!r}") from None
  if not out:
    raise ValueError(f"choices must not be empty; allowed widths are {PACK_BITS}")
  return out


def calc_precision(sensitivity, sizes, avg_bits: float,
                   choices: Sequence[int] = (1, 2, 4, 8)) -> np.ndarray:
  """Bits per entry minimising ``sum_i sensitivity_i / (2^b_i - 1)^2`` under a budget.

  Greedy, as ActNN's ``calc_precision`` (Chen et al. 2021): start every entry at the
  widest choice; repeatedly lower (to the next narrower choice) the entry whose variance
  increase per bit of memory saved is smallest until ``sum(b * sizes) <= avg_bits *
  sum(sizes)``; then spend any leftover budget raising entries by the same ratio.

  Args:
    sensitivity: ``C_i >= 0`` per entry (layer, or layer-and-sample).
    sizes: elements ``n_i > 0`` stored per entry.
    avg_bits: average bits per element allowed, ``min(choices) <= avg_bits``.
    choices: allowed widths (subset of 1, 2, 4, 8).

  Returns:
    ``int32[len(sizes)]`` bit widths.
  """
  choices = check_choices(choices)
  c = np.asarray(sensitivity, np.float64).reshape(-1)
  n = np.asarray(sizes, np.float64).reshape(-1)
  if c.shape != n.shape:
    raise ValueError(f"sensitivity and sizes must have the same length, got {c.size} "
                     f"and {n.size}")
  if np.any(~np.isfinite(c)) or np.any(c < 0):
    raise ValueError("sensitivity must be finite and >= 0")
  if np.any(n <= 0):
    raise ValueError("sizes must be > 0")
  if not np.isfinite(avg_bits) or avg_bits < choices[0]:
    raise ValueError(f"avg_bits must be >= min(choices) = {choices[0]}, got {avg_bits}")
  var = lambda i, k: c[i] / (2.0**choices[k] - 1) ** 2  # noqa: E731
  level = np.full(c.size, len(choices) - 1)
  budget = avg_bits * n.sum() * (1 + 1e-12)
  used = n.sum() * choices[-1]

  def down_cost(i):
    k = level[i]
    return (var(i, k - 1) - var(i, k)) / ((choices[k] - choices[k - 1]) * n[i])

  heap = [(down_cost(i), i) for i in range(c.size) if level[i] > 0]
  heapq.heapify(heap)
  while used > budget and heap:
    _, i = heapq.heappop(heap)
    k = level[i]
    used -= (choices[k] - choices[k - 1]) * n[i]
    level[i] = k - 1
    if level[i] > 0:
      heapq.heappush(heap, (down_cost(i), i))
  # Leftover budget (a step may overshoot): raise the best gains that still fit.
  improved = True
  while improved:
    improved = False
    best = None
    for i in range(c.size):
      k = level[i]
      if k + 1 < len(choices):
        extra = (choices[k + 1] - choices[k]) * n[i]
        if used + extra <= budget:
          gain = (var(i, k) - var(i, k + 1)) / extra
          if gain > 0 and (best is None or gain > best[0]):
            best = (gain, i, extra)
    if best is not None:
      _, i, extra = best
      level[i] += 1
      used += extra
      improved = True
  return np.asarray([choices[k] for k in level], np.int32)
