"""Adaptive per-layer bit widths from gradient sensitivity (ActNN ``calc_precision``, GACT).

Compressing layer ``l``'s saved activations with ``b`` bits and stochastic rounding adds
zero-mean noise of variance ``Delta_g^2 / 6`` on average to each element of group ``g``
(``Delta_g = range_g / (2^b - 1)``). For a linear map ``y = x W`` the weight gradient
``x^T dy`` then gains variance ``sum_elements Var(noise) * |dy|^2 / rows``, so layer ``l``
contributes (ActNN, Chen et al. 2021, sec. 4; GACT, Liu et al. 2022, sec. 4)

    V_l(b) = C_l / (2^b - 1)^2,     C_l = (sum_g S range_g^2 / 6) * |dy_l|^2 / rows_l,

and the allocation minimises ``sum_l V_l(b_l)`` subject to the memory budget
``sum_l b_l n_l <= avg_bits * sum_l n_l`` (``n_l``: compressed elements of layer ``l``).
:func:`calc_precision` solves it greedily as ActNN does; :class:`AdaptiveBits` keeps a
running estimate of ``C_l`` from the ``probe`` gradients of
:func:`~jaxq.act.compressed_vjp` and re-allocates every ``interval`` steps.

Per-sample widths (ActNN's per-sample bits) are :class:`SampleBits`: a static number of
samples per width, the samples ranked inside the step by ``G_n R_n``, their gradient
estimates (``sample_weight``, e.g. :func:`~jaxq.act.samples.output_grad_sqnorm`) times
:func:`~jaxq.act.samples.sample_sensitivity`.
Per-residual widths are a tuple ``bits`` of :func:`~jaxq.act.compressed_vjp` (one entry
per residual of :func:`~jaxq.act.vjp.compressed_residuals`).

The probe's ``C_l`` sees only the region's output cotangent, so it underrates a region
whose internal residuals (attention maps, LayerNorm's normalised values) feed large
gradients; :func:`sensitivity_from_gradients` measures ``C_l`` instead (GACT): the mean
squared change of the parameter gradient when only region ``l`` is compressed. The model
assumes that the noise of the regions adds up; it does for residuals that feed only weight
gradients (``Residual.weight_only``, ActNN's per-layer setting), not for residuals on the
cotangent path, whose relative variances multiply along the backward pass. Measurements
(which allocations pay off, per seed): ``docs/act.md``.

Training loop (``regions``: names of the compressed modules; ``grad_fn(params, batch,
bits, key)`` the loss gradient with region ``name`` run through
:func:`~jaxq.act.linen.compressed_call` at ``bits[name]`` bits, float where absent; its
jit recompiles per allocation, i.e. at most every ``interval`` steps)::

    ab = AdaptiveBits(regions, avg_bits=2, interval=200)
    sizes = {name: n_l for name in regions}   # probe_grad[1] of each region, once
    for step in range(steps):
      if ab.due(step):
        ref = grad_fn(params, batch, {}, key)
        keys = jax.random.split(key, 4)
        ab.update_sensitivity({name: sensitivity_from_gradients(
            jax.vmap(lambda k: grad_fn(params, batch, {name: 1}, k))(keys), ref, 1)
            for name in regions}, sizes)
      grads = grad_fn(params, batch, ab.bits, key)  # sum_l bits_l n_l <= 2 sum_l n_l
      ...

Per-sample widths (``g_est``: ``f32[num_examples]``, ones at first; ``idx``: the batch's
example indices; ``qmodel`` with ``Rule(layers, act_compress=widths)``, jitted per
``widths``, i.e. at most every ``interval`` steps)::

    if step % interval == 0:
      widths = SampleBits.from_sensitivity(g_est, 2, (1, 2, 4), batch_size=64)
    def loss_fn(params):
      with jaxq.act.linen.sample_weights(g_est[idx]):
        logits = qmodel.apply({"params": params}, x, rngs={"jaxq": key})
      return per_sample_loss(logits, y).mean(), logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    g_est = g_est.at[idx].set(0.5 * g_est[idx]
                              + 0.5 * output_grad_sqnorm(per_sample_loss, logits, y))
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.act.pack import VALID_BITS, check_bits

#: Length of the ``probe`` vector of :func:`~jaxq.act.compressed_vjp`.
PROBE_SIZE = 3


def _check_choices(choices) -> tuple[int, ...]:
  try:
    out = tuple(sorted({check_bits(int(c), "choices") for c in choices}))
  except TypeError:
    raise TypeError(f"choices must be a sequence of bit widths in {VALID_BITS}, "
                    f"got {choices!r}") from None
  if not out:
    raise ValueError(f"choices must not be empty; allowed widths are {VALID_BITS}")
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
  choices = _check_choices(choices)
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


def sensitivity_from_probe(probe_grad) -> tuple[float, float]:
  """``(C, n)`` from the gradient of one ``probe`` of :func:`~jaxq.act.compressed_vjp`.

  ``probe_grad = [sum_g S range_g^2, n, |dy|^2 / rows]`` gives
  ``C = probe_grad[0] * probe_grad[2] / 6`` (see the module docstring) and ``n``.
  """
  p = np.asarray(probe_grad, np.float64).reshape(-1)
  if p.shape != (PROBE_SIZE,):
    raise ValueError(f"probe_grad must have {PROBE_SIZE} entries, got shape {p.shape}")
  return float(p[0] * p[2] / 6.0), float(p[1])


def sensitivity_from_gradients(grads, reference, bits: int) -> jax.Array:
  """Empirical ``C_l`` (GACT, Liu et al. 2022): gradient noise of compressing layer ``l``.

  ``grads`` are gradients (any pytree, one leading axis of ``K >= 1`` samples) computed
  with only layer ``l`` compressed at ``bits`` bits, each with its own stochastic-rounding
  key; ``reference`` is the same gradient without compression. Returns

      C_l = (2^bits - 1)^2 * mean_k |grads_k - reference|^2,

  so that ``C_l / (2^b - 1)^2`` estimates the variance at any width ``b``. Unlike the
  probe's analytic model it sees every residual inside the layer and the gradient each
  really feeds (attention maps, normalised values, ...). Jittable.
  """
  bits = check_bits(bits)
  g, r = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(reference)
  if len(g) != len(r) or not g:
    raise ValueError(f"grads and reference must be pytrees with the same (non-zero) "
                     f"number of leaves, got {len(g)} and {len(r)}")
  for a, b in zip(g, r):
    if a.shape[1:] != b.shape:
      raise ValueError(f"grads leaves must be reference leaves with a leading sample "
                       f"axis, got shapes {a.shape} and {b.shape}")
  err = sum(jnp.sum(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))
            for a, b in zip(g, r)) / g[0].shape[0]
  return err * float((2**bits - 1) ** 2)


class AdaptiveBits:
  """Running per-layer sensitivity and the bit widths it implies (ActNN/GACT style).

  Usage in a training loop (``bits`` static, so a new allocation recompiles the step)::

      ab = jaxq.act.AdaptiveBits(["block_0", "block_1"], avg_bits=2, interval=50)
      for step in range(steps):
        bits = ab.bits                                 # {"block_0": 4, "block_1": 1}
        if ab.due(step):                               # estimation step
          grads, probe_grads = grad_with_probes(params, ab.probes(), batch, bits)
          ab.update(probe_grads)                       # new ab.bits
        else:
          grads = grad_step(params, batch, bits)

  where the loss passes ``probe=probes[name]`` to the :func:`~jaxq.act.compressed_vjp`
  (or :func:`~jaxq.act.linen.compressed_call`) of layer ``name`` and differentiates
  with respect to ``probes`` too.

  Args:
    names: layer names (any hashable).
    avg_bits: average bits per compressed element.
    choices: allowed widths.
    interval: re-estimate every ``interval`` steps (``due``).
    momentum: EMA factor for the sensitivity (0 keeps only the latest estimate).
    init_bits: widths before the first estimate (default: ``avg_bits`` rounded down to a
      choice).
  """

  def __init__(self, names: Sequence, avg_bits: float, choices: Sequence[int] = (1, 2, 4, 8),
               interval: int = 100, momentum: float = 0.0, init_bits: int | None = None):
    self.names = tuple(names)
    if not self.names:
      raise ValueError("names must not be empty")
    self.choices = _check_choices(choices)
    if avg_bits < self.choices[0]:
      raise ValueError(f"avg_bits must be >= min(choices) = {self.choices[0]}, got {avg_bits}")
    if not isinstance(interval, (int, np.integer)) or interval < 1:
      raise ValueError(f"interval must be a positive int, got {interval!r}")
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    self.avg_bits, self.interval, self.momentum = float(avg_bits), int(interval), momentum
    if init_bits is None:
      init_bits = max(c for c in self.choices if c <= avg_bits)
    init_bits = check_bits(init_bits, "init_bits")
    self.bits: dict = {n: init_bits for n in self.names}
    self.sensitivity: dict = {}
    self.sizes: dict = {}

  def due(self, step: int) -> bool:
    """Whether ``step`` is an estimation step (every ``interval`` steps, from step 0)."""
    return int(step) % self.interval == 0

  def probes(self) -> dict:
    """Zero probes, one ``f32[3]`` per layer, to differentiate the loss against."""
    return {n: jnp.zeros((PROBE_SIZE,), jnp.float32) for n in self.names}

  def update(self, probe_grads: Mapping) -> dict:
    """Folds in the probes' gradients and re-allocates; returns (and stores) ``bits``."""
    missing = [n for n in self.names if n not in probe_grads]
    if missing:
      raise ValueError(f"probe_grads lacks layers {missing}")
    pg = jax.device_get(dict(probe_grads))
    est = {name: sensitivity_from_probe(pg[name]) for name in self.names}
    return self.update_sensitivity({k: c for k, (c, _) in est.items()},
                                   {k: n for k, (_, n) in est.items()})

  def as_tuple(self) -> tuple[int, ...]:
    """``bits`` in the order of ``names``. With ``names = range(len(residuals))`` for
    ``residuals = compressed_residuals(fn, ...)`` (sizes ``r.size``) this is the
    per-residual ``bits`` of :func:`~jaxq.act.compressed_vjp`."""
    return tuple(self.bits[n] for n in self.names)

  def update_sensitivity(self, sensitivity: Mapping, sizes: Mapping) -> dict:
    """Folds in measured ``C_l`` (e.g. :func:`sensitivity_from_gradients`) and the
    compressed element counts ``n_l``; re-allocates; returns (and stores) ``bits``."""
    for what, d in (("sensitivity", sensitivity), ("sizes", sizes)):
      missing = [n for n in self.names if n not in d]
      if missing:
        raise ValueError(f"{what} lacks layers {missing}")
    for name in self.names:
      c = float(sensitivity[name])
      if not np.isfinite(c) or c < 0:
        raise ValueError(f"sensitivity[{name!r}] must be finite and >= 0, got {c}")
      old = self.sensitivity.get(name)
      self.sensitivity[name] = c if old is None else self.momentum * old + (1 - self.momentum) * c
      self.sizes[name] = max(float(sizes[name]), 1.0)
    bits = calc_precision([self.sensitivity[n] for n in self.names],
                          [self.sizes[n] for n in self.names], self.avg_bits, self.choices)
    self.bits = {n: int(b) for n, b in zip(self.names, bits)}
    return self.bits


