"""QArray parameters served to a Linen layer's own code.

Once a kernel is stored as a :class:`~jaxq.qarray.QArray` (a converted serving model, or
a LoRA layer's base frozen by :func:`jaxq.lora.freeze`), the layer's ``__call__`` must
still receive an array from ``self.param("kernel", ...)``. The interceptor below
overrides the module's ``param`` for the duration of one method call. It is installed by
every :class:`jaxq.flax.linen.QuantizedModel`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxq.flax.paths import module_path
from jaxq.qarray import QArray, dequantize
from jaxq.spec import changes_contraction, match_rule

__all__ = ["qarray_param_interceptor"]


_QUANTIZED_PARAMS = ("kernel", "embedding")
#: The methods in which a handled layer reads its QArray parameter (nn.Embed reads its
#: table in setup, and uses it in __call__ and attend).
_HANDLED_METHODS = ("__call__", "setup", "attend")


def qarray_param_interceptor(root: tuple[str, ...], rules, layer_types: tuple[type, ...],
                             wrapper: type):
  """Serves QArray parameters to the layers' own code.

  A matched Dense/DenseGeneral/Conv/Einsum (or Embed, whose table it reads in setup),
  whose contraction its handler computes from the QArray (serving:
  :mod:`jaxq.layer.serve`; a LoRA layer's frozen base: :mod:`jaxq.layer.lora`), receives
  a zero placeholder of the kernel's shape (dead code under jit); any other module owning a QArray parameter receives its dequantized
  value. ``root``: the wrapper's module path; ``rules`` are matched below it;
  ``layer_types``: the layers whose contraction a handler computes; modules of type
  ``wrapper`` (the quantized model itself) are passed through.
  """

  def icpt(next_fun, args, kwargs, context):
    m = context.module
    if m.scope is None or isinstance(m, wrapper) or "param" in vars(m):
      return next_fun(*args, **kwargs)
    names = [n for n in _QUANTIZED_PARAMS if m.has_variable("params", n)
             and isinstance(m.get_variable("params", n), QArray)]
    if not names:
      return next_fun(*args, **kwargs)
    path_t = module_path(m)
    rule = (match_rule(rules, "/".join(path_t[len(root):]))
            if path_t[:len(root)] == root else None)
    handled = (context.method_name in _HANDLED_METHODS and isinstance(m, layer_types)
               and rule is not None and changes_contraction(rule))
    orig = m.param

    def param(name, init_fn, *a, **kw):
      if name in names:
        q = m.get_variable("params", name)
        if handled:
          return jnp.broadcast_to(jnp.zeros((), q.dtype), q.shape)
        return dequantize(q)
      return orig(name, init_fn, *a, **kw)

    # Linen modules are frozen dataclasses and offer no public hook for `param`.
    object.__setattr__(m, "param", param)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__delattr__(m, "param")

  return icpt


