"""``Rule(act_compress=bits)`` for NNX models: the matched module's whole computation runs
under :func:`jaxq.act.nnx.compressed_call` (activation-compressed training, Contract 4).

:func:`jaxq.nnx.quantize_model` turns every module that a rule with ``act_compress``
matches (any module: a layer, a block, the model), outermost only (``act_compress``
rules of modules inside it are ignored, their weight / activation quantization applies),
into its compressed subclass (``Compressed<Class>``), whose ``__call__`` runs the
class's own ``__call__`` on the module's state split out functionally: weights and every
other variable are arguments (never compressed), the floating-point positional
arguments are the compressed activation inputs, and the state the call writes
(``nnx.BatchNorm`` statistics, jaxq observers, rng counters) is written back. Keys for
stochastic rounding of the residuals come from the ``"jaxq"`` stream of the model's
``nnx.Rngs`` (:func:`jaxq.flax.nnx_state.next_key`); without one they round to nearest.
Setting the attribute ``jaxq_act_compress`` to None turns compression off.
"""

from __future__ import annotations

from jaxq.act.nnx import compressed_call
from jaxq.flax.nnx_classes import node_subclass, set_class
from jaxq.flax.nnx_state import RNGS, next_key
from jaxq.spec import Rule

__all__ = ["ACT_COMPRESS", "compress_module"]

#: The ``Rule.act_compress`` of a compressed module (None: compression off).
ACT_COMPRESS = "jaxq_act_compress"


def _compressed_call(self, base_call, args, kwargs):
  bits = getattr(self, ACT_COMPRESS)
  if bits is None:
    return base_call(self, *args, **kwargs)
  return compressed_call(self, base_call, args, kwargs, bits=bits, key=next_key(self))


def _compressed_class(base: type) -> type:
  """The subclass of any module class whose ``__call__`` runs under
  :func:`jaxq.act.nnx.compressed_call` (one per class, so graphdefs are stable)."""

  def make_call(base_call):
    def __call__(self, *args, **kwargs):  # pylint: disable=invalid-name
      return _compressed_call(self, base_call, args, kwargs)
    return __call__

  return node_subclass(
      base, "Compressed", make_call, module=__name__,
      doc=(f"A ``{base.__module__}.{base.__qualname__}`` whose activations are "
           "compressed for the backward pass (``Rule(act_compress=...)``)."))


def compress_module(module, path: str, rule: Rule, rngs) -> None:
  """Turns ``module`` into its compressed subclass with ``rule.act_compress``; ``rngs``:
  the ``nnx.Rngs`` with a "jaxq" stream (or None) if the module holds none itself."""
  if ACT_COMPRESS in vars(module):
    raise ValueError(f"module '{path}' is already compressed (or uses the reserved "
                     f"attribute name {ACT_COMPRESS!r})")
  if not any("__call__" in vars(c) for c in type(module).__mro__[:-1]):
    raise ValueError(f"rule {rule.path!r} asks act_compress of module '{path}' "
                     f"({type(module).__name__}), which has no __call__ to compress")
  setattr(module, ACT_COMPRESS, rule.act_compress)
  if RNGS not in vars(module):
    setattr(module, RNGS, rngs)
  set_class(module, _compressed_class(type(module)))
