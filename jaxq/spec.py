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

GRANULARITIES = ("tensor", "channel", "group")
ROUNDINGS = ("nearest", "stochastic")
ESTIMATORS = ("ste", "lsq", "pact")
CALIBRATIONS = ("minmax", "ema", "percentile", "mse")
SCHEMES = ("uniform", "log2", "ptf")


def _check_choice(name: str, value, allowed: tuple) -> None:
  if value not in allowed:
    raise ValueError(
        f"QuantSpec.{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _check_bool(owner: str, name: str, value) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{owner}.{name} must be True or False; got {value!r}")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_real(name: str, value, lo: float, hi: float, *, hi_open: bool) -> None:
  """``value`` must be a real number (not a bool or a string) in ``(lo, hi)`` or
  ``(lo, hi]``."""
  ok = (isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_)))
  if ok:
    v = float(value)
    ok = lo < v < hi or (not hi_open and v == hi)
  if not ok:
    interval = f"({lo:g}, {hi:g}{')' if hi_open else ']'}"
    raise ValueError(f"QuantSpec.{name} must be a number in {interval}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one tensor is quantized.

  Attributes:
    bits: integer width, 1..8 (NumPy integers are stored as int).
    signed: signed integer range ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
    symmetric: zero point fixed at 0 (else affine, with a zero point).
    granularity: "tensor" (one scale), "channel" (one per index of ``axis``) or "group"
      (one per ``group_size`` consecutive elements along the contraction axis, per
      channel: the input axis of a Dense/Conv kernel, the last axis of an activation,
      axis 0 of a bare array given to :func:`jaxq.quantize`).
    axis: the kept channel axis for "channel" and "group".
    group_size: elements per group; required for, and only allowed with, "group".
    rounding: "nearest" (half to even) or "stochastic" (``floor(x / s + u)``, u uniform,
      from a PRNG key). Without a key, :func:`jaxq.quantize`,
      :func:`jaxq.quantizer.fake_quantize` and :func:`jaxq.quantize_params` raise
      ValueError; the Flax modules (``jaxq.quantize_model``, ``jaxq.nnx.quantize_model``)
      draw keys from the rng stream "jaxq" and round to nearest when it is not given.
    estimator: gradient of the fake-quant op: "ste", "lsq" (learned step size, LSQ+ when
      asymmetric) or "pact" (learned clipping level; unsigned).
    calibration: range setting: "minmax", "ema" (bias-corrected EMA of min/max),
      "percentile" or "mse" (search over clipping ranges).
    pow2_scale: round every scale to a power of two.
    scheme: "uniform"; "log2" (FQ-ViT log2 quantizer for attention probabilities in
      (0, 1]) or "ptf" (FQ-ViT power-of-two factors per channel, for LayerNorm inputs).
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
  """

  path: str = ".*"
  weight: QuantSpec | None = dataclasses.field(default_factory=QuantSpec)
  act: QuantSpec | None = None
  act_compress: Any = None  # int | jaxq.act.SampleBits | None

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
    if self.weight is not None and self.weight.scheme != "uniform":
      raise ValueError(
          f"Rule.weight: QuantSpec.scheme must be 'uniform' for weights; got "
          f"{self.weight.scheme!r} (log2 and ptf are activation schemes: log2 codes only "
          "(0, 1], ptf is per LayerNorm channel)")
    from jaxq.act.adaptive import SampleBits  # pylint: disable=import-outside-toplevel
    c = self.act_compress
    if c is not None and not isinstance(c, SampleBits) and (
        not _is_int(c) or c not in (1, 2, 4, 8)):
      raise ValueError(f"Rule.act_compress must be None, one of 1, 2, 4, 8, or a "
                       f"jaxq.act.SampleBits; got {c!r}")

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.path, path) is not None


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
