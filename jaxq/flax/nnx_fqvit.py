"""FQ-ViT's transformer quantizers for NNX models: the NNX adapter of
:mod:`jaxq.layer.fqvit` (the Linen one is :mod:`jaxq.flax.fqvit`).

:func:`jaxq.nnx.quantize_model` hands this module the layers that a rule with an FQ-ViT
activation scheme matches:

* an ``nnx.LayerNorm`` with ``act.scheme == "ptf"``: its input is PTF-quantized (one
  layer-wise scale and zero point, a power-of-two factor per channel);
* an ``nnx.MultiHeadAttention`` with ``act.scheme == "log2"``: its softmax probabilities
  are log2-quantized (its ``attention_fn`` must be Flax's ``dot_product_attention``).

The layer's class is swapped for a subclass (as for quantized contractions) whose
``__call__`` runs the layer's own code, with the input (LayerNorm) or the
``attention_fn`` (attention) replaced according to the layer's ``jaxq_mode``:

* "qat": fake quantization; PTF from the current tensor, log2 with the STE;
* "calibrate" (:func:`jaxq.nnx.calibrate`, any mode) / "ptq_calibrate" (in training
  mode, ``use_running_average=False``): float forward; the PTF observer ``jaxq_ptf`` (a
  :class:`~jaxq.flax.nnx_state.QuantStats`, :func:`jaxq.layer.fqvit.ptf_observer_update`)
  is updated with the LayerNorm's input;
* "ptq_sim" (also the served layer, :func:`jaxq.nnx.convert`): PTF from the observer
  (:func:`ptf_observer_qparams`; refused with a
  ValueError naming the layer when it was never updated, concrete counts), integer
  shifts (:func:`jaxq.layer.fqvit.ptf_serve`); log2 probabilities from their codes;
* any other mode: the float layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import attention as nnx_attention

from jaxq import numerics
from jaxq import quantizer
from jaxq.layer import fqvit
from jaxq.layer.observers import never_observed, unobserved_error
from jaxq.layer.views import patched
from jaxq.flax.nnx_classes import node_subclass, set_class
from jaxq.flax.nnx_state import QuantStats, mode_methods
from jaxq.spec import QuantSpec, Rule

__all__ = ["FqvitConfig", "fqvit_kind", "quantize_fqvit_layer", "ptf_observer_qparams",
           "PTF_STATS", "CALIBRATE_MODES", "SIM_MODES"]

PTF_STATS = fqvit.PTF_STATS
#: Modes in which the PTF observer is updated (in training mode) and the forward is float.
CALIBRATE_MODES = ("calibrate", "ptq_calibrate")
#: Modes that simulate serving: PTF from the observer, log2 from integer codes.
SIM_MODES = ("ptq_sim",)
CONFIG, MODE = "jaxq_config", "jaxq_mode"


@dataclasses.dataclass(frozen=True)
class FqvitConfig:
  """Static description of one FQ-ViT layer (a hashable attribute of the layer).

  Attributes:
    path: the layer's "/"-joined attribute path in the model it was quantized in.
    rule: the matching rule.
    kind: "ptf" (LayerNorm input) or "log2" (attention probabilities).
    act: the rule's activation spec.
  """

  path: str
  rule: Rule
  kind: str
  act: QuantSpec


def fqvit_kind(module, rule: Rule) -> str | None:
  """"ptf" / "log2" when ``rule`` asks FQ-ViT's scheme of ``module``'s type, else None."""
  scheme = None if rule.act is None else rule.act.scheme
  if scheme == "ptf" and isinstance(module, nnx.LayerNorm):
    return "ptf"
  if scheme == "log2" and isinstance(module, nnx.MultiHeadAttention):
    return "log2"
  return None


def ptf_observer_qparams(layer) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(scale, zero_point, factor_exp)`` of a PTF LayerNorm's observer
  (:func:`jaxq.layer.fqvit.ptf_observer_qparams`), for conversion to serving.

  Raises:
    ValueError: naming the layer, when the observer was never updated (concrete count;
      under a trace the scale is NaN instead).
  """
  cfg: FqvitConfig = getattr(layer, CONFIG)
  state = getattr(layer, PTF_STATS).get_value()
  unobserved = never_observed(state)
  if unobserved:
    raise unobserved_error(cfg.path, cfg.act)
  scale, zp, fexp = fqvit.ptf_observer_qparams(state, cfg.act)
  if unobserved is None:  # traced count (jaxq.layer.observers): NaN, not a made-up scale
    scale = jnp.where(state["n"] > 0, scale, jnp.nan)
  return scale, zp, fexp