# ----------------------------------------------------------------------- per-sample widths
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
  and 1-bit codes there wreck the gradient however the samples are ranked (see the module
  docstring); they, and residuals without ``batch_size`` rows on their leading axis
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
      pairs = [(check_bits(int(b), "SampleBits.fractions width"), float(f)) for b, f in items]
    except (TypeError, ValueError) as e:
      raise ValueError(f"SampleBits.fractions must map widths in {VALID_BITS} to fractions "
                       f"in [0, 1] summing to 1, got {fr!r} ({e})") from None
    if not pairs or len({b for b, _ in pairs}) != len(pairs) or any(
        not 0.0 <= f <= 1.0 for _, f in pairs) or abs(sum(f for _, f in pairs) - 1) > 1e-6:
      raise ValueError(f"SampleBits.fractions must map distinct widths in {VALID_BITS} to "
                       f"fractions in [0, 1] summing to 1, got {fr!r}")
    object.__setattr__(self, "fractions", tuple(sorted(pairs, reverse=True)))
    if self.fallback is None:
      object.__setattr__(self, "fallback", max(b for b in VALID_BITS
                                               if b <= self.avg_bits + 1e-9))
    object.__setattr__(self, "fallback", check_bits(self.fallback, "SampleBits.fallback"))
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
    kwargs.setdefault("fallback", max(b for b in VALID_BITS if b <= avg_bits + 1e-9))
    widths, n = np.unique(bits, return_counts=True)
    out = cls({int(b): float(k) / s.size for b, k in zip(widths, n)}, **kwargs)
    if out.batch_size is None:
      return out
    return cls({b: k / out.batch_size for b, k in out.counts(out.batch_size)}, **kwargs)


def has_sample_bits(bits) -> bool:
  """Whether a ``bits`` argument of :func:`~jaxq.act.compressed_vjp` (a width, a
  :class:`SampleBits` or a per-residual tuple) stores some residual per sample."""
  return any(isinstance(b, SampleBits) for b in (bits if isinstance(bits, tuple) else (bits,)))
