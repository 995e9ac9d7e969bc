"""Per-sample bit widths of compressed activations: :class:`SampleBits`, a static spec.

Used as ``Rule(act_compress=SampleBits(...))`` or ``jaxq.act.compressed_vjp(fn,
bits=SampleBits(...))``; what it means for the stored residuals is in its docstring, the
sensitivity model behind it in :mod:`jaxq.act.adaptive`. It lives beside
:mod:`jaxq.spec` (below :mod:`jaxq.act`) because a :class:`~jaxq.Rule` validates it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxq.allocation import calc_precision
from jaxq.bitpack import PACK_BITS, check_pack_bits


@dataclasses.dataclass(frozen=True)
class SampleBits:
  """Per-sample bit widths (ActNN's per-sample ``calc_precision``) with static shapes.

  ActNN gives sample ``n`` of layer ``l`` its own width from ``C_{l,n} = G_l R_{l,n}``,
  ``R_{l,n} = sum_g S range_g^2`` over the sample's groups and ``G_l`` the layer's
  gradient-norm estimate. In JAX the *number* of samples at each width must be static, so
  ``fractions`` fixes it: for a batch of ``B`` samples, ``floor(f_b B)`` samples get ``b``
  bits for every width but the narrowest, which takes the rest (so ``sum_b n_b b <=
  avg_bits * B`` always holds). The *assignment* is dynamic, inside the step: the samples
  of each residual are ranked by ``G_n R_{l,n}`` and the most sensitive get the widest
  codes. ``R_{l,n}`` is :func:`~jaxq.act.samples.sample_sensitivity`; ``G_n``, the sample's gradient-norm
  estimate, is the ``sample_weight`` passed to the compressed function (ActNN keeps it
  per training example from the example's previous visit; :func:`~jaxq.act.samples.output_grad_sqnorm`
  computes it from the model's outputs); without it samples are ranked by ``R_{l,n}``
  alone. ``G_n`` is what makes per-sample widths pay off: late in training most samples
  are fitted and their gradients nearly vanish, so their residuals can take 1 bit and the
  few samples that carry the gradient 4 or 8. Each width's samples are gathered into one
  :class:`~jaxq.act.pack.CompressedArray`, stored with the permutation; decompression
  scatters them back (:class:`~jaxq.act.samples.SampleCompressed`). Rounding stays stochastic and the
  ranking depends on the residual alone, so the gradient stays unbiased.

  Per-sample widths apply to the residuals that feed only weight gradients (a Dense or
  Conv layer's input, read by ``dW = x^T dy`` alone; ``Residual.weight_only`` of
  :func:`~jaxq.act.compressed_residuals`), ActNN's setting. The others (attention
  probabilities, normalised values, activation-function derivatives) scale the cotangent
  passed to the layers below, so their rounding noise compounds along the backward pass,
  and 1-bit codes there wreck the gradient however the samples are ranked (see
  :mod:`jaxq.act.adaptive`); they, and residuals without ``batch_size`` rows on their leading axis
  (weight-sized intermediates, flattened tokens, ...), are stored per tensor at
  ``fallback`` bits.

  Attributes:
    fractions: ``{bits: fraction of the samples}`` (or pairs), fractions summing to 1,
      e.g. ``{4: 0.25, 2: 0.25, 1: 0.5}`` (an average of 2 bits). Stored as pairs sorted
      by decreasing width.
    fallback: width of residuals without a batch axis; default: the widest valid width
      ``<= avg_bits``.
    batch_size: leading-axis size that marks a per-sample residual; default (None): the
      leading size of the first argument listed in ``compress_args`` (the activation
      input); with neither, every residual is stored per tensor at ``fallback`` bits.
  """

  fractions: Any
  fallback: int | None = None
  batch_size: int | None = None

  def __post_init__(self):
    fr = self.fractions
    items = fr.items() if isinstance(fr, Mapping) else fr
    try:
      pairs = [(check_pack_bits(int(b), "SampleBits.fractions width"), float(f)) for b, f in items]
    except (TypeError, ValueError) as e:
      raise ValueError(f"SampleBits.fractions must map widths in {PACK_BITS} to fractions "
                       f"in [0, 1] summing to 1, got {fr!r} ({e})") from None
    if not pairs or len({b for b, _ in pairs}) != len(pairs) or any(
        not 0.0 <= f <= 1.0 for _, f in pairs) or abs(sum(f for _, f in pairs) - 1) > 1e-6:
      raise ValueError(f"SampleBits.fractions must map distinct widths in {PACK_BITS} to "
                       f"fractions in [0, 1] summing to 1, got {fr!r}")
    object.__setattr__(self, "fractions", tuple(sorted(pairs, reverse=True)))
    if self.fallback is None:
      object.__setattr__(self, "fallback", max(b for b in PACK_BITS
                                               if b <= self.avg_bits + 1e-9))
    object.__setattr__(self, "fallback", check_pack_bits(self.fallback, "SampleBits.fallback"))
    if self.batch_size is not None and (
        isinstance(self.batch_size, bool) or not isinstance(self.batch_size, (int, np.integer))
        or self.batch_size < 1):
      raise ValueError(f"SampleBits.batch_size must be None or a positive int, got "
                       f"{self.batch_size!r}")

  @property
  def avg_bits(self) -> float:
    """``sum_b f_b b``: the average width of per-sample residuals."""
    return float(sum(b * f for b, f in self.fractions))

  @property
  def widths(self) -> tuple[int, ...]:
    """Every width this allocation can store (for ``group_size`` validation)."""
    return tuple(sorted({b for b, _ in self.fractions} | {self.fallback}))

  def counts(self, batch: int) -> tuple[tuple[int, int], ...]:
    """``((bits, n_bits), ...)`` for a batch of ``batch`` samples, widest first; zero
    counts dropped. ``sum n_b b <= avg_bits * batch``."""
    *wide, (narrow, _) = self.fractions
    out = [(b, int(np.floor(f * batch + 1e-9))) for b, f in wide]
    out.append((narrow, batch - sum(n for _, n in out)))
    return tuple((b, n) for b, n in out if n > 0)

  @classmethod
  def from_sensitivity(cls, sensitivity, avg_bits: float,
                       choices: Sequence[int] = (1, 2, 4, 8), **kwargs) -> SampleBits:
    """Fractions from a measured per-sample sensitivity profile: the widths
    :func:`calc_precision` gives those samples under ``avg_bits``.

    The profile may be :func:`~jaxq.act.samples.sample_sensitivity` of one residual on a calibration batch,
    or the gradient-norm estimates ``G_n`` of the whole training set (ActNN keeps them per
    example): while they are alike this gives one width, and once most samples are
    fitted, mixed widths. With ``batch_size`` (passed on to the constructor) the fractions
    are whole samples of that batch (``SampleBits.counts``), so profiles that differ
    a little give equal ``SampleBits`` and reuse a compiled step.
    """
    s = np.asarray(sensitivity, np.float64).reshape(-1)
    bits = calc_precision(s, np.ones_like(s), avg_bits, choices)
    # The fallback follows the budget, not the realised average (which may fall below a
    # width: 1.98 bits would otherwise put every non-per-sample residual at 1 bit).
    kwargs.setdefault("fallback", max(b for b in PACK_BITS if b <= avg_bits + 1e-9))
    widths, n = np.unique(bits, return_counts=True)
    out = cls({int(b): float(k) / s.size for b, k in zip(widths, n)}, **kwargs)
    if out.batch_size is None:
      return out
    return cls({b: k / out.batch_size for b, k in out.counts(out.batch_size)}, **kwargs)


def has_sample_bits(bits) -> bool:
  """Whether a ``bits`` argument of :func:`~jaxq.act.compressed_vjp` (a width, a
  :class:`SampleBits` or a per-residual tuple) stores some residual per sample."""
  return any(isinstance(b, SampleBits) for b in (bits if isinstance(bits, tuple) else (bits,)))
