"""Adaptive per-layer bit widths from gradient sensitivity (ActNN ``calc_precision``, GACT).

Compressing layer ``l``'s saved activations with ``b`` bits and stochastic rounding adds
zero-mean noise of variance ``Delta_g^2 / 6`` on average to each element of group ``g``
(``Delta_g = range_g / (2^b - 1)``). For a linear map ``y = x W`` the weight gradient
``x^T dy`` then gains variance ``sum_elements Var(noise) * |dy|^2 / rows``, so layer ``l``
contributes (ActNN, Chen et al. 2021, sec. 4; GACT, Liu et al. 2022, sec. 4)

    V_l(b) = C_l / (2^b - 1)^2,     C_l = (sum_g S range_g^2 / 6) * |dy_l|^2 / rows_l,

and the allocation minimises ``sum_l V_l(b_l)`` subject to the memory budget
``sum_l b_l n_l <= avg_bits * sum_l n_l`` (``n_l``: compressed elements of layer ``l``).
:func:`~jaxq.allocation.calc_precision` solves it greedily as ActNN does; :class:`AdaptiveBits` keeps a
running estimate of ``C_l`` from the ``probe`` gradients of
:func:`~jaxq.act.compressed_vjp` and re-allocates every ``interval`` steps.

Per-sample widths (ActNN's per-sample bits) are :class:`~jaxq.sample_bits.SampleBits`
(re-exported here): a static number of
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

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.allocation import calc_precision, check_choices
from jaxq.bitpack import check_pack_bits
from jaxq.sample_bits import SampleBits, has_sample_bits

__all__ = ["AdaptiveBits", "PROBE_SIZE", "SampleBits", "calc_precision", "has_sample_bits",
           "sensitivity_from_gradients", "sensitivity_from_probe"]

#: Length of the ``probe`` vector of :func:`~jaxq.act.compressed_vjp`.
PROBE_SIZE = 3


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
  bits = check_pack_bits(bits)
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
    self.choices = check_choices(choices)
    if avg_bits < self.choices[0]:
      raise ValueError(f"avg_bits must be >= min(choices) = {self.choices[0]}, got {avg_bits}")
    if not isinstance(interval, (int, np.integer)) or interval < 1:
      raise ValueError(f"interval must be a positive int, got {interval!r}")
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    self.avg_bits, self.interval, self.momentum = float(avg_bits), int(interval), momentum
    if init_bits is None:
      init_bits = max(c for c in self.choices if c <= avg_bits)
    init_bits = check_pack_bits(init_bits, "init_bits")
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
