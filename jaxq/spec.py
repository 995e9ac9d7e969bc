"""What to quantize and how: :class:`QuantSpec` (one tensor) and :class:`Rule` (one layer).

Both are frozen, hashable dataclasses validated at construction, so a bad value fails
where it is written, and a spec can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

import numpy as np

from jaxq import numerics
from jaxq.bitpack import PACK_BITS
from jaxq.nf4 import check_nf4_fields
from jaxq.sample_bits import SampleBits

GRANULARITIES = ("tensor", "channel", "group")
ROUNDINGS = ("nearest", "stochastic", "gptq")
SMOOTH_MODES = ("auto",)
ESTIMATORS = ("ste", "lsq", "pact")
#: Estimators whose step (LSQ, LSQ+) or clipping level (PACT) is a learned parameter.
LEARNED_ESTIMATORS = ("lsq", "pact")
CALIBRATIONS = ("minmax", "ema", "percentile", "mse")
SCHEMES = ("uniform", "log2", "ptf", "nf4")
#: Schemes a layer's weight (kernel) may use; "nf4" is weight-only.
WEIGHT_SCHEMES = ("uniform", "nf4")


def _check_choice(name: str, value, allowed: tuple) -> None:
  if value not in allowed:
    raise ValueError(
        f"QuantSpec.{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _check_bool(owner: str, name: str, value) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{owner}.{name} must be True or False; got {value!r}")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, (bool, np.bool_)))


def _check_real(name: str, value, lo: float, hi: float, *, hi_open: bool) -> None:
  """``value`` must be a real number (not a bool or a string) in ``(lo, hi)`` or
  ``(lo, hi]``."""
  ok = _is_real(value)
  if ok:
    v = float(value)
    ok = lo < v < hi or (not hi_open and v == hi)
  if not ok:
    interval = f"({lo:g}, {hi:g}{')' if hi_open else ']'}"
    raise ValueError(f"QuantSpec.{name} must be a number in {interval}; got {value!r}")


#: NF4 rounds to the nearest level with absmax ranges and a straight-through gradient:
#: the only values these fields may take with ``scheme="nf4"``.
_NF4_FIXED = (("estimator", "ste"), ("rounding", "nearest"), ("calibration", "minmax"),
              ("pow2_scale", False), ("dynamic", False))


def _check_nf4(spec) -> None:
  """``scheme="nf4"``: 4 bits, "group", signed, symmetric, and nothing NF4 would ignore."""
  check_nf4_fields(spec.bits, spec.granularity, spec.group_size, spec.signed,
                   spec.symmetric)
  for name, value in _NF4_FIXED:
    if getattr(spec, name) != value:
      raise ValueError(f"QuantSpec.{name} must be {value!r} for scheme='nf4' (absmax per "
                       f"group, nearest level, straight-through); got "
                       f"{getattr(spec, name)!r}")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one tensor is quantized.

  Attributes:
    bits: integer width, 1..8 (NumPy integers are stored as int).
    signed: signed integer range ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
    symmetric: zero point fixed at 0 (else affine, with a zero point).
    granularity: "tensor" (one scale), "channel" (one per index of ``axis``) or "group"
      (one per ``group_size`` consecutive elements of the grouped axis and per index of
      ``axis``; when ``axis`` is the grouped axis itself, a group's scale is shared by
      every other index). The grouped axis is the contraction axis, which the context
      fixes: ``group_axis`` (default 0) of a bare array given to :func:`jaxq.quantize` /
      :func:`jaxq.quantizer.fake_quantize`; in :func:`jaxq.quantize_params` and the Flax
      layers, the rows of a kernel's ``(K, N)`` view (contracted axes flattened, so a
      Conv group is ``group_size`` input channels at one ``(kh, kw)``: the result of
      ``jaxq.quantize(w.reshape(K, N), spec)``; an embedding groups its last axis) and
      the feature (last) axis of a layer's activation.
    axis: the kept channel axis for "channel" and "group". What each context accepts
      (anything else is a ValueError that says so): a bare array, any axis; a layer's
      weight (params tree or Flax layer), an output axis of its kernel (default -1); a
      layer's activation, -1 (its input features).
    group_size: elements per group; required for, and only allowed with, "group".
    rounding: "nearest" (half to even) or "stochastic" (``floor(x / s + u)``, u uniform,
      from a PRNG key). Without a key, :func:`jaxq.quantize`,
      :func:`jaxq.quantizer.fake_quantize` and :func:`jaxq.quantize_params` raise
      ValueError; the Flax modules (``jaxq.quantize_model``, ``jaxq.nnx.quantize_model``)
      draw keys from the rng stream "jaxq" and round to nearest when it is not given.
      "gptq" (weights only): ``convert`` rounds the kernel with GPTQ (:mod:`jaxq.gptq`)
      from the Hessian that ``calibrate`` accumulates; everywhere else (QAT, ``quantize``,
      fake quantization) it rounds to nearest.
    estimator: gradient of the fake-quant op: "ste", "lsq" (learned step size, LSQ+ when
      asymmetric) or "pact" (learned clipping level; unsigned).
    calibration: range setting: "minmax", "ema" (bias-corrected EMA of min/max),
      "percentile" or "mse" (search over clipping ranges).
    pow2_scale: round every scale to a power of two.
    scheme: "uniform"; "log2" (FQ-ViT log2 quantizer for attention probabilities in
      (0, 1]) or "ptf" (FQ-ViT power-of-two factors per channel, for LayerNorm inputs);
      "nf4" (QLoRA's NormalFloat-4 codebook with absmax per group, :mod:`jaxq.nf4`;
      weights only): needs ``bits=4``, ``granularity="group"`` with a ``group_size``,
      signed and symmetric.
    percentile: upper percentile of ``|x|`` (or of each tail) used by "percentile".
    ema_decay: decay of the "ema" observer.
    dynamic: activations only: compute the range from each input at run time, per
      token (per row of the last axis), instead of from calibrated statistics.
  """

  bits: int = 8
  signed: bool = True
  symmetric: bool = True
  granularity: str = "channel"
  axis: int = -1
  group_size: int | None = None
  rounding: str = "nearest"
  estimator: str = "ste"
  calibration: str = "minmax"
  pow2_scale: bool = False
  scheme: str = "uniform"
  percentile: float = 99.99
  ema_decay: float = 0.9
  dynamic: bool = False

  def __post_init__(self):
    numerics.check_bits(self.bits, "QuantSpec.bits")
    # NumPy integers are accepted and stored as int (hashing and equality as for int).
    for name in ("bits", "axis", "group_size"):
      if _is_int(getattr(self, name)):
        object.__setattr__(self, name, int(getattr(self, name)))
    for name in ("signed", "symmetric", "pow2_scale", "dynamic"):
      _check_bool("QuantSpec", name, getattr(self, name))
    _check_choice("granularity", self.granularity, GRANULARITIES)
    _check_choice("rounding", self.rounding, ROUNDINGS)
    _check_choice("estimator", self.estimator, ESTIMATORS)
    _check_choice("calibration", self.calibration, CALIBRATIONS)
    _check_choice("scheme", self.scheme, SCHEMES)
    if not _is_int(self.axis):
      raise ValueError(f"QuantSpec.axis must be an int; got {self.axis!r}")
    if self.granularity == "group":
      if not _is_int(self.group_size) or self.group_size < 1:
        raise ValueError(
            "QuantSpec.group_size must be a positive int when granularity='group'; "
            f"got {self.group_size!r}")
    elif self.group_size is not None:
      raise ValueError(
          "QuantSpec.group_size is only allowed with granularity='group'; got "
          f"group_size={self.group_size!r} with granularity={self.granularity!r}")
    if self.scheme == "nf4":
      _check_nf4(self)
    if self.symmetric and self.scheme == "uniform":
      try:
        numerics.check_symmetric_range(self.bits, self.signed)
      except ValueError as e:
        raise ValueError(f"QuantSpec.bits: {e}") from None
    if self.estimator == "pact" and (self.signed or not self.symmetric):
      raise ValueError(
          "QuantSpec.estimator='pact' quantizes clip(x, 0, alpha) unsigned: it needs "
          "signed=False and symmetric=True")
    _check_real("percentile", self.percentile, 0.0, 100.0, hi_open=False)
    _check_real("ema_decay", self.ema_decay, 0.0, 1.0, hi_open=True)

  @property
  def qmin(self) -> int:
    return numerics.int_range(self.bits, self.signed)[0]

  @property
  def qmax(self) -> int:
    return numerics.int_range(self.bits, self.signed)[1]

  def replace(self, **changes) -> QuantSpec:
    """A copy with ``changes`` applied (and validated)."""
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Rule:
  """Which layers to quantize, and how.

  Attributes:
    path: regular expression, ``re.fullmatch``-ed against the "/"-joined module path
      (e.g. "encoder/layer_0/attention/query"). The first matching rule wins; a layer
      no rule matches stays in float.
    weight: spec for the layer's kernel, or None to keep it in float. Its scheme must
      be "uniform": "log2" codes only (0, 1] and "ptf" is a per-channel activation
      scheme for LayerNorm inputs; neither can hold a layer's (signed) weights.
    act: spec for the layer's input activation, or None to keep it in float.
    act_compress: None, or bits (1, 2, 4, 8), or per-sample widths
      (:class:`jaxq.act.SampleBits`), for activation-compressed training of the matched
      module's whole computation (:func:`jaxq.act.compressed_vjp`).
    smooth: None, a float alpha in [0, 1] or "auto": equivalent per-input-channel
      scaling ``quant(x / s) @ quant(s W)`` chosen at ``convert`` from calibration
      statistics (SmoothQuant's formula for alpha; "auto": a search on held-back
      calibration tokens, AWQ's for a weight-only rule; :mod:`jaxq.layer.smooth`).
    lora: None, or a :class:`LoRA`: the matched layer learns a low-rank adapter over
      its frozen (quantized, with a weight spec) kernel (:mod:`jaxq.layer.lora`).
  """

  path: str = ".*"
  weight: QuantSpec | None = dataclasses.field(default_factory=QuantSpec)
  act: QuantSpec | None = None
  act_compress: Any = None  # int | jaxq.act.SampleBits | None
  smooth: Any = None  # float in [0, 1] | "auto" | None
  lora: LoRA | None = None

  def __post_init__(self):
    if not isinstance(self.path, str):
      raise ValueError(f"Rule.path must be a regular expression string; got {self.path!r}")
    try:
      re.compile(self.path)
    except re.error as e:
      raise ValueError(f"Rule.path={self.path!r} is not a valid regular expression: {e}"
                       ) from None
    for name in ("weight", "act"):
      value = getattr(self, name)
      if value is not None and not isinstance(value, QuantSpec):
        raise ValueError(f"Rule.{name} must be a QuantSpec or None; got {value!r}")
    if self.weight is not None and self.weight.scheme not in WEIGHT_SCHEMES:
      raise ValueError(
          f"Rule.weight: QuantSpec.scheme must be 'uniform' or 'nf4' for weights; got "
          f"{self.weight.scheme!r} (log2 and ptf are activation schemes: log2 codes only "
          "(0, 1], ptf is per LayerNorm channel)")
    if self.act is not None and self.act.scheme == "nf4":
      raise ValueError("Rule.act: QuantSpec.scheme='nf4' is a weight-only codebook (NF4 "
                       "levels fit normally distributed weights); use scheme='uniform' "
                       "for activations")
    if self.lora is not None and not isinstance(self.lora, LoRA):
      raise ValueError(f"Rule.lora must be a jaxq.LoRA or None; got {self.lora!r}")
    c = self.act_compress
    if c is not None and not isinstance(c, SampleBits) and (
        not _is_int(c) or c not in PACK_BITS):
      raise ValueError(f"Rule.act_compress must be None, one of "
                       f"{', '.join(map(str, PACK_BITS))}, or a jaxq.act.SampleBits; got {c!r}")
    _check_ptq_fields(self)

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.path, path) is not None


