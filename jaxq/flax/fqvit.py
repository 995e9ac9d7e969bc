"""FQ-ViT's transformer quantizers for Linen models (Lin et al. 2022, "FQ-ViT: Post-Training
Quantization for Fully Quantized Vision Transformer"): the Linen adapter of
:mod:`jaxq.layer.fqvit`, which holds the math (PTF observer and serving, log2 attention).

Two rule-driven pieces, applied by a method interceptor (:func:`interceptor`) next to the
layer interceptor of :mod:`jaxq.flax.linen`:

* **PTF LayerNorm inputs** (sec. 3.2). A rule whose ``act`` spec has ``scheme="ptf"``
  matching an ``nn.LayerNorm`` path quantizes the LayerNorm's input with one layer-wise
  scale ``s`` and zero point ``z`` and a power-of-two factor ``2^alpha_c`` per channel
  (last axis): ``q = clip(round(x / (2^alpha_c s)) + z, qmin, qmax)``. In serving the
  LayerNorm statistics then need only integers and shifts: ``x_hat = ((q - z) << alpha_c)
  * s``. Calibration (FQ-ViT's ``PtfObserver``): per-channel running min / max give the
  layer range ``[lo, hi]``, ``s = s_K / 2^K`` (``K = num_factors - 1``, ``s_K`` the
  asymmetric min-max scale), and each channel takes the ``alpha_c`` with the least
  squared error on the last calibration batch.
* **log2 attention probabilities** (sec. 3.3). A rule whose ``act`` spec has
  ``scheme="log2"`` matching an ``nn.MultiHeadDotProductAttention`` (or ``SelfAttention``)
  path runs the module with an ``attention_fn`` that quantizes the softmax output,
  ``P_hat = 2^-q``, ``q = clip(round(-log2 P), 0, 2^b - 1)``; in serving ``P_hat @ V`` is
  computed from the integer codes as shifts (:func:`jaxq.estimators.log2_matmul`).

Modes: "qat" (fake quantization; PTF from the current tensor, log2 with the STE),
"calibrate"/"ptq_calibrate" (float forward; PTF observer ``quant_stats/jaxq_ptf`` updated
when mutable), "ptq_serve" (stored ``jaxq_ptf_*`` params; log2 codes), "ptq_sim" (as serving, PTF
from the calibrated observer), anything else:
unchanged float forward. A module already handled by an outer FQ-ViT interceptor is
passed through, so composing the interceptor twice is harmless.
"""

from __future__ import annotations

import functools
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.linen import attention as nn_attention

from jaxq import quantizer
from jaxq.flax.linen_layer import QUANT_STATS
from jaxq.flax.paths import module_path
from jaxq.layer.fqvit import (NUM_FACTORS, PTF_FACTOR_EXP, PTF_SCALE, PTF_STATS,
                              PTF_ZERO_POINT, log2_attention, ptf_observer_init,
                              ptf_observer_qparams, ptf_observer_update, ptf_serve)
from jaxq.spec import QuantSpec, match_rule

__all__ = ["interceptor", "log2_attention_fn", "ptf_observer_init", "ptf_observer_update", "ptf_serve",
           "ptf_observer_qparams", "convert_params", "PTF_STATS", "PTF_SCALE",
           "PTF_ZERO_POINT", "PTF_FACTOR_EXP", "NUM_FACTORS"]

_CALIBRATE = ("calibrate", "ptq_calibrate")
_SERVE = ("ptq_serve",)
_SIM = ("ptq_sim",)
_NORM_TYPES = (nn.LayerNorm,)
_ATTN_TYPES = (nn.MultiHeadDotProductAttention,)

_ACTIVE = threading.local()


def _active() -> set:
  if not hasattr(_ACTIVE, "ids"):
    _ACTIVE.ids = set()
  return _ACTIVE.ids


def _norm_call(m, mode, spec: QuantSpec, next_fun, args, kwargs):
  if not args:
    raise ValueError(
        f"LayerNorm '{'/'.join(module_path(m))}': expected its input positionally")
  x = args[0]
  if mode in _CALIBRATE:
    if m.is_mutable_collection(QUANT_STATS):
      var = m.variable(QUANT_STATS, PTF_STATS, ptf_observer_init, x.shape[-1])
      var.value = ptf_observer_update(var.value, jax.lax.stop_gradient(x), spec)
    return next_fun(*args, **kwargs)
  if mode in _SIM and m.has_variable(QUANT_STATS, PTF_STATS):
    scale, zp, fexp = ptf_observer_qparams(m.get_variable(QUANT_STATS, PTF_STATS), spec)
    x_hat = ptf_serve(x, scale, zp, fexp, spec)
  elif mode in _SERVE:
    path = "/".join(module_path(m))
    if not m.has_variable("params", PTF_SCALE):
      raise ValueError(f"LayerNorm '{path}': its PTF rule needs calibrated parameters "
                       f"'{PTF_SCALE}' (run jaxq.calibrate, then jaxq.convert)")
    x_hat = ptf_serve(x, m.get_variable("params", PTF_SCALE),
                       m.get_variable("params", PTF_ZERO_POINT),
                       m.get_variable("params", PTF_FACTOR_EXP), spec)
  else:  # qat: range and factors of the current tensor (FQ-ViT's observer, one batch)
    x_hat = quantizer.fake_quantize(x, spec)
  return next_fun(x_hat, *args[1:], **kwargs)


