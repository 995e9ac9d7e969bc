"""Layer-wise quantization sensitivity and mixed-precision bit allocation.

Sensitivity, as PPQ's layerwise analyser recommends over Hessian-based methods: quantize
ONE layer at a time (everything else in float) with the serving numerics of
:mod:`jaxq.flax.ptq` (weights quantized as ``convert`` would, activations with ranges
calibrated on the same batches) and compare the model's output ``y_q`` with the float
output ``y`` over the batches:

* ``SNR = 10 log10(sum y^2 / sum (y_q - y)^2)`` in dB (higher is better);
* cosine similarity ``<y_q, y> / (|y_q| |y|)`` of the flattened output of each batch,
  averaged over batches (every floating-point output leaf, concatenated).

One compilation per candidate bit width serves every layer: each layer's choice between
its quantized and float result is a flag ``"jaxq_select"`` in its "quant_stats" (stacked
like the layer in ``nn.scan`` / ``nn.vmap`` stacks, whose layers count as one path); for
Flax NNX models, the "sim" mode of :mod:`jaxq.flax.nnx_serve` with a ``jaxq_select``
variable per layer. :func:`sensitivity` dispatches on the model's API.

One calibration pass serves every candidate width (activation ranges and the smoothing /
GPTQ statistics of ``Rule.smooth`` / ``QuantSpec(rounding="gptq")`` come from the float
forward); per width, each smoothed layer's scaling is chosen anew (``smooth="auto"``
searches with the weight spec) and each GPTQ layer's kernel is rounded on the host, with
``convert``'s default damping, before the traced simulation, so a row is what
``convert`` would serve (:func:`jaxq.flax.ptq_smooth.simulation_stats`,
:func:`jaxq.flax.nnx_ptq.transfer_calibration`, :func:`jaxq.flax.nnx_serve.simulator`).

Bit allocation (:func:`allocate_bits`): every layer starts at the smallest candidate width;
the upgrade with the largest output-noise reduction per extra weight bit (noise power
``sum y^2 / 10^(SNR/10)``, assumed additive over layers) is applied while the
parameter-weighted average width stays within the budget (greedy knapsack, as in
HAWQ-style mixed precision with a measured rather than Hessian-estimated sensitivity).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util

from jaxq.flax import nnx as jnnx
from jaxq.flax import nnx_ptq
from jaxq.flax import nnx_serve
from jaxq.flax import ptq
from jaxq.flax import ptq_smooth
from jaxq.flax.linen import layer_paths, quantize_model
from jaxq.params import check_rules
from jaxq.spec import QuantSpec, Rule, match_rule

__all__ = ["LayerSensitivity", "SensitivityReport", "sensitivity", "Allocation",
           "allocate_bits", "plot_sensitivity"]


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
  """One row: ``path`` quantized alone with weights at ``bits`` (None: the rule's)."""

  path: str
  params: int
  bits: int | None
  snr_db: float
  cosine: float


@dataclasses.dataclass
class SensitivityReport:
  """Rows for every (quantized layer, candidate width), and the rules they came from."""

  rows: list[LayerSensitivity]
  rules: tuple[Rule, ...]
  signal_power: float

  @property
  def paths(self) -> list[str]:
    seen: list[str] = []
    for r in self.rows:
      if r.path not in seen:
        seen.append(r.path)
    return seen

  @property
  def bits(self) -> list[int | None]:
    seen: list[int | None] = []
    for r in self.rows:
      if r.bits not in seen:
        seen.append(r.bits)
    return seen

  def row(self, path: str, bits: int | None) -> LayerSensitivity:
    for r in self.rows:
      if r.path == path and r.bits == bits:
        return r
    raise KeyError((path, bits))

  def table(self) -> str:
    """A printable table: one line per layer, SNR (dB) and cosine per width, the least
    sensitive layers last."""
    bits = self.bits
    head = ["layer", "params"]
    for b in bits:
      tag = "" if b is None else f"@w{b}"
      head += [f"SNR{tag} dB", f"cos{tag}"]
    body = []
    key_bits = bits[0]
    for p in sorted(self.paths, key=lambda p: self.row(p, key_bits).snr_db):
      r0 = self.row(p, key_bits)
      line = [p, str(r0.params)]
      for b in bits:
        r = self.row(p, b)
        line += [f"{r.snr_db:.2f}", f"{r.cosine:.6f}"]
      body.append(line)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])

  def __str__(self) -> str:
    return self.table()


def _float_leaves(out) -> list[jax.Array]:
  return [l for l in jax.tree_util.tree_leaves(out)
          if jnp.issubdtype(jnp.result_type(l), jnp.floating)]


def _flat(out) -> jax.Array:
  return jnp.concatenate([jnp.ravel(l).astype(jnp.float32) for l in _float_leaves(out)])


