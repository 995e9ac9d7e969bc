"""Quantized embedding tables (``nn.Embed`` / ``nnx.Embed``): the Flax-free logic.

An embedding table ``E: (V, D)`` (V rows, D features) is used two ways: the lookup
``E[ids]`` and the tied output projection ``attend(q) = q @ E.T``. jaxq quantizes ``E``
as the kernel of ``attend``, the one contraction it takes part in: its ``(K, N)`` view
(:mod:`jaxq.layer.views`) is ``E.T`` (K = D features contracted, N = V rows), so the
weight spec means what it means for a Dense kernel of that projection:

* ``granularity="channel"``: one scale per row (per embedding vector);
* ``"group"``: one scale per row and per ``group_size`` consecutive features (which
  ``group_size`` must divide);
* ``"tensor"``: one scale;
* ``QuantSpec.axis`` names an axis of that kernel ``(D, V)``: -1 (the default) or 1,
  the rows; 0 (the contracted features) is refused;
* estimators "ste", "lsq" (LSQ+ when asymmetric) and "pact" and calibrations "minmax",
  "percentile", "mse" (one-shot range of the table) as for kernels; scheme "uniform".

(:func:`jaxq.quantize_params`, which sees a bare ``embedding`` leaf and no layer, keeps
``spec.axis`` of the stored ``(V, D)`` leaf instead: its default is one scale per
feature column.) ``Rule.lora``, ``Rule.smooth`` and ``rounding="gptq"`` (no input
Hessian) do not apply to a lookup: :func:`table_rule` refuses them by name.

QAT (:func:`qat_lookup`, :func:`attend_contraction` + :func:`jaxq.layer.qat.
qat_contraction`): both uses read the same fake-quantized table (straight-through
gradient to it; LSQ / PACT steps shared). A lookup whose scales come from the rows
themselves (min-max per row or group) fake-quantizes only the gathered rows, which is
the same as quantizing the whole table and gathering.

Serving (:func:`quantize_table`, :func:`lookup`, :func:`served_attend`): the table is a
:class:`~jaxq.qarray.QArray` of shape ``(V, D)`` (int8, or bit-packed int4 / int2 along
D; scales ``(V, 1)`` per row, ``(V, D / group_size, 1)`` per group), with the codes the
QAT table rounds to. A lookup gathers the rows' codes and scales and dequantizes only
those rows; ``attend`` is the quantized contraction of :func:`jaxq.layer.serve.
quantized_contraction` (``jaxq.kernels.int8_matmul`` for 8-bit per-row tables with an
8-bit per-tensor activation spec, ``int4_matmul`` / ``int4_matmul_grouped`` for <= 4
bits, dequantize-then-matmul otherwise).

Activation spec: the lookup's input is integer ids, so a rule's ``act`` spec applies to
the query of ``attend`` only (calibrated when ``attend`` runs in calibration).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxq import quantizer
from jaxq.layer.operands import (WEIGHT_NAMES, is_learned, state_names,
                                 weight_observer_qparams, weight_view_spec)
from jaxq.layer.serve import quantized_contraction
from jaxq.layer.views import Contraction, dot_general_contraction
from jaxq.qarray import QArray, dequantize, quantize_with
from jaxq.spec import QuantSpec, Rule

__all__ = ["TABLE", "table_rule", "view_spec", "check_ids", "qat_lookup",
           "fake_quant_table", "attend_contraction", "quantize_table", "lookup",
           "served_attend", "table_qparams", "learned_state"]

#: The parameter name of a Flax Embed table.
TABLE = "embedding"
_ONE_SHOT = ("percentile", "mse")


def _kind(path: str) -> str:
  return f"layer '{path}' (Embed)"


def _check_table_spec(spec: QuantSpec, path: str, table_shape) -> None:
  """The rule's weight spec must fit the table as the kernel ``(D, V)`` of attend."""
  if len(table_shape) != 2:
    raise ValueError(f"{_kind(path)}: an embedding table is (num_embeddings, features); "
                     f"got shape {table_shape} (stacked Embeds are not supported)")
  if spec.scheme != "uniform":
    raise ValueError(f"{_kind(path)}: Rule.weight QuantSpec.scheme must be 'uniform' for "
                     f"an embedding table; got {spec.scheme!r}")
  v, d = table_shape
  try:
    weight_view_spec(spec, path, (d, v), (0,))
  except ValueError as e:
    raise ValueError(f"{e} (an Embed table (V, D) = {table_shape} is quantized as the "
                     "kernel (D, V) of its attend: QuantSpec.axis -1 keeps one scale per "
                     "row, groups run along the features)") from None