# --------------------------------------------------------------------------------------
# log2 attention
# --------------------------------------------------------------------------------------


def log2_attention_fn(bits: int, serving: bool = False):
  """An ``attention_fn`` for ``nn.MultiHeadDotProductAttention`` with log2-quantized
  probabilities (:func:`jaxq.layer.fqvit.log2_attention`; STE gradient). With
  ``serving``, ``P_hat @ V`` is computed from the integer codes by shifts. Dropout
  (training) applies after quantization."""

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                   dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                   precision=None, module=None, force_fp32_for_softmax=False,
                   einsum_dot_general=None, qk_attn_weights_einsum=None,
                   attn_weights_value_einsum=None):
    weights = nn_attention.dot_product_attention_weights(
        query, key, bias, mask, broadcast_dropout, None, 0.0, True, dtype, precision,
        module, force_fp32_for_softmax, einsum_dot_general=einsum_dot_general,
        einsum=qk_attn_weights_einsum)
    if attn_weights_value_einsum is not None:
      product = functools.partial(attn_weights_value_einsum, "...hqk,...khd->...qhd")
    else:
      product = functools.partial(jnp.einsum, "...hqk,...khd->...qhd", precision=precision,
                                  _dot_general=einsum_dot_general or jax.lax.dot_general)
    return log2_attention(weights, value, bits, serving=serving, dropout_rng=dropout_rng,
                          dropout_rate=dropout_rate, broadcast_dropout=broadcast_dropout,
                          deterministic=deterministic, product=product)

  return attention_fn


def _attention_call(m, mode, spec: QuantSpec, next_fun, args, kwargs):
  if mode in _CALIBRATE or mode not in _SERVE + _SIM + ("qat",):
    return next_fun(*args, **kwargs)
  if m.attention_fn is not nn_attention.dot_product_attention:
    raise ValueError(f"attention '{'/'.join(module_path(m))}': the log2 rule replaces the "
                     "softmax of nn.dot_product_attention; this module has a custom "
                     "attention_fn")
  fn = log2_attention_fn(spec.bits, serving=mode in _SERVE + _SIM)
  object.__setattr__(m, "attention_fn", fn)
  try:
    return next_fun(*args, **kwargs)
  finally:
    object.__setattr__(m, "attention_fn", nn_attention.dot_product_attention)


# --------------------------------------------------------------------------------------
# The interceptor
# --------------------------------------------------------------------------------------


def interceptor(rules, mode: str, *, root: tuple[str, ...] = ()):
  """A Linen method interceptor applying FQ-ViT rules (see module docstring).

  ``rules``: the :class:`~jaxq.spec.Rule` sequence of the quantized model (paths relative
  to ``root``, the wrapper's module path); ``mode``: the wrapper's mode.
  Use: ``with nn.intercept_methods(interceptor(rules, mode, root=module_path(self))): ...``.
  """
  rules = tuple(rules)
  root = tuple(root)
  match = functools.lru_cache(maxsize=None)(lambda p: match_rule(rules, p))

  def icpt(next_fun, args, kwargs, context):
    m = context.module
    if (context.method_name != "__call__" or m.scope is None
        or not isinstance(m, _NORM_TYPES + _ATTN_TYPES) or id(m) in _active()):
      return next_fun(*args, **kwargs)
    path_t = module_path(m)
    if path_t[:len(root)] != root:
      return next_fun(*args, **kwargs)
    rule = match("/".join(path_t[len(root):]))
    spec = None if rule is None else rule.act
    if spec is None:
      return next_fun(*args, **kwargs)
    if isinstance(m, _NORM_TYPES) and spec.scheme == "ptf":
      fn = _norm_call
    elif isinstance(m, _ATTN_TYPES) and spec.scheme == "log2":
      fn = _attention_call
    else:
      return next_fun(*args, **kwargs)
    _active().add(id(m))
    try:
      return fn(m, mode, spec, next_fun, args, kwargs)
    finally:
      _active().discard(id(m))

  return icpt


def convert_params(rules, params, stats) -> dict:
  """Serving parameters ``{(*path, name): array}`` of every PTF LayerNorm observer in
  ``stats`` whose rule asks for PTF."""
  out = {}
  for k, st in traverse_util.flatten_dict(stats, is_leaf=lambda k, v: k and k[-1] ==
                                          PTF_STATS).items():
    if k[-1] != PTF_STATS:
      continue
    rule = match_rule(rules, "/".join(k[:-1]))
    if rule is None or rule.act is None or rule.act.scheme != "ptf":
      continue
    scale, zp, fexp = ptf_observer_qparams(st, rule.act)
    out[k[:-1] + (PTF_SCALE,)] = scale
    out[k[:-1] + (PTF_ZERO_POINT,)] = zp
    out[k[:-1] + (PTF_FACTOR_EXP,)] = fexp.astype(jnp.int8)
  del params
  return out