@dataclasses.dataclass(frozen=True)
class LoRA:
  """A low-rank adapter (Hu et al. 2021, "LoRA"; over a 4-bit base: Dettmers et al.
  2023, "QLoRA").

  A matched layer computes ``base(x) + (alpha / rank) * (dropout(x) @ A) @ B`` on its
  2-D views, ``A: (K, rank)``, ``B: (rank, N)`` (:mod:`jaxq.layer.lora`).

  Attributes:
    rank: the adapter's rank, an int >= 1.
    alpha: the scaling numerator, a number > 0; None means ``rank`` (scaling 1).
    dropout: dropout rate on the adapter's input, in ``[0, 1)``.
  """

  rank: int
  alpha: float | None = None
  dropout: float = 0.0

  def __post_init__(self):
    if not _is_int(self.rank) or self.rank < 1:
      raise ValueError(f"LoRA.rank must be an int >= 1; got {self.rank!r}")
    object.__setattr__(self, "rank", int(self.rank))
    alpha = self.rank if self.alpha is None else self.alpha
    if not _is_real(alpha) or not 0 < float(alpha) < float("inf"):
      raise ValueError(f"LoRA.alpha must be a finite number > 0 (or None: rank); got "
                       f"{self.alpha!r}")
    object.__setattr__(self, "alpha", float(alpha))
    if not _is_real(self.dropout) or not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"LoRA.dropout must be a number in [0, 1); got {self.dropout!r}")
    object.__setattr__(self, "dropout", float(self.dropout))

  @property
  def scaling(self) -> float:
    """``alpha / rank``, the factor on the adapter's output."""
    return self.alpha / self.rank