def table_rule(rule: Rule, path: str, table_shape) -> Rule:
  """``rule`` for the Embed at ``path``, its weight spec checked (module docstring) and
  put in the table's own layout ``(V, D)`` (``axis=0``: the rows), as the layer's
  contraction ``query @ table.T`` and :func:`view_spec` take it.

  Raises:
    ValueError: a field an embedding cannot carry out (``lora``, ``smooth``, GPTQ
      rounding) or a weight spec that does not fit the table, naming field and path.
  """
  if rule.lora is not None:
    raise ValueError(f"rule {rule.path!r} gives {_kind(path)} a LoRA adapter (Rule.lora); "
                     "jaxq adapts Dense / Linear, DenseGeneral, Conv and Einsum layers "
                     "only: use Rule(path, lora=None) for the embedding")
  if rule.smooth is not None:
    raise ValueError(f"rule {rule.path!r}: Rule.smooth={rule.smooth!r} does not apply to "
                     f"{_kind(path)} (its lookup input is integer ids); use smooth=None")
  spec = rule.weight
  if spec is None:
    return rule
  if spec.rounding == "gptq":
    raise ValueError(f"rule {rule.path!r}: Rule.weight rounding='gptq' does not apply to "
                     f"{_kind(path)} (GPTQ needs the layer's input Hessian; a lookup has "
                     "none); use rounding='nearest' for the embedding")
  _check_table_spec(spec, path, tuple(table_shape))
  if spec.granularity != "tensor":
    spec = spec.replace(axis=0)
  return dataclasses.replace(rule, weight=spec)


def view_spec(spec: QuantSpec, path: str, table_shape) -> QuantSpec:
  """A table-layout weight spec (:func:`table_rule`) on the table's ``(D, V)`` view."""
  return weight_view_spec(spec, path, tuple(table_shape), (1,))


def check_ids(ids: jax.Array, path: str) -> None:
  if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
    raise ValueError(f"{_kind(path)}: the lookup input must be integer ids; got dtype "
                     f"{jnp.result_type(ids)}")


def _row_ids(ids: jax.Array, num_rows: int) -> jax.Array:
  """Flax's convention: a one-row table broadcasts to every id."""
  return jnp.zeros_like(ids) if num_rows == 1 else ids


# --------------------------------------------------------------------------------------
# QAT
# --------------------------------------------------------------------------------------


def fake_quant_table(table: jax.Array, vspec: QuantSpec, qparams: dict,
                     key: jax.Array | None = None) -> jax.Array:
  """The table quantize-dequantized on its ``(D, V)`` view with ``qparams``
  (:func:`jaxq.quantizer.fake_quantize` kwargs; ``{}``: min-max of the view)."""
  return quantizer.fake_quantize(table.T, vspec, group_axis=0, key=key, require_key=False,
                                 **qparams).T


def qat_lookup(table: jax.Array, ids: jax.Array, path: str, vspec: QuantSpec,
               weight_kwargs: Callable[[QuantSpec, jax.Array], dict],
               key: Callable[[], jax.Array | None]) -> jax.Array:
  """``fake_quant(table)[ids]``: the QAT lookup (straight-through gradient to the table).

  ``weight_kwargs(vspec, view)`` gives the fake-quant kwargs of the ``(D, V)`` view
  (learned step, one-shot range, or ``{}``); ``key()`` a stochastic-rounding key.
  """
  check_ids(ids, path)
  ids = _row_ids(ids, table.shape[0])
  qparams = weight_kwargs(vspec, table.T)
  k = key() if vspec.rounding == "stochastic" else None
  if not qparams and vspec.granularity != "tensor" and k is None:
    rows = jnp.take(table, ids.reshape(-1), axis=0)  # per-row ranges: only these rows
    return fake_quant_table(rows, vspec, {}).reshape(ids.shape + table.shape[1:])
  return jnp.take(fake_quant_table(table, vspec, qparams, k), ids, axis=0)


def attend_contraction(query: jax.Array, table: jax.Array, path: str) -> Contraction:
  """The contraction ``query @ table.T`` of ``Embed.attend`` (``jnp.dot``'s numerics)."""
  dims = (((query.ndim - 1,), (1,)), ((), ()))
  return dot_general_contraction(query, table, dims,
                                 lambda l, r: lax.dot_general(l, r, dims), path)


# --------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------


def table_qparams(table: jax.Array, vspec: QuantSpec, learned: dict) -> tuple:
  """``(scale, zero_point)`` of the table's ``(D, V)`` view: the learned step (LSQ
  ``{"scale"[, "zero_point"]}``, PACT ``{"alpha"}``), a one-shot range ("percentile",
  "mse"), or the view's min-max; rows holding a NaN get a NaN scale."""
  view = table.T.astype(jnp.float32)
  if is_learned(vspec, act=False):
    if "alpha" in learned:
      scale = learned["alpha"] / vspec.qmax
      zp = jnp.zeros_like(scale)
    else:
      scale = learned["scale"]
      zp = learned.get("zero_point", jnp.zeros_like(scale))
  elif vspec.calibration in _ONE_SHOT:
    qp = weight_observer_qparams(vspec, view)
    scale, zp = qp["scale"], qp["zero_point"]
  else:
    scale, zp = quantizer.compute_qparams(view, vspec, group_axis=0)
  if vspec.granularity != "tensor":
    qv = quantizer.quant_view(view, vspec, 0)
    nan = jnp.any(jnp.isnan(qv), axis=quantizer.quant_axes(2, vspec, 0), keepdims=True)
    scale = jnp.where(nan, jnp.nan, scale)
  return scale, zp


