"""The subclasses jaxq gives NNX modules it changes (quantized, compressed, FQ-ViT,
serving layers): one class per (role, base class), so that graphdefs stay stable.

NNX has no method interceptor, so a matched module's ``__call__`` is changed by giving
the node a subclass of its own class: every attribute stays as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["node_subclass", "set_class"]

_SUBCLASSES: dict[tuple[str, type], type] = {}


def node_subclass(base: type, prefix: str, make_call: Callable[[Callable], Callable], *,
                  module: str, doc: str, extra: Mapping[str, Any] | None = None) -> type:
  """The subclass ``prefix + base.__name__`` of ``base`` whose ``__call__`` is
  ``make_call(base.__call__)`` (plus the ``extra`` attributes), created once per
  ``(prefix, base)`` (``base`` itself when it is that subclass already); ``module`` /
  ``doc`` are its ``__module__`` and docstring."""
  if _SUBCLASSES.get((prefix, base.__mro__[1])) is base:
    return base
  cls = _SUBCLASSES.get((prefix, base))
  if cls is None:
    name = prefix + base.__name__.removeprefix("Quantized")
    cls = type(name, (base,), {"__call__": make_call(base.__call__), **(extra or {}),
                               "__module__": module, "__qualname__": name, "__doc__": doc})
    _SUBCLASSES[(prefix, base)] = cls
  return cls


def set_class(node, cls: type) -> None:
  """Turns ``node`` into an instance of ``cls`` (a :func:`node_subclass` of its class)."""
  # No public NNX route changes a node's class; the subclass keeps every attribute.
  object.__setattr__(node, "__class__", cls)