def _with_select(stats: dict, paths: Sequence[str], on: str | None) -> dict:
  """``stats`` with each layer's selection flag (1 for ``on``), shaped like its stack."""
  flat = dict(traverse_util.flatten_dict(stats))
  for p in paths:
    lp = tuple(p.split("/"))
    rank = flat.get(lp + (ptq.KERNEL_RANK,))
    flat[lp + (ptq.SELECT,)] = jnp.full(jnp.shape(rank) if rank is not None else (),
                                        float(p == on), jnp.float32)
  return traverse_util.unflatten_dict(flat)


def _kernel_size(params, path: str) -> int:
  node = params
  for part in path.split("/"):
    node = node[part]
  k = node.get("kernel") if hasattr(node, "get") else None
  return int(np.prod(jnp.shape(k))) if k is not None else 0


def _check_rules(rules) -> tuple[Rule, ...]:
  if rules is None:
    rules = (Rule(".*", weight=QuantSpec(8), act=QuantSpec(8, granularity="tensor")),)
  return check_rules(rules)


def _with_bits(rules: tuple[Rule, ...], b: int | None) -> tuple[Rule, ...]:
  """``rules`` with every weight spec at ``b`` bits (None: as given)."""
  return tuple(r if b is None or r.weight is None else
               dataclasses.replace(r, weight=r.weight.replace(bits=b)) for r in rules)


def _normalized(batches: Iterable) -> tuple[list, list]:
  raw = list(batches)
  if not raw:
    raise ValueError("batches is empty: sensitivity needs at least one batch")
  return raw, [ptq.normalize_batch(b) for b in raw]


def _measure(batches, rules, bits, float_out, quantized) -> SensitivityReport:
  """The report: for each width ``b``, ``quantized(rules at b) -> (paths, sizes, run)``,
  ``run(path, args, kwargs)`` the output with only ``path`` quantized."""
  refs = [_flat(float_out(a, k)) for a, k in batches]
  signal = float(sum(float(jnp.sum(r**2)) for r in refs))
  rows: list[LayerSensitivity] = []
  for b in (list(bits) if bits is not None else [None]):
    paths, sizes, run = quantized(_with_bits(rules, b))
    if not paths:
      raise ValueError("the rules match no Dense/DenseGeneral/Conv/Einsum (Linen) or "
                       "Linear/LinearGeneral/Conv/Einsum (NNX) layer of the model")
    for p in paths:
      noise, cos = 0.0, []
      for (a, k), ref in zip(batches, refs):
        y = _flat(run(p, a, k))
        noise += float(jnp.sum((y - ref) ** 2))
        cos.append(float(jnp.dot(y, ref) / jnp.maximum(
            jnp.linalg.norm(y) * jnp.linalg.norm(ref), 1e-30)))
      snr = float("inf") if noise == 0.0 else float(10.0 * np.log10(signal / noise))
      rows.append(LayerSensitivity(p, sizes[p], b, snr, float(np.mean(cos))))
  return SensitivityReport(rows, rules, signal)


def _linen_sensitivity(model: nn.Module, variables: dict, batches: Iterable,
                       rules=None, *, bits=None, **apply_kwargs) -> SensitivityReport:
  rules = _check_rules(rules)
  raw, batches = _normalized(batches)
  args0, kw0 = batches[0]
  paths = []
  for p in layer_paths(model, *args0, **kw0, **apply_kwargs):
    r = match_rule(rules, p)
    if r is not None and (r.weight is not None or r.act is not None):
      paths.append(p)
  sizes = {p: _kernel_size(variables["params"], p) for p in paths}

  @jax.jit
  def float_out(v, args, kwargs):
    return model.apply(v, *args, **kwargs, **apply_kwargs)

  calibrated = None  # (rules, quant_stats) of the one calibration pass

  def quantized(rb):
    nonlocal calibrated
    qmodel = quantize_model(model, rb, mode=ptq.SIM_MODE)
    if calibrated is None:
      calibrated = rb, ptq.calibrate(qmodel, variables, raw, **apply_kwargs)["quant_stats"]
    stats = ptq_smooth.simulation_stats(rb, calibrated[1], variables["params"],
                                        choose=rb != calibrated[0])

    @jax.jit
    def quant_out(v, select, args, kwargs):
      return qmodel.apply({**v, "quant_stats": select}, *args, **kwargs, **apply_kwargs)

    return paths, sizes, lambda p, a, k: quant_out(variables, _with_select(stats, paths, p),
                                                   a, k)

  return _measure(batches, rules, bits, lambda a, k: float_out(variables, a, k), quantized)


def _nnx_sensitivity(model: nnx.Module, batches: Iterable, rules=None, *, bits=None,
                     **call_kwargs) -> SensitivityReport:
  rules = _check_rules(rules)
  raw, batches = _normalized(batches)
  float_run = nnx_serve.eval_forward(model)
  calibrated = None  # the model quantized with the first width's rules, calibrated

  def quantized(rb):
    nonlocal calibrated
    qmodel = jnnx.quantize_model(model, rb)
    if calibrated is None:
      calibrated = nnx_ptq.calibrate(qmodel, raw, **call_kwargs)
    else:  # one calibration pass: its statistics do not depend on the weight width
      nnx_ptq.transfer_calibration(calibrated, qmodel)
    paths, sizes, run = nnx_serve.simulator(qmodel)
    return paths, sizes, lambda p, a, k: run(p, a, {**k, **call_kwargs})

  return _measure(batches, rules, bits, lambda a, k: float_run(a, {**k, **call_kwargs}),
                  quantized)


