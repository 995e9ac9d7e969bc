"""The NNX adapter of quantized ``nnx.Embed`` layers (:mod:`jaxq.layer.embed`).

:func:`jaxq.nnx.quantize_model` gives a matched ``nnx.Embed`` the class
:data:`QuantizedEmbed` (its attributes kept) with the state a quantized Linear keeps
(:mod:`jaxq.flax.nnx_state`): learned weight steps (``nnx.Param``, shared by lookup and
attend), the attend activation's learned step or observer (:class:`QuantStats`), its
``jaxq_config`` (a :class:`~jaxq.flax.nnx.LayerConfig` of kind "embed", weight spec in
the table's layout) and ``jaxq_mode``:

* ``attend``: the contraction ``query @ table.T`` handed to the mode's handler
  (:data:`jaxq.flax.nnx.MODES`: "qat", "calibrate", "sim"), or served ("serve");
* lookup: "qat" and "sim" look up the fake-quantized (or on-the-fly quantized) table,
  "serve" the QArray table (only the gathered rows dequantized), "calibrate" the float
  table.

:func:`convert_embeds` is :func:`jaxq.nnx.convert`'s step for Embeds (the table becomes
an ``nnx.Param`` holding a QArray; no float copy is kept); :func:`reset_observers` /
:func:`copy_observers` are :func:`jaxq.nnx.calibrate`'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxq import calibration
from jaxq.flax.nnx import CONFIG, MODE, MODES, RESERVED_NAMES, LayerConfig
from jaxq.flax.nnx_classes import node_subclass, set_class
from jaxq.flax.nnx_state import (ACT_INITIALIZED, ACT_UNOBSERVED, RNGS, QuantStats,
                                 mode_methods, next_key, note_mode, weight_kwargs)
from jaxq.layer import embed
from jaxq.layer.operands import (ACT_NAMES, ACT_SCALE, ACT_STATS, ACT_ZERO_POINT,
                                 WEIGHT_NAMES, act_stat_shape, act_view_spec, is_learned,
                                 state_names)
from jaxq.layer.serve import static_act
from jaxq.params import init_weight_state
from jaxq.qarray import QArray

__all__ = ["QuantizedEmbed", "quantize_embed", "quantized_embeds", "convert_embeds",
           "reset_observers", "copy_observers", "EMBED_KIND"]

EMBED_KIND = "embed"
_SERVE, _SIM = "serve", "sim"


def _get(layer, name: str):
  var = getattr(layer, name, None)
  return None if var is None else var.get_value()


def _learned(layer, spec) -> dict:
  return embed.learned_state(spec, {n: _get(layer, n) for n in WEIGHT_NAMES
                                    if _get(layer, n) is not None})


def _lookup(layer, inputs):
  cfg: LayerConfig = getattr(layer, CONFIG)
  mode, spec = getattr(layer, MODE), cfg.rule.weight
  embed.check_ids(inputs, cfg.path)
  value = layer.embedding.get_value()
  if isinstance(value, QArray):
    return embed.lookup(value, inputs, cfg.path).astype(layer.dtype)
  (table,) = layer.promote_dtype((value,), dtype=layer.dtype, inexact=False)
  if spec is None or mode not in ("qat", _SIM):
    return jnp.take(table, jnp.zeros_like(inputs) if table.shape[0] == 1 else inputs,
                    axis=0)
  if mode == _SIM:
    q = embed.quantize_table(jax.lax.stop_gradient(table), spec, cfg.path,
                             _learned(layer, spec))
    return embed.lookup(q, inputs, cfg.path).astype(table.dtype)
  return embed.qat_lookup(table, inputs, cfg.path, cfg.weight,
                          lambda s, w: weight_kwargs(layer, s, w), lambda: next_key(layer))


def _attend(layer, query):
  cfg: LayerConfig = getattr(layer, CONFIG)
  value = layer.embedding.get_value()
  if isinstance(value, QArray):
    act = None
    if static_act(cfg.rule.act):
      if _get(layer, ACT_SCALE) is None:
        raise ValueError(f"layer '{cfg.path}' (Embed): its attend activation spec has a "
                         "static range, which needs calibration: run jaxq.nnx.calibrate "
                         "on batches that call attend, then convert")
      act = {"scale": _get(layer, ACT_SCALE), "zero_point": _get(layer, ACT_ZERO_POINT)}
    (query,) = layer.promote_dtype((query,), dtype=layer.dtype)
    return embed.served_attend(query, value, cfg.path, cfg.rule.act, act)
  query, table = layer.promote_dtype((query, value), dtype=layer.dtype)
  return MODES[getattr(layer, MODE)](layer, embed.attend_contraction(query, table, cfg.path))


def _make_call(base_call):
  del base_call  # the lookup is jaxq.layer.embed's

  def __call__(self, inputs, out_sharding=None):  # pylint: disable=invalid-name
    if out_sharding is not None:
      raise ValueError(f"layer '{getattr(self, CONFIG).path}' (Embed): out_sharding is not "
                       "supported by a quantized Embed")
    return _lookup(self, inputs)
  return __call__


def _attend_method(self, query, out_sharding=None):
  if out_sharding is not None:
    raise ValueError(f"layer '{getattr(self, CONFIG).path}' (Embed): out_sharding is not "
                     "supported by a quantized Embed")
  return _attend(self, query)


QuantizedEmbed = node_subclass(
    nnx.Embed, "Quantized", _make_call, module=__name__,
    extra={**mode_methods(nnx.Embed), "attend": _attend_method},
    doc="A quantized ``flax.nnx.Embed`` made by ``jaxq.nnx.quantize_model``.")


def quantize_embed(layer: nnx.Embed, path: str, rule, rngs, int8: str) -> None:
  """Turns ``layer`` into a :data:`QuantizedEmbed` quantized by ``rule`` (in place)."""
  if any(name in vars(layer) for name in RESERVED_NAMES):
    raise ValueError(f"layer '{path}' is already quantized (or uses a reserved jaxq_* "
                     "attribute name)")
  table = layer.embedding.get_value()
  rule = embed.table_rule(rule, path, jnp.shape(table))
  d = table.shape[1]
  wspec = None if rule.weight is None else embed.view_spec(rule.weight, path, table.shape)
  aspec = None if rule.act is None else act_view_spec(rule.act, path, d)
  if is_learned(wspec, act=False):
    state = init_weight_state(table.T, wspec, 0)
    for key, name in state_names(wspec, WEIGHT_NAMES).items():
      setattr(layer, name, nnx.Param(state[key]))
  if is_learned(aspec, act=True):
    for key, name in state_names(aspec, ACT_NAMES).items():
      fill = 0.0 if key == "zero_point" else 1.0
      setattr(layer, name, nnx.Param(jnp.full(act_stat_shape(aspec, d), fill, jnp.float32)))
    setattr(layer, ACT_INITIALIZED, QuantStats(jnp.zeros((), jnp.bool_)))
  if static_act(aspec):  # filled by QAT ("ema", ...) or jaxq.nnx.calibrate
    setattr(layer, ACT_STATS, QuantStats(calibration.observer_init(
        aspec, act_stat_shape(aspec, d))))
    setattr(layer, ACT_UNOBSERVED, False)
  setattr(layer, CONFIG, LayerConfig(path, rule, EMBED_KIND, wspec, aspec, int8))
  setattr(layer, RNGS, rngs)
  setattr(layer, MODE, "qat")
  if not hasattr(layer, "use_running_average"):
    layer.use_running_average = False
  set_class(layer, QuantizedEmbed)
  note_mode(layer, layer.use_running_average)


def quantized_embeds(model: nnx.Module):
  """``(path, layer, config)`` of every quantized Embed of ``model``."""
  for path_t, module in nnx.iter_modules(model):
    cfg = getattr(module, CONFIG, None)
    if isinstance(module, nnx.Embed) and isinstance(cfg, LayerConfig):
      yield "/".join(str(p) for p in path_t), module, cfg


def reset_observers(model: nnx.Module) -> None:
  """Empties the attend observers of the quantized Embeds of ``model``."""
  for _, layer, cfg in quantized_embeds(model):
    if isinstance(getattr(layer, ACT_STATS, None), QuantStats):
      getattr(layer, ACT_STATS).set_value(calibration.observer_init(
          cfg.act, act_stat_shape(cfg.act, layer.embedding.get_value().shape[1])))


def copy_observers(source: nnx.Module, target: nnx.Module) -> None:
  """The attend observers of ``source``'s quantized Embeds copied into ``target``'s."""
  for (_, s, _), (_, t, _) in zip(quantized_embeds(source), quantized_embeds(target)):
    if isinstance(getattr(s, ACT_STATS, None), QuantStats):
      getattr(t, ACT_STATS).set_value(getattr(s, ACT_STATS).get_value())


def convert_embeds(serving: nnx.Module, act_qparams) -> None:
  """Serves the quantized Embeds of ``serving`` (in place): QArray tables, static
  attend activation scales where attend was calibrated, mode "serve".
  ``act_qparams(layer, path, spec, stack)``: :func:`jaxq.flax.nnx_serve.act_qparams`."""
  for _, layer, cfg in list(quantized_embeds(serving)):
    spec, table = cfg.rule.weight, layer.embedding.get_value()
    if isinstance(table, QArray):
      raise ValueError(f"layer '{cfg.path}' (Embed) holds a QArray table already: convert "
                       "the quantized model, not its serving model")
    if spec is not None:
      layer.embedding = nnx.Param(embed.quantize_table(table, spec, cfg.path,
                                                       _learned(layer, spec)))
    act = None
    st = _get(layer, ACT_STATS)
    if static_act(cfg.rule.act) and (is_learned(cfg.act, act=True)
                                     or (st is not None and bool(jnp.all(st["n"] > 0)))):
      act = act_qparams(layer, cfg.path, cfg.rule.act, 0)
    for n in WEIGHT_NAMES + ACT_NAMES + (ACT_STATS, ACT_INITIALIZED):
      if n in vars(layer):
        delattr(layer, n)
    if act is not None:
      setattr(layer, ACT_SCALE, nnx.Param(act["scale"]))
      setattr(layer, ACT_ZERO_POINT, nnx.Param(act["zero_point"]))
    setattr(layer, MODE, _SERVE)