def _check_ptq_fields(rule: Rule) -> None:
  """``Rule.act`` cannot be GPTQ-rounded; ``Rule.smooth`` needs a spec to smooth for,
  and a static activation range it can rescale exactly (min-max, uniform)."""
  if rule.act is not None and rule.act.rounding == "gptq":
    raise ValueError("Rule.act: QuantSpec.rounding='gptq' rounds weights only (convert "
                     "GPTQ-rounds the kernel); use 'nearest' or 'stochastic' for the "
                     "activation")
  sm = rule.smooth
  if sm is None:
    return
  if isinstance(sm, str):
    if sm not in SMOOTH_MODES:
      raise ValueError(f"Rule.smooth must be None, a float in [0, 1] or 'auto'; got {sm!r}")
  elif isinstance(sm, (bool, np.bool_)) or not isinstance(
      sm, (int, float, np.integer, np.floating)) or not 0.0 <= float(sm) <= 1.0:
    raise ValueError(f"Rule.smooth must be None, a float in [0, 1] or 'auto'; got {sm!r}")
  if rule.weight is None and rule.act is None:
    raise ValueError("Rule.smooth needs Rule.weight or Rule.act: smoothing moves "
                     "quantization difficulty between them; both are None")
  a = rule.act
  if a is not None and (a.scheme != "uniform" or a.estimator != "ste" or (
      not a.dynamic and a.calibration != "minmax")):
    raise ValueError(
        "Rule.smooth with Rule.act needs a uniform 'ste' activation spec that is dynamic "
        "or calibrated 'minmax' (its range is rescaled exactly by 1/s at convert); got "
        f"scheme={a.scheme!r}, estimator={a.estimator!r}, calibration={a.calibration!r}")