def sensitivity(model, *args, **kwargs) -> SensitivityReport:
  """Per-layer sensitivity of ``model``'s output to quantizing that layer alone.

  Linen: ``sensitivity(model, variables, batches, rules=None, *, bits=None,
  **apply_kwargs)``; Flax NNX: ``sensitivity(model, batches, rules=None, *, bits=None,
  **call_kwargs)`` (the model holds its variables; it is run as at inference,
  ``deterministic=True``, ``use_running_average=True``, and left unchanged).

  Args:
    model: the float model (``flax.linen.Module`` or ``flax.nnx.Module``).
    variables: (Linen) its variables.
    batches: calibration/evaluation batches (positional tuples, bare arrays or kwarg
      dicts, as :func:`jaxq.flax.ptq.calibrate`); used for activation ranges and for
      the output comparison.
    rules: which layers and how (default: int8 per-channel weights, static per-tensor
      int8 activations); every layer they match with a weight or activation spec is
      analysed (Linen: :func:`jaxq.flax.linen.layer_paths` order; NNX: attribute order).
    bits: candidate weight widths; each layer is measured at each (the rules' weight
      specs with ``bits`` replaced). None: the rules as given.
    **apply_kwargs / call_kwargs: passed to every model call.

  Returns:
    A :class:`SensitivityReport` (``.rows``, ``.table()``, ``.paths``).
  """
  if isinstance(model, nnx.Module):
    return _nnx_sensitivity(model, *args, **kwargs)
  return _linen_sensitivity(model, *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Allocation:
  """Bit widths per layer, their parameter-weighted average, and the rules to use."""

  bits: dict[str, int]
  average_bits: float
  rules: list[Rule]


def allocate_bits(report: SensitivityReport, budget: float) -> Allocation:
  """More weight bits for the most sensitive layers, average (weighted by parameter
  count) at most ``budget``; see the module docstring.

  ``report`` must come from :func:`sensitivity` with ``bits=`` candidates. The rules
  returned match each layer by its exact path (``re.escape``), with the weight spec of
  the report's rule at the allotted width (activation spec unchanged), followed by the
  report's rules for everything else.
  """
  cands = sorted(b for b in report.bits if b is not None)
  if not cands:
    raise ValueError("allocate_bits needs a report measured at candidate widths: "
                     "sensitivity(..., bits=(4, 8))")
  paths = [p for p in report.paths if report.row(p, cands[0]).params > 0]
  size = {p: report.row(p, cands[0]).params for p in paths}
  total = sum(size.values())
  if total == 0:
    raise ValueError("no analysed layer has a kernel")
  if budget < cands[0] - 1e-9:
    raise ValueError(f"budget={budget} is below the smallest candidate width {cands[0]}")

  def noise(p, b):
    snr = report.row(p, b).snr_db
    return 0.0 if np.isinf(snr) else report.signal_power / 10.0 ** (snr / 10.0)

  alloc = {p: cands[0] for p in paths}
  used = cands[0] * total
  while True:
    best = None
    for p in paths:
      i = cands.index(alloc[p])
      for nb in cands[i + 1:]:
        extra = (nb - alloc[p]) * size[p]
        if used + extra > budget * total + 1e-9:
          continue
        gain = (noise(p, alloc[p]) - noise(p, nb)) / extra
        if best is None or gain > best[0]:
          best = (gain, p, nb, extra)
    if best is None or best[0] <= 0:
      break
    _, p, nb, extra = best
    alloc[p] = nb
    used += extra
  rules = []
  for p in paths:
    base = match_rule(report.rules, p)
    rules.append(dataclasses.replace(base, path=re.escape(p),
                                     weight=base.weight.replace(bits=alloc[p])))
  return Allocation(alloc, used / total, rules + list(report.rules))


def plot_sensitivity(report: SensitivityReport, path: str, *, title: str | None = None
                     ) -> Any:
  """Saves a bar chart of per-layer SNR (dB), one bar group per layer, one bar per
  candidate width, to ``path`` (matplotlib, Agg backend). Returns the figure."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  paths, bits = report.paths, report.bits
  fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(paths) + 2), 4.0))
  width = 0.8 / len(bits)
  x = np.arange(len(paths))
  for i, b in enumerate(bits):
    snr = [report.row(p, b).snr_db for p in paths]
    ax.bar(x + i * width, snr, width, label="rule bits" if b is None else f"w{b}")
  ax.set_xticks(x + 0.4 - width / 2)
  ax.set_xticklabels(paths, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("output SNR (dB)")
  ax.set_title(title or "per-layer quantization sensitivity (one layer quantized)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return fig
