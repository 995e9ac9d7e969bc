"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", sec. 4.1; Nagel et al. 2021, "A White Paper on Neural
Network Quantization", sec. 3.2).

**Why the function is kept.** Take ``y = W2 * f(a(W1 * x))`` where ``*`` is a Conv/Dense,
``a`` any per-channel affine map ``a(z)_i = g_i z_i + b_i`` of layer 1's output channels
(its own bias, a folded BatchNorm's scale and shift, ...) and ``f`` elementwise and
positively homogeneous: ``f(z / s) = f(z) / s`` for ``s > 0`` (ReLU, leaky ReLU, the
identity; *not* ReLU6, whose clip at 6 does not scale, nor GELU/SiLU). Scaling output
channel ``i`` of W1 and every bias ``b_i`` by ``1 / s_i`` scales channel ``i`` of ``f(a(.))``
by ``1 / s_i``; scaling every weight of W2 that reads input channel ``i`` by ``s_i`` undoes
it exactly. For a Conv with ``G = feature_group_count`` groups, kernel
``(*window, C / G, O)``, input channel ``i = g * (C / G) + j`` is read by
``W2[..., j, g * O / G : (g + 1) * O / G]`` only (depthwise: ``C / G = 1``, channel ``i`` is
read by the ``O / C`` outputs of its own group).

**Two layers.** With ranges ``r1_i = max |W1[..., i]|`` and ``r2_i`` = max over the weights
of W2 reading channel ``i``, ``s_i = sqrt(r1_i * r2_i) / r2_i`` (``= sqrt(r1_i / r2_i)``)
makes both ``r1_i / s_i`` and ``r2_i * s_i`` equal to ``sqrt(r1_i r2_i)``: the paper's
optimum of ``sum_i p1_i p2_i``, the products of the two layers' per-channel precisions
``p_i = r_i / R`` (``R`` the tensor's range), so that a per-tensor quantizer does not flush
small channels to zero.

**Three layers** ``A -> B -> C`` with ``B`` depthwise (one output per input channel): channel
``i`` of A's output is channel ``i`` of B's output, so it is scaled twice: A by
``1 / s1_i``, B by ``s1_i / s2_i`` (input ``s1_i``, output ``1 / s2_i``, B's biases by
``1 / s2_i``), C's input by ``s2_i``. Setting the three ranges equal,
``rA_i / s1_i = rB_i s1_i / s2_i = rC_i s2_i = m_i`` gives ``m_i^3 = rA_i rB_i rC_i`` (the
scales cancel in the product), so ``m_i = cbrt(rA_i rB_i rC_i)``, ``s1_i = rA_i / m_i`` and
``s2_i = m_i / rC_i``: the fixed point that equalizing the pairs ``(A, B), (B, C)`` in turn
converges to (Nagel et al. 2019 iterate; here it is closed form). Channels with a zero or
non-finite range keep scale 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.fold.tree import layer_at, layer_kernel, mutable_copy, set_entry

__all__ = ["EqualizationPair", "equalization_scales", "equalize"]


class EqualizationPair(NamedTuple):
  """``second(f(first(x) + biases))``: what :func:`equalize` takes and may rescale.

  ``biases``: paths of the other layers whose ``"bias"`` is added per output channel of
  ``first`` before ``f`` (e.g. the BatchNorm that :func:`jaxq.fold.fold_batchnorm`
  folded ``first`` into when ``first`` has no bias of its own); ``first``'s own bias is
  always included.
  """

  first: str
  second: str
  biases: tuple[str, ...] = ()


def _max_abs(w: np.ndarray, keep: tuple[int, ...]) -> np.ndarray:
  """``max |w|`` over every axis not in ``keep``."""
  keep = tuple(k % w.ndim for k in keep)
  return np.max(np.abs(w), axis=tuple(k for k in range(w.ndim) if k not in keep))


def _groups(channels: int, w2: np.ndarray, names: str) -> int:
  """Groups ``G`` of a layer 2 reading ``channels`` inputs: kernel ``(..., C / G, O)``."""
  per_group, out = w2.shape[-2], w2.shape[-1]
  groups = channels // per_group if per_group and channels % per_group == 0 else 0
  if groups < 1 or out % groups or (groups > 1 and w2.ndim < 3):
    raise ValueError(
        f"{names}: layer 1's {channels} output channels must match layer 2's input "
        f"channels: its kernel {tuple(w2.shape)} reads {per_group} per group, so "
        f"{channels} channels need feature_group_count = {channels} / {per_group} groups, "
        f"which must divide its {out} outputs (a Dense reads all its inputs)")
  return groups


def _input_ranges(w2: np.ndarray, groups: int) -> np.ndarray:
  """``r2_i``: max |weight| of W2 reading input channel ``i = g * (C / G) + j``."""
  per_group, out = w2.shape[-2], w2.shape[-1]
  w = w2.reshape(w2.shape[:-1] + (groups, out // groups))  # (..., j, g, o)
  return _max_abs(w, (-3, -2)).T.reshape(groups * per_group)  # (j, g) -> i


def _input_multiplier(s: np.ndarray, w2: np.ndarray, groups: int) -> np.ndarray:
  """``s`` over input channels laid out as W2's ``(C / G, O)``: entry ``[j, g * O/G + o]``."""
  per_group, out = w2.shape[-2], w2.shape[-1]
  m = s.reshape(groups, per_group).T[:, :, None]  # (j, g, 1)
  return np.broadcast_to(m, (per_group, groups, out // groups)).reshape(per_group, out)


def _pair_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    s = np.sqrt(r1 * r2) / r2
  return np.where((r1 > 0) & (r2 > 0) & np.isfinite(s), s, 1.0)


def equalization_scales(w1: jax.Array, w2: jax.Array) -> jax.Array:
  """Per-channel CLE scales ``s_i = (1 / r2_i) * sqrt(r1_i * r2_i)`` (Nagel et al. 2019).

  ``r1_i = max |w1[..., i]|`` (output channel ``i`` of layer 1, last axis) and ``r2_i`` the
  max |weight| of ``w2`` reading input channel ``i``: ``max |w2[..., i, :]|``, or for a
  grouped/depthwise Conv kernel ``(*window, C / G, O)`` (``G = C / w2.shape[-2]``) the
  weights of channel ``i``'s group (module docstring). Channels where either range is 0
  (or not finite) get ``s_i = 1``.
  """
  dtype = jnp.promote_types(jnp.result_type(w1), jnp.float32)
  w1, w2 = _float64(w1), _float64(w2)
  if w1.ndim < 2 or w2.ndim < 2:
    raise ValueError(f"kernels must have rank >= 2; got shapes {w1.shape} and {w2.shape}")
  groups = _groups(w1.shape[-1], w2, f"kernels {w1.shape} -> {w2.shape}")
  return jnp.asarray(_pair_scales(_max_abs(w1, (-1,)), _input_ranges(w2, groups)), dtype)


def _float64(w) -> np.ndarray:
  return np.asarray(w).astype(np.float64)


def _chain_scales(ra, rb, rc) -> tuple[np.ndarray, np.ndarray]:
  """``(s1, s2)`` equalizing the ranges ``rA / s1 = rB s1 / s2 = rC s2`` (docstring)."""
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    m = np.cbrt(ra * rb * rc)
    s1, s2 = ra / m, m / rc
  ok = (ra > 0) & (rb > 0) & (rc > 0) & np.isfinite(s1) & np.isfinite(s2)
  return np.where(ok, s1, 1.0), np.where(ok, s2, 1.0)


def _parse_pairs(pairs) -> list[EqualizationPair]:
  out = []
  for pair in pairs:
    if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) not in (2, 3):
      raise ValueError("pairs must hold (layer1_path, layer2_path) or (layer1_path, "
                       f"layer2_path, bias_paths) tuples; got {pair!r}")
    biases = pair[2] if len(pair) == 3 else ()
    if isinstance(biases, str) or not isinstance(biases, Sequence):
      raise ValueError(f"bias_paths of pair {pair!r} must be a tuple of layer paths; got "
                       f"{biases!r}")
    out.append(EqualizationPair(pair[0], pair[1], tuple(biases)))
  for role in ("first", "second"):
    seen: set[str] = set()
    for p in out:
      name = getattr(p, role)
      if name in seen:
        raise ValueError(
            f"{name!r} is the {role} layer of more than one pair: a layer's output channels "
            "(or its input channels) can be rescaled by one pair only")
      seen.add(name)
  owners: dict[str, str] = {}
  for p in out:
    if p.first == p.second:
      raise ValueError(f"pair {tuple(p)!r} names the same layer twice")
    for b in p.biases:
      if b in owners or b == p.first:
        raise ValueError(f"bias {b!r} is listed twice ({owners.get(b, p.first)!r} and "
                         f"{p.first!r}): each per-channel bias follows one layer")
      owners[b] = p.first
  return out


class _Float64Params:
  """The kernels and biases being equalized, in float64 until :meth:`write_back`."""

  def __init__(self, params: Mapping):
    self.params = params
    self.values: dict[tuple[str, str], np.ndarray] = {}
    self.dtypes: dict[tuple[str, str], jnp.dtype] = {}

  def get(self, path: str, name: str) -> np.ndarray:
    if (path, name) not in self.values:
      layer = layer_at(self.params, path, "params")
      value = layer_kernel(layer, path, "params") if name == "kernel" else layer[name]
      self.dtypes[path, name] = jnp.result_type(value)
      self.values[path, name] = _float64(value)
    return self.values[path, name]

  def set(self, path: str, name: str, value: np.ndarray) -> None:
    self.values[path, name] = value

  def write_back(self) -> dict:
    out = mutable_copy(self.params)
    for (path, name), value in self.values.items():
      set_entry(out, path, name, jnp.asarray(value, self.dtypes[path, name]))
    return out


def _bias_paths(params, pair: EqualizationPair, channels: int) -> list[str]:
  """Every layer whose ``"bias"`` belongs to ``pair.first``'s ``channels`` outputs."""
  own = layer_at(params, pair.first, "params").get("bias") is not None
  paths = ([pair.first] if own else []) + list(pair.biases)
  for path in paths:
    layer = layer_at(params, path, "params")
    if layer.get("bias") is None:
      raise ValueError(f"params[{path!r}] (listed as a bias of {pair.first!r}) has no "
                       f"'bias'; keys: {sorted(map(str, layer))}")
    shape = jnp.shape(layer["bias"])
    if shape != (channels,):
      raise ValueError(f"params[{path!r}]['bias'] must have shape ({channels},), one entry "
                       f"per output channel of {pair.first!r}; got {shape}")
  return paths


def _divide_outputs(work: _Float64Params, pair: EqualizationPair, s: np.ndarray) -> None:
  """Layer 1's output channel ``i`` and each bias it owns, divided by ``s_i``."""
  for path in _bias_paths(work.params, pair, len(s)):
    work.set(path, "bias", work.get(path, "bias") / s)
  work.set(pair.first, "kernel", work.get(pair.first, "kernel") / s)


def _multiply_inputs(work: _Float64Params, path: str, s: np.ndarray, groups: int) -> None:
  w2 = work.get(path, "kernel")
  work.set(path, "kernel", w2 * _input_multiplier(s, w2, groups))


def _kernels(work: _Float64Params, pair: EqualizationPair):
  """``(W1, W2, groups of W2)`` in float64."""
  w1, w2 = work.get(pair.first, "kernel"), work.get(pair.second, "kernel")
  groups = _groups(w1.shape[-1], w2, f"pair ({pair.first!r}, {pair.second!r})")
  return w1, w2, groups


def _is_depthwise(w1: np.ndarray, w2: np.ndarray) -> bool:
  """W2 reads channel ``i`` of W1 alone and writes it to its own output channel ``i``."""
  return w2.ndim >= 3 and w2.shape[-2] == 1 and w2.shape[-1] == w1.shape[-1]


def _equalize_pair(work: _Float64Params, pair: EqualizationPair) -> None:
  w1, w2, groups = _kernels(work, pair)
  s = _pair_scales(_max_abs(w1, (-1,)), _input_ranges(w2, groups))
  _divide_outputs(work, pair, s)
  _multiply_inputs(work, pair.second, s, groups)


def _equalize_chain(work: _Float64Params, ab: EqualizationPair,
                    bc: EqualizationPair) -> None:
  wa, wb, _ = _kernels(work, ab)
  _, wc, groups_c = _kernels(work, bc)
  ra, rb = _max_abs(wa, (-1,)), _max_abs(wb, (-1,))
  s1, s2 = _chain_scales(ra, rb, _input_ranges(wc, groups_c))
  _divide_outputs(work, ab, s1)
  _multiply_inputs(work, ab.second, s1, wa.shape[-1])
  _divide_outputs(work, bc, s2)
  _multiply_inputs(work, bc.second, s2, groups_c)


def equalize(params: Mapping, pairs: Sequence, *, iterations: int = 1) -> dict:
  """Cross-layer equalization of layer pairs (Nagel et al. 2019; math: module docstring).

  Args:
    params: the "params" tree (Linen ``variables["params"]`` or an NNX pure dict), e.g.
      after :func:`jaxq.fold.fold_batchnorm`.
    pairs: ``(layer1, layer2)`` or ``(layer1, layer2, bias_paths)`` tuples
      (:class:`EqualizationPair`), best from :func:`jaxq.fold.find_equalization_pairs`,
      which proves each one on the model's function. Each states that layer 2's only
      input is ``f(layer1(x) + biases)`` with ``f`` positively homogeneous, that layer 1's
      output feeds nothing else, and that ``bias_paths`` lists every other per-channel
      bias added to layer 1's output (a folded BatchNorm's); layer 2 may be a grouped or
      depthwise Conv. A layer can be the first of one pair and the second of one pair.
    iterations: passes over ``pairs``. Chains ``(A, B), (B, C)`` with ``B`` depthwise
      (one output channel per input channel, as in MobileNet) are equalized jointly in
      closed form; other chains converge over passes (the paper iterates).

  Returns:
    A new params tree (the input is not modified): ``W1[..., i] / s_i``, each bias of
    layer 1's channel ``i`` ``/ s_i``, layer 2's weights reading channel ``i`` ``* s_i``.
  """
  if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
    raise ValueError(f"iterations must be a positive int; got {iterations!r}")
  parsed = _parse_pairs(pairs)
  work = _Float64Params(params)
  by_first = {p.first: p for p in parsed}
  for p in parsed:  # check every pair before changing anything
    _bias_paths(params, p, _kernels(work, p)[0].shape[-1])
  chained: dict[str, EqualizationPair] = {}  # first pair of a depthwise chain -> its second
  used: set[EqualizationPair] = set()
  for p in parsed:
    nxt = by_first.get(p.second)
    if nxt is not None and not {p, nxt} & used and _is_depthwise(*_kernels(work, p)[:2]):
      chained[p.first] = nxt
      used |= {p, nxt}
  seconds = set(chained.values())
  for _ in range(iterations):
    for p in parsed:
      if p.first in chained:
        _equalize_chain(work, p, chained[p.first])
      elif p not in seconds:
        _equalize_pair(work, p)
  return work.write_back()
