"""What a rule set quantized: one row per matched layer, with its bits and kernel bytes.

:func:`report` (Linen: ``jaxq.report(qmodel, variables, *args, **kwargs)``) and
:func:`nnx_report` (NNX: ``jaxq.nnx.report(qmodel)``) return a :class:`QuantReport`:

* ``rows``: one dict per Dense/DenseGeneral/Conv/Einsum/Embed (NNX: Linear/LinearGeneral/
  Conv/Einsum/Embed) layer that a rule matches (first match wins), in call order (Linen)
  or graph order (NNX), with keys ``path`` (what the rules match), ``kind`` (the layer's
  class name), ``rule`` (the index of the matching rule), that rule's ``weight``, ``act``,
  ``act_compress``, ``smooth`` and ``lora``, ``float_bytes`` (the stored kernel, all
  layers of a stack) and ``quant_bytes`` (the kernel as :func:`jaxq.convert` stores it
  with the default float32 scales: integer values, bit-packed for 1/2/4 bits, plus scales
  and zero points; the float bytes for a rule without a weight spec);
* ``unused``: the indices of the rules that are the first match of no module (a typo in
  a regex, or a rule shadowed by an earlier one); ``quantize_model`` warns about them
  (:func:`jaxq.spec.warn_unused_rules`);
* ``str(report)``: a table, one line per row and a total.

The Linen report runs the model abstractly (:func:`jax.eval_shape`, nothing is computed)
in the mode :data:`REPORT_MODE`, whose handler records each matched layer's contraction
axes as its call sees them (stacked layers of ``nn.scan`` / ``nn.vmap`` included), under a
method interceptor that records every module call a rule matches. The NNX report reads the
rules that ``jaxq.nnx.quantize_model`` stored on the model and each layer's kernel layout.
Both build their rows with :func:`layer_row`.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import flax.linen as nn
import jax
from flax import nnx
from flax.core import meta

from jaxq.flax import linen as qlinen
from jaxq.flax import nnx as qnnx
from jaxq.layer import embed
from jaxq.layer.lora import LORA_A
from jaxq.lora import freeze_kernel
from jaxq.qarray import QArray
from jaxq.layer.operands import WEIGHT_NAMES
from jaxq.layer.views import Contraction
from jaxq.spec import Rule, rule_index

__all__ = ["QuantReport", "report", "nnx_report", "layer_row", "table_row", "REPORT_MODE"]

REPORT_MODE = "report"


@dataclasses.dataclass(frozen=True)
class QuantReport:
  """Per-layer quantization report; see the module docstring.

  Attributes:
    rows: one dict per matched layer.
    unused: indices of the rules that matched no module.
    rules: the rules.
  """

  rows: list[dict[str, Any]]
  unused: tuple[int, ...]
  rules: tuple[Rule, ...]

  @property
  def float_bytes(self) -> int:
    return sum(r["float_bytes"] for r in self.rows)

  @property
  def quant_bytes(self) -> int:
    return sum(r["quant_bytes"] for r in self.rows)

  def __str__(self) -> str:
    head = ("path", "kind", "rule", "bits w/a", "float bytes", "quant bytes")
    lines = [(r["path"] or "(root)", r["kind"], str(r["rule"]),
              f"{_bits(r['weight'])}/{_bits(r['act'])}", f"{r['float_bytes']:,}",
              f"{r['quant_bytes']:,}") for r in self.rows]
    ratio = self.quant_bytes / self.float_bytes if self.float_bytes else 1.0
    total = (f"total ({len(self.rows)} layer{'s' * (len(self.rows) != 1)})", "", "", "", f"{self.float_bytes:,}",
             f"{self.quant_bytes:,} ({ratio:.3f}x)")
    widths = [max(len(row[c]) for row in [head, *lines, total]) for c in range(len(head))]

    def fmt(row):
      cells = [v.ljust(w) if c < 4 else v.rjust(w)
               for c, (v, w) in enumerate(zip(row, widths))]
      return "  ".join(cells).rstrip()

    out = [fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, lines), fmt(total)]
    unused = ", ".join(f"{i} ({self.rules[i].path!r})" for i in self.unused)
    out.append(f"unused rules: {unused or 'none'}")
    return "\n".join(out)


def _bits(spec) -> str:
  return "-" if spec is None else str(spec.bits)


def _nbytes(tree) -> int:
  return sum(math.prod(leaf.shape) * leaf.dtype.itemsize
             for leaf in jax.tree_util.tree_leaves(tree))


def layer_row(path: str, kind: str, index: int, rule: Rule, kernel, layout, learned
              ) -> dict[str, Any]:
  """The report row of one layer.

  Args:
    path: the layer's path (what the rules match).
    kind: the layer's class name.
    index, rule: the matching rule and its index.
    kernel: the stored kernel (an array or ``jax.ShapeDtypeStruct``; stacked layers: all
      of them).
    layout: ``(stack, rhs_contract)``: leading stacking axes and the axes one layer's
      kernel contracts; only read with a weight spec.
    learned: the layer's learned weight steps (LSQ / PACT) by reserved name, or {}.
  """
  if isinstance(kernel, QArray):  # a LoRA base frozen by jaxq.lora.freeze / lora_freeze
    lead = jax.tree_util.tree_leaves(kernel)[0].shape[:layout[0]]
    return _row(path, kind, index, rule, math.prod(lead + kernel.shape)
                * jax.numpy.dtype(kernel.dtype).itemsize, _nbytes(kernel))
  kernel = jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)
  float_bytes = _nbytes(kernel)
  quant_bytes = float_bytes
  if rule.weight is not None:
    if layout is None:
      raise ValueError(f"jaxq report: the contraction of layer '{path}' was not seen")
    stack, contract = layout
    qarray = jax.eval_shape(  # NF4 as jaxq.lora.freeze stores it, uniform as convert
        lambda k, l: freeze_kernel(path, rule, k, None, contract, stack, l), kernel, learned)
    quant_bytes = _nbytes(qarray)
  return _row(path, kind, index, rule, float_bytes, quant_bytes)


def _row(path, kind, index, rule, float_bytes, quant_bytes) -> dict[str, Any]:
  return {"path": path, "kind": kind, "rule": index, "weight": rule.weight,
          "act": rule.act, "act_compress": rule.act_compress,
          "smooth": getattr(rule, "smooth", None), "lora": getattr(rule, "lora", None),
          "float_bytes": float_bytes, "quant_bytes": quant_bytes}


def table_row(path: str, kind: str, index: int, rule: Rule, variables) -> dict[str, Any]:
  """The row of an Embed layer (``variables``: its own): its table as
  :mod:`jaxq.layer.embed` serves it."""
  table = variables.get(embed.TABLE)
  if table is None:
    raise ValueError(f"jaxq report: Embed layer '{path}' has no '{embed.TABLE}'")
  spec = embed.table_rule(rule, path, table.shape).weight
  table = jax.ShapeDtypeStruct(table.shape, table.dtype)
  float_bytes = quant_bytes = _nbytes(table)
  if spec is not None:
    learned = embed.learned_state(spec, variables)
    quant_bytes = _nbytes(jax.eval_shape(
        lambda t, l: embed.quantize_table(t, spec, path, l), table, learned))
  return _row(path, kind, index, rule, float_bytes, quant_bytes)


def _unused(rules, used) -> tuple[int, ...]:
  return tuple(i for i in range(len(rules)) if i not in used)


# --------------------------------------------------------------------------------------
# Linen
# --------------------------------------------------------------------------------------

# Contraction layouts recorded by the report mode: {path: (rhs_contract, rank)}.
_LAYOUTS = threading.local()


def _record_handler(call: qlinen.LayerCall, op: Contraction) -> jax.Array:
  """Mode "report": records the kernel's contraction axes and rank; float forward."""
  rank = op.rhs.ndim
  _LAYOUTS.value[call.path] = (tuple(int(a) % rank for a in op.rhs_contract), rank)
  return op.compute(op.lhs, op.rhs)


