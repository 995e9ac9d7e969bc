"""The Linen adapter of quantized ``nn.Embed`` layers (:mod:`jaxq.layer.embed`).

:class:`jaxq.flax.linen.QuantizedModel`'s interceptor hands a matched ``nn.Embed``'s
``__call__`` (the lookup) and ``attend`` to :func:`run_embed`. Its state lives where a
Dense layer's does: learned weight steps (shared by lookup and attend) in the layer's
"params" under the reserved ``jaxq_weight_*`` names, the attend activation observer in
"quant_stats"; in a serving model the table ``embedding`` is a QArray.

* ``attend``: the contraction ``query @ table.T`` handed to the mode's handler, like a
  Dense layer's (QAT, calibration, simulation, report, serving);
* lookup: "qat" looks up the fake-quantized table, "ptq_serve" the QArray (only the
  gathered rows dequantized), "ptq_sim" the table quantized on the fly; the
  calibration and report modes look up the float table.

In "ptq_sim" an Embed is simulated only where its ``jaxq_select`` flag is > 0, and is
float without one: :mod:`jaxq.analysis` does not analyse Embeds (yet), so they stay in
float while it measures the other layers one at a time.

:func:`convert_tables` is :func:`jaxq.flax.ptq.convert`'s step for tables.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxq.flax.linen_layer import QUANT_STATS, LayerCall, weight_kwargs
from jaxq.flax.ptq_modes import SELECT, SERVE_MODE, SIM_MODE
from jaxq.layer import embed
from jaxq.layer.operands import WEIGHT_NAMES
from jaxq.qarray import QArray
from jaxq.params import tree_get
from jaxq.spec import match_rule

__all__ = ["run_embed", "convert_tables", "EMBED_METHODS"]

#: The Embed methods a rule quantizes.
EMBED_METHODS = ("__call__", "attend")


def _lookup(call: LayerCall, next_fun, inputs):
  m, spec = call.module, call.rule.weight
  embed.check_ids(inputs, call.path)
  if call.mode == SERVE_MODE:
    q = m.get_variable("params", embed.TABLE)
    if isinstance(q, QArray):
      return embed.lookup(q, inputs, call.path).astype(m.dtype or q.dtype)
  if spec is None or call.mode not in ("qat", SIM_MODE):
    return next_fun(inputs)
  (table,) = m.promote_dtype(m.embedding, dtype=m.dtype, inexact=False)
  if call.mode == SIM_MODE:
    if not m.has_variable(QUANT_STATS, SELECT):
      return next_fun(inputs)
    node = m.variables.get("params", {})
    q = embed.quantize_table(jax.lax.stop_gradient(table), spec, call.path,
                             embed.learned_state(spec, node))
    y = embed.lookup(q, inputs, call.path).astype(table.dtype)
    return jnp.where(m.get_variable(QUANT_STATS, SELECT) > 0, y, next_fun(inputs))
  vspec = embed.view_spec(spec, call.path, table.shape)
  return embed.qat_lookup(table, inputs, call.path, vspec,
                          functools.partial(weight_kwargs, call), call.rng)


def _attend(call: LayerCall, handler, query):
  m = call.module
  query, table = m.promote_dtype(query, m.embedding, dtype=m.dtype)
  op = embed.attend_contraction(query, table, call.path)
  if call.mode == SIM_MODE and not m.has_variable(QUANT_STATS, SELECT):
    return op.compute(op.lhs, op.rhs)
  return handler(call, op)


def run_embed(call: LayerCall, method: str, handler, next_fun, args, kwargs):
  """A matched ``nn.Embed`` call: ``method`` ("__call__" or "attend") with the table
  (and, for attend, the query) quantized as ``call.mode`` says; ``handler`` is the
  mode's contraction handler."""
  m = call.module
  rule = embed.table_rule(call.rule, call.path, (m.num_embeddings, m.features))
  call = dataclasses.replace(call, rule=rule)
  if method == "attend":
    return _attend(call, handler, *args, **kwargs)
  return _lookup(call, next_fun, *args, **kwargs)


def convert_tables(rules, params, flat: dict) -> None:
  """Replaces in ``flat`` (flattened serving params) every ``embedding`` table whose
  layer a rule with a weight spec matches by its QArray, dropping its learned steps."""
  for keys, table in traverse_util.flatten_dict(params).items():
    if keys[-1] != embed.TABLE or isinstance(table, QArray):
      continue
    path = "/".join(keys[:-1])
    rule = match_rule(rules, path)
    if rule is None or rule.weight is None:
      continue
    table = jnp.asarray(table)
    spec = embed.table_rule(rule, path, table.shape).weight
    flat[keys] = embed.quantize_table(table, spec, path,
                                      embed.learned_state(spec, tree_get(params, keys[:-1])))
    for n in WEIGHT_NAMES:
      flat.pop(keys[:-1] + (n,), None)