def learned_state(spec: QuantSpec | None, variables) -> dict:
  """A table's learned weight step by state key (``{"scale"[, "zero_point"]}`` /
  ``{"alpha"}``) from its layer's ``variables`` by reserved name ({} when none)."""
  if spec is None or not is_learned(spec, act=False):
    return {}
  return {k: variables[n] for k, n in state_names(spec, WEIGHT_NAMES).items()
          if n in variables}


def _table_layout(a: jax.Array, vspec: QuantSpec) -> jax.Array:
  """A scale / zero point of the ``(D, V)`` view in the table's ``(V, D)`` layout."""
  a = jnp.asarray(a)
  if vspec.granularity == "group":  # (D/g, 1, V) -> (V, D/g, 1)
    return jnp.transpose(jnp.broadcast_to(a, a.shape[:2] + (a.shape[-1],)), (2, 0, 1))
  return a.reshape(a.shape[::-1]) if a.ndim == 2 else a


def quantize_table(table: jax.Array, spec: QuantSpec, path: str,
                   learned: dict | None = None) -> QArray:
  """The table as the :class:`QArray` serving stores: shape ``(V, D)``, codes equal to
  those the QAT table rounds to (module docstring); ``spec`` in the table's layout
  (:func:`table_rule`). ``learned``: the layer's learned
  weight step by state key ({"scale", "zero_point"} / {"alpha"}), or None."""
  vspec = view_spec(spec, path, jnp.shape(table))
  if is_learned(vspec, act=False) and not learned:
    raise ValueError(f"{_kind(path)}: its weight spec learns its step "
                     f"(estimator={spec.estimator!r}) but the step is missing")
  scale, zp = table_qparams(table, vspec, learned or {})
  scale = _table_layout(scale, vspec)
  zp = None if vspec.symmetric else _table_layout(zp, vspec)
  q = quantize_with(table, vspec.replace(axis=0, rounding="nearest"), scale, zp,
                    group_axis=1)
  if vspec.symmetric:
    q = QArray(q.values, q.scale, jnp.zeros((), q.zero_point.dtype), spec=q.spec,
               shape=q.shape, dtype=q.dtype, group_axis=q.group_axis)
  return q


def _gather_rows(a: jax.Array, rows: jax.Array, num_rows: int) -> jax.Array:
  """Per-row leaves gathered at ``rows`` (a per-tensor leaf broadcast to rows first, so
  that an out-of-range id reads a NaN scale, as the float lookup reads NaN)."""
  a = jnp.asarray(a)
  if a.ndim == 0:
    return a
  a = jnp.broadcast_to(a, (num_rows,) + a.shape[1:])
  return jnp.take(a, rows, axis=0)


def lookup(q: QArray, ids: jax.Array, path: str) -> jax.Array:
  """``dequantize(q)[ids]``, dequantizing only the gathered rows (their codes and
  scales), in ``q``'s float dtype."""
  check_ids(ids, path)
  v, d = q.shape
  rows = _row_ids(ids, v).reshape(-1)
  values = jnp.take(q.values, rows, axis=0)
  scale = _gather_rows(q.scale, rows, v)
  zp = q.zero_point if jnp.ndim(q.zero_point) == 0 else _gather_rows(q.zero_point, rows, v)
  part = QArray(values, scale, zp, spec=q.spec, shape=(rows.shape[0], d), dtype=q.dtype,
                group_axis=q.group_axis)
  return dequantize(part).reshape(ids.shape + (d,))


def served_attend(query: jax.Array, q: QArray, path: str, aspec: QuantSpec | None,
                  act_qparams: dict | None) -> jax.Array:
  """``query @ dequantize(q).T`` computed by :func:`jaxq.layer.serve.
  quantized_contraction` (integer kernels where they apply) with the rule's activation
  spec ``aspec`` on the query and its static ``act_qparams`` (None when dynamic/absent)."""
  placeholder = jnp.broadcast_to(jnp.zeros((), q.dtype), q.shape)  # dead code under jit
  query = query.astype(jnp.result_type(query.dtype, q.dtype))
  return quantized_contraction(attend_contraction(query, placeholder, path), path, aspec,
                               q, act_qparams)