qlinen.register_mode(REPORT_MODE, _record_handler)


def _match_recorder(rules, found: dict):
  """A method interceptor recording ``{path: (module class, rule index)}`` of the module
  calls that a rule matches."""

  def icpt(next_fun, args, kwargs, context):
    path = qlinen.call_path((), context)
    index = None if path is None else rule_index(rules, path)
    if index is not None and path not in found:
      found[path] = (type(context.module), index)
    return next_fun(*args, **kwargs)

  return icpt


def _node(tree, path: str):
  for key in (path.split("/") if path else ()):
    tree = (tree or {}).get(key)
  return tree or {}


def report(qmodel: qlinen.QuantizedModel, variables, *args, **kwargs) -> QuantReport:
  """The :class:`QuantReport` of a Linen ``qmodel`` (from :func:`jaxq.quantize_model`).

  Runs ``qmodel.apply(variables, *args, **kwargs)`` abstractly: positional ``args`` are
  the model's array inputs (example shapes suffice), keyword arguments are passed as they
  are (``rngs=`` to ``apply``).
  """
  if not isinstance(qmodel, qlinen.QuantizedModel):
    raise TypeError("jaxq.report needs the QuantizedModel of jaxq.quantize_model; got "
                    f"{type(qmodel).__name__} (NNX models: jaxq.nnx.report)")
  rngs = kwargs.pop("rngs", None)
  rmodel = qmodel.clone(mode=REPORT_MODE)
  found: dict[str, tuple[type, int]] = {}
  _LAYOUTS.value = layouts = {}

  def run(v, a):
    with nn.intercept_methods(_match_recorder(qmodel.rules, found)):
      return rmodel.apply(v, *a, rngs=rngs, mutable=True, **kwargs)[1]

  try:
    params = meta.unbox(jax.eval_shape(run, dict(variables), args).get("params", {}))
  finally:
    _LAYOUTS.value = None
  rows = []
  for path, (cls, index) in found.items():
    if issubclass(cls, nn.Embed):
      rows.append(table_row(path, cls.__name__, index, qmodel.rules[index],
                            _node(params, path)))
      continue
    if not issubclass(cls, qlinen.LAYER_TYPES):
      continue
    node = _node(params, path)
    kernel = node.get("kernel")
    if kernel is None:
      raise ValueError(f"jaxq.report: layer '{path}' has no 'kernel' in the variables")
    layout = layouts.get(path)
    if layout is not None:
      contract, rank = layout
      layout = (kernel.ndim - rank, contract)
    learned = {n: node[n] for n in WEIGHT_NAMES if n in node}
    rows.append(layer_row(path, cls.__name__, index, qmodel.rules[index], kernel,
                          layout, learned))
  return QuantReport(rows, _unused(qmodel.rules, {i for _, i in found.values()}),
                     tuple(qmodel.rules))