def _ptf_input(layer, x):
  cfg: FqvitConfig = getattr(layer, CONFIG)
  mode = getattr(layer, MODE)
  if mode == "qat":  # range and factors of the current tensor (FQ-ViT's observer, one batch)
    return quantizer.fake_quantize(x, cfg.act)
  if mode in CALIBRATE_MODES:  # jaxq.nnx.calibrate runs the model as at inference
    if mode == "calibrate" or not layer.use_running_average:
      var = getattr(layer, PTF_STATS)
      var.set_value(fqvit.ptf_observer_update(var.get_value(), jax.lax.stop_gradient(x),
                                              cfg.act))
    return x
  if mode in SIM_MODES:
    return fqvit.ptf_serve(x, *ptf_observer_qparams(layer), cfg.act)
  return x


def _attention_fn(layer):
  """The layer's ``attention_fn`` for its mode (None: its own)."""
  cfg: FqvitConfig = getattr(layer, CONFIG)
  mode = getattr(layer, MODE)
  if mode != "qat" and mode not in SIM_MODES:
    return None
  bits, serving = cfg.act.bits, mode in SIM_MODES

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                   dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                   precision=None, module=None, promote_dtype=None, is_causal=False):
    extra = {} if promote_dtype is None else {"promote_dtype": promote_dtype}
    weights = nnx_attention.dot_product_attention_weights(
        query, key, bias, mask, broadcast_dropout, None, 0.0, True, dtype, precision,
        module, is_causal=is_causal, **extra)
    return fqvit.log2_attention(
        weights, value, bits, serving=serving, dropout_rng=dropout_rng,
        dropout_rate=dropout_rate, broadcast_dropout=broadcast_dropout,
        deterministic=deterministic,
        product=lambda w, v: jnp.einsum("...hqk,...khd->...qhd", w, v, precision=precision))

  return attention_fn


def _fqvit_class(base: type) -> type:
  """The FQ-ViT subclass of a LayerNorm / MultiHeadAttention class (one per class)."""

  def make_call(base_call):
    if issubclass(base, nnx.LayerNorm):
      def __call__(self, x, *args, **kwargs):  # pylint: disable=invalid-name
        return base_call(self, _ptf_input(self, x), *args, **kwargs)
    else:
      def __call__(self, *args, **kwargs):  # pylint: disable=invalid-name
        fn = _attention_fn(self)
        if fn is None:
          return base_call(self, *args, **kwargs)
        with patched(self, attention_fn=fn):
          return base_call(self, *args, **kwargs)
    return __call__

  return node_subclass(
      base, "Fqvit", make_call, module=__name__, extra=mode_methods(base),
      doc=(f"A ``{base.__module__}.{base.__qualname__}`` with FQ-ViT quantization, made "
           "by ``jaxq.nnx.quantize_model``."))


def quantize_fqvit_layer(layer, path: str, rule: Rule, kind: str) -> None:
  """Turns ``layer`` into its FQ-ViT subclass (``kind`` from :func:`fqvit_kind`)."""
  if CONFIG in vars(layer):
    raise ValueError(f"layer '{path}' is already quantized (or uses a reserved jaxq_* "
                     "attribute name)")
  if kind == "log2":
    if layer.attention_fn is not nnx.dot_product_attention:
      raise ValueError(f"attention '{path}': the log2 rule replaces the softmax of "
                       "nnx.dot_product_attention; this module has a custom attention_fn")
    numerics.check_bits(rule.act.bits)
  else:
    scale = getattr(layer, "scale", None)
    lead = () if scale is None else tuple(jnp.shape(scale.get_value())[:-1])
    observer = fqvit.ptf_observer_init(layer.num_features)
    setattr(layer, PTF_STATS, QuantStats(jax.tree_util.tree_map(
        lambda a: jnp.broadcast_to(a, lead + a.shape), observer)))
    if not hasattr(layer, "use_running_average"):
      layer.use_running_average = False
  setattr(layer, CONFIG, FqvitConfig(path, rule, kind, rule.act))
  setattr(layer, MODE, "qat")
  set_class(layer, _fqvit_class(type(layer)))