def check_spec(spec, schemes: tuple[str, ...] | None = None, where: str = "") -> QuantSpec:
  """``spec`` if it is a :class:`QuantSpec` (TypeError otherwise) whose scheme is one of
  ``schemes`` when given (ValueError naming them, and ``where``, otherwise)."""
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"spec must be a jaxq.QuantSpec; got {type(spec).__name__}")
  if schemes is not None and spec.scheme not in schemes:
    raise ValueError(f"{where}{': ' if where else ''}QuantSpec.scheme must be one of "
                     f"{', '.join(map(repr, schemes))}; got {spec.scheme!r}")
  return spec


def learned_step(spec: QuantSpec | None, *, act: bool = False) -> bool:
  """Whether ``spec``'s step is a learned parameter (LSQ, LSQ+, PACT on a uniform grid).

  ``dynamic`` is an activation option (``act=True``): a dynamic activation spec has no
  learned step; on a weight spec the flag has no effect.
  """
  return (spec is not None and spec.scheme == "uniform"
          and spec.estimator in LEARNED_ESTIMATORS and not (act and spec.dynamic))


def changes_contraction(rule: Rule) -> bool:
  """Whether ``rule`` changes a matched layer's contraction (a weight or activation
  spec, or a LoRA adapter), as opposed to only compressing the module's residuals."""
  return rule.weight is not None or rule.act is not None or rule.lora is not None


def match_rule(rules, path: str) -> Rule | None:
  """The first rule in ``rules`` whose ``path`` fully matches ``path``, else None."""
  i = rule_index(rules, path)
  return None if i is None else rules[i]


def rule_index(rules, path: str) -> int | None:
  """The index in ``rules`` of the first rule whose ``path`` fully matches ``path``."""
  for i, rule in enumerate(rules):
    if rule.matches(path):
      return i
  return None


def warn_unused_rules(rules, used, model_name: str, *, stacklevel: int = 2) -> None:
  """A ``UserWarning`` naming each rule whose index is not in ``used`` (it is the first
  match of no module: a typo in its regex, or shadowed by an earlier rule).

  Issued with :func:`warnings.warn`, whose registry shows each distinct message once per
  call site under the default filter, so a model traced many times warns once.
  """
  for i, rule in enumerate(rules):
    if i not in used:
      warnings.warn(
          f"Rule(path={rule.path!r}), rule {i} of the rules quantizing {model_name}, "
          "matches no module (first match wins; re.fullmatch on '/'-joined module "
          "paths): check its regex", UserWarning, stacklevel=stacklevel + 1)