# --------------------------------------------------------------------------------------
# NNX
# --------------------------------------------------------------------------------------


def _nnx_kind(layer) -> str:
  """The class name of an NNX layer before ``quantize_model`` gave it its quantized class."""
  cls = type(layer)
  if isinstance(getattr(layer, qnnx.CONFIG, None), qnnx.LayerConfig):
    cls = cls.__bases__[0]
  return cls.__name__


def nnx_report(qmodel: nnx.Module) -> QuantReport:
  """The :class:`QuantReport` of an NNX model returned by ``jaxq.nnx.quantize_model``."""
  rules = getattr(qmodel, qnnx.RULES, None)
  if not isinstance(qmodel, nnx.Module) or rules is None:
    raise ValueError("jaxq.nnx.report needs a model returned by jaxq.nnx.quantize_model "
                     f"(it keeps its rules in '{qnnx.RULES}'); got {type(qmodel).__name__}")
  rows, used = [], set()
  for path_t, module in nnx.iter_modules(qmodel):
    path = "/".join(str(p) for p in path_t)
    index = rule_index(rules, path)
    if index is None:
      continue
    used.add(index)
    if isinstance(module, nnx.Embed):
      rows.append(table_row(path, "Embed", index, rules[index],
                            {k: v.get_value() for k, v in vars(module).items()
                             if isinstance(v, nnx.Variable)}))
      continue
    if not isinstance(module, qnnx.LAYER_TYPES):
      continue
    rule = rules[index]
    layout = None
    if rule.weight is not None:
      stack, contract, _ = qnnx.kernel_layout(module, path)
      if isinstance(module.kernel.get_value(), QArray):  # per-layer shape; adapters stacked
        stack = getattr(module, LORA_A).get_value().ndim - 2
      layout = (stack, contract)
    learned = {n: getattr(module, n).get_value() for n in WEIGHT_NAMES
               if hasattr(module, n)}
    rows.append(layer_row(path, _nnx_kind(module), index, rule,
                          module.kernel.get_value(), layout, learned))
  return QuantReport(rows, _unused(rules, used), tuple(rules))
