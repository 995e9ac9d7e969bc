"""Where a bound Linen module's variables live: its path in the variable tree.

``Module.path`` is the path the module's scope was created at. Under
:func:`flax.linen.share_scope` (how :func:`jaxq.quantize_model` wraps a model without
adding a level) the scope of a submodule that the wrapped model holds as an attribute
(e.g. the layers of ``nn.Sequential``) is re-parented, and ``Module.path`` still names
the wrapped model (``("model", "layers_0")``) while its variables live at
``("layers_0",)``. Rules, observers and converted kernels are keyed by the variable path,
so jaxq reads it from the scope's parent chain.
"""

from __future__ import annotations

import flax.linen as nn


def module_path(module: nn.Module) -> tuple[str, ...]:
  """The names from the variable tree's root to ``module``'s variables.

  The scope's parent chain up to its root, which re-parenting keeps right; the root's own
  path is kept too, as the inner root of a lifted transform (``nn.scan``, ``nn.remat``,
  ``nn.vmap``, ...) carries the path of the scope it was lifted from.
  """
  names = []
  scope = module.scope
  while scope.parent is not None:
    names.append(str(scope.name))
    scope = scope.parent
  return tuple(scope.path) + tuple(reversed(names))
