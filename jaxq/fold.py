"""BatchNorm folding and cross-layer equalization: float-exact rewrites that ease quantization.

Both act on parameter trees (nested dicts: Linen ``variables["params"]``, or the pure dict
of an NNX state, ``nnx.state(model, nnx.Param).to_pure_dict()``). Layers are named by
"/"-joined paths into the tree (e.g. ``"Conv_0"``, ``"block/conv"``, ``"layers/0"``); a
layer is a dict with a ``"kernel"`` (Dense ``(in, out)``, Conv ``(*window, in, out)``:
output channels on the last axis, input channels on the second to last) and optionally a
``"bias"``.

* **BatchNorm folding** (Nagel et al. 2021, "A White Paper on Neural Network
  Quantization", sec. 2.3.1; Krishnamoorthi 2018, sec. 3.2; Jacob et al. 2018): a
  BatchNorm after a Conv/Dense in inference mode is a per-output-channel affine map, so it
  merges into the layer: with ``sigma = sqrt(var + eps)``,
  ``W'[..., c] = W[..., c] * gamma_c / sigma_c`` and
  ``b'_c = beta_c + (b_c - mean_c) * gamma_c / sigma_c``.
  :func:`fold_batchnorm` does this on the trees, :func:`find_conv_bn_pairs` finds the
  pairs by tracing the model, and :class:`FoldedBatchNorm` / :func:`frozen_batchnorm` run
  the *unchanged* model definition with the folded BatchNorms reduced to their (now
  trivial) affine part, in training as in evaluation mode. This is the white paper's
  *static folding* for QAT (sec. 4.2): fold with the running statistics, then quantize
  and train the folded weights (wrap the :class:`FoldedBatchNorm` in
  :func:`jaxq.quantize_model`); for PTQ, fold and then calibrate/convert the same way.
* **Cross-layer equalization** (Nagel et al. 2019, "Data-Free Quantization Through Weight
  Equalization and Bias Correction", sec. 4.1): for ``y = W2 f(W1 x + b1) + b2`` with a
  positively homogeneous ``f`` (ReLU, leaky ReLU, identity),
  ``f(s^-1 z) = s^-1 f(z)`` for ``s > 0``, so scaling output channel ``i`` of layer 1 by
  ``1/s_i`` and input channel ``i`` of layer 2 by ``s_i`` leaves the function unchanged.
  The choice ``s_i = sqrt(r1_i / r2_i) = (1 / r2_i) sqrt(r1_i r2_i)`` (``r1_i``: range
  ``max |W1[..., i]|`` of output channel ``i`` of W1, ``r2_i``: range of input channel
  ``i`` of W2) makes both ranges ``sqrt(r1_i r2_i)``, which maximises the product of the
  per-channel precisions and so helps per-tensor quantization: :func:`equalize`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxq.flax.paths import module_path

#: Default BatchNorm epsilon of ``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm``.
BN_EPSILON = 1e-5

__all__ = [
    "BN_EPSILON", "FoldedBatchNorm", "equalization_scales", "equalize", "find_conv_bn_pairs",
    "fold_batchnorm", "fold_conv_bn", "frozen_batchnorm",
]


# ---------------------------------------------------------------------------------------
# Tree access by "/"-joined paths
# ---------------------------------------------------------------------------------------


def _split(path: str) -> tuple[str, ...]:
  if not isinstance(path, str) or not path:
    raise ValueError(f"layer paths are non-empty '/'-joined strings; got {path!r}")
  return tuple(path.split("/"))


def _child(node, key: str, path: str, tree_name: str):
  if isinstance(node, Mapping):
    if key in node:
      return node[key]
    if key.isdigit() and int(key) in node:  # NNX pure dicts key list entries by int
      return node[int(key)]
  raise ValueError(f"{tree_name} has no entry {path!r} (missing {key!r})")


def _get(tree, path: str, tree_name: str) -> Mapping:
  node = tree
  for key in _split(path):
    node = _child(node, key, path, tree_name)
  if not isinstance(node, Mapping):
    raise ValueError(f"{tree_name}[{path!r}] is a leaf, not a layer's dict of variables")
  return node


def _to_dict(tree):
  """A mutable nested-dict copy of ``tree`` (FrozenDicts and Mappings become dicts)."""
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def _set(tree: dict, path: str, name: str, value) -> None:
  node = tree
  keys = _split(path)
  for key in keys:
    if key not in node and key.isdigit() and int(key) in node:
      key = int(key)
    node = node[key]
  node[name] = value


def _kernel(layer: Mapping, path: str, tree_name: str) -> jax.Array:
  if "kernel" not in layer:
    raise ValueError(
        f"{tree_name}[{path!r}] has no 'kernel' (keys: {sorted(map(str, layer))}); "
        "only Dense/Conv-like layers (kernel with output channels last) are supported")
  kernel = jnp.asarray(layer["kernel"])
  if kernel.ndim < 2:
    raise ValueError(f"{tree_name}[{path!r}]['kernel'] must have rank >= 2; got shape "
                     f"{kernel.shape}")
  return kernel


# ---------------------------------------------------------------------------------------
# BatchNorm folding
# ---------------------------------------------------------------------------------------


def fold_conv_bn(kernel: jax.Array, bias: jax.Array | None, gamma: jax.Array | None,
                 beta: jax.Array | None, mean: jax.Array, var: jax.Array,
                 eps: float = BN_EPSILON) -> tuple[jax.Array, jax.Array]:
  """Folds ``BN(conv(x))`` (inference mode) into one conv: returns ``(kernel', bias')``.

  ``kernel'[..., c] = kernel[..., c] * gamma_c / sqrt(var_c + eps)`` and
  ``bias'_c = beta_c + (bias_c - mean_c) * gamma_c / sqrt(var_c + eps)``; a missing
  ``bias``/``beta`` counts as 0 and a missing ``gamma`` as 1. The arithmetic runs in
  float32 (or wider); results keep the kernel's dtype.
  """
  kernel = jnp.asarray(kernel)
  c = kernel.shape[-1]
  ct = jnp.promote_types(kernel.dtype, jnp.float32)
  mean, var = jnp.asarray(mean, ct), jnp.asarray(var, ct)
  gamma = jnp.ones((c,), ct) if gamma is None else jnp.asarray(gamma, ct)
  beta = jnp.zeros((c,), ct) if beta is None else jnp.asarray(beta, ct)
  bias = jnp.zeros((c,), ct) if bias is None else jnp.asarray(bias, ct)
  for name, v in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var),
                  ("bias", bias)):
    if v.shape != (c,):
      raise ValueError(
          f"{name} must have shape ({c},) to match the kernel's {c} output channels "
          f"(kernel shape {kernel.shape}); got {v.shape}")
  factor = gamma * jax.lax.rsqrt(var + eps)
  new_kernel = (kernel.astype(ct) * factor).astype(kernel.dtype)
  new_bias = beta + (bias - mean) * factor
  return new_kernel, new_bias


def fold_batchnorm(
    params: Mapping,
    batch_stats: Mapping,
    pairs: Iterable[tuple[str, str]],
    *,
    eps: float | Mapping[str, float] = BN_EPSILON,
) -> tuple[dict, dict]:
  """Folds each BatchNorm into the Conv/Dense before it (:func:`fold_conv_bn`).

  Args:
    params: the "params" tree (Linen ``variables["params"]`` or an NNX pure dict).
    batch_stats: the "batch_stats" tree holding each BatchNorm's ``mean`` and ``var``.
    pairs: ``(layer_path, bn_path)`` pairs, e.g. from :func:`find_conv_bn_pairs`; the
      layer's output must feed only the BatchNorm.
    eps: the BatchNorms' epsilon (a float, or a mapping from bn_path to float).

  Returns:
    ``(params, batch_stats)``, new trees (inputs are not modified) where the layer holds
    the folded kernel and the BatchNorm is the identity plus a bias: ``scale = 1``,
    ``mean = 0``, ``var = 1 - eps``. The folded bias ``b'`` goes to the layer's
    ``bias`` when it has one (the BatchNorm's ``bias`` becomes 0), else to the
    BatchNorm's ``bias``. Run them with the same model definition wrapped in
    :class:`FoldedBatchNorm` (exact, in training and evaluation mode); the plain model in
    evaluation mode gives the same result up to float32 rounding of ``1 - eps + eps``.
  """
  out_params, out_stats = _to_dict(params), _to_dict(batch_stats)
  pairs = [tuple(p) for p in pairs]
  seen: set[str] = set()
  for pair in pairs:
    if len(pair) != 2:
      raise ValueError(f"pairs must hold (layer_path, bn_path) tuples; got {pair!r}")
    for p in pair:
      if p in seen:
        raise ValueError(f"{p!r} appears in more than one pair: each layer and each "
                         "BatchNorm can be folded once")
      seen.add(p)
  for layer_path, bn_path in pairs:
    layer = _get(params, layer_path, "params")
    bn = _get(params, bn_path, "params") if _has(params, bn_path) else {}
    stats = _get(batch_stats, bn_path, "batch_stats")
    if "mean" not in stats or "var" not in stats:
      raise ValueError(f"batch_stats[{bn_path!r}] must hold 'mean' and 'var'; got keys "
                       f"{sorted(map(str, stats))}")
    e = eps[bn_path] if isinstance(eps, Mapping) else eps
    kernel = _kernel(layer, layer_path, "params")
    new_kernel, new_bias = fold_conv_bn(kernel, layer.get("bias"), bn.get("scale"),
                                        bn.get("bias"), stats["mean"], stats["var"], e)
    _set(out_params, layer_path, "kernel", new_kernel)
    if "bias" in layer:
      _set(out_params, layer_path, "bias", new_bias.astype(jnp.asarray(layer["bias"]).dtype))
      if "bias" in bn:
        _set(out_params, bn_path, "bias", jnp.zeros_like(bn["bias"]))
    elif "bias" in bn:
      _set(out_params, bn_path, "bias", new_bias.astype(jnp.asarray(bn["bias"]).dtype))
    elif bool(jnp.any(new_bias != 0)):
      raise ValueError(
          f"cannot fold {bn_path!r} into {layer_path!r}: the folded bias is non-zero but "
          "neither layer has a 'bias' parameter to hold it (use_bias=False on both)")
    if "scale" in bn:
      _set(out_params, bn_path, "scale", jnp.ones_like(bn["scale"]))
    _set(out_stats, bn_path, "mean", jnp.zeros_like(stats["mean"]))
    _set(out_stats, bn_path, "var", jnp.full_like(stats["var"], 1.0 - e))
  return out_params, out_stats


def _has(tree, path: str) -> bool:
  try:
    _get(tree, path, "")
  except ValueError:
    return False
  return True


def _module_path(module: nn.Module) -> str:
  return "/".join(module_path(module))


def find_conv_bn_pairs(model: nn.Module, *args, **kwargs) -> list[tuple[str, str]]:
  """Finds the ``(layer_path, bn_path)`` pairs of a Linen model by tracing one call.

  ``model.init`` runs abstractly (``jax.eval_shape``, nothing is computed) on ``args``
  and ``kwargs`` (arrays or ``jax.ShapeDtypeStruct``; e.g. ``train=False``). A pair is
  an ``nn.Conv`` or ``nn.Dense`` whose output array is passed *directly* to an
  ``nn.BatchNorm`` normalizing the last axis, and to no other module. (An output also
  consumed by plain jnp code, e.g. a residual sum, cannot be seen here; do not fold such
  a pair.)
  """
  produced: dict[int, tuple[str, Any]] = {}  # id(output) -> (layer path, output)
  consumers: dict[int, list[tuple[str, bool]]] = {}  # id(output) -> [(path, is_bn)]

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name == "__call__":
      is_bn = isinstance(module, nn.BatchNorm) and module.axis in (-1,)
      for a in list(call_args) + list(call_kwargs.values()):
        if id(a) in produced:
          consumers.setdefault(id(a), []).append((_module_path(module), is_bn))
    out = next_fun(*call_args, **call_kwargs)
    if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense)):
      produced[id(out)] = (_module_path(module), out)
    return out

  # Arrays (and ShapeDtypeStructs) are traced; every other argument stays static.
  leaves, treedef = jax.tree.flatten((args, kwargs))
  is_array = [isinstance(a, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) for a in leaves]

  def init(*arrays):
    it = iter(arrays)
    a, k = jax.tree.unflatten(treedef, [next(it) if d else l
                                        for l, d in zip(leaves, is_array)])
    with nn.intercept_methods(interceptor):
      return model.init(jax.random.key(0), *a, **k)

  jax.eval_shape(init, *[l for l, d in zip(leaves, is_array) if d])
  pairs = []
  for oid, (layer_path, _) in produced.items():
    users = consumers.get(oid, [])
    if len(users) == 1 and users[0][1]:
      pairs.append((layer_path, users[0][0]))
  return pairs


def _frozen_bn_interceptor(bn_paths: frozenset[str]):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, nn.BatchNorm)
        or _module_path(module) not in bn_paths):
      return next_fun(*args, **kwargs)
    x = jnp.asarray(args[0] if args else kwargs["x"])
    axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    axes = tuple(a % x.ndim for a in axes)
    shape = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
    y = x
    if module.use_scale:
      y = y * jnp.reshape(module.get_variable("params", "scale"), shape)
    if module.use_bias:
      y = y + jnp.reshape(module.get_variable("params", "bias"), shape)
    dtype = module.dtype or jnp.result_type(y)
    return y.astype(dtype)

  return interceptor


@contextlib.contextmanager
def frozen_batchnorm(bn_paths: Iterable[str]):
  """Context manager: the listed ``nn.BatchNorm`` modules compute ``x * scale + bias``.

  Inside it, the BatchNorms at ``bn_paths`` ("/"-joined module paths) ignore batch and
  running statistics (and do not update them), in training as in evaluation mode: after
  :func:`fold_batchnorm` they are exactly the folded bias.
  """
  bn_paths = frozenset(bn_paths)
  with nn.intercept_methods(_frozen_bn_interceptor(bn_paths)):
    yield


class FoldedBatchNorm(nn.Module):
  """Runs ``module`` with the BatchNorms at ``bn_paths`` frozen (:func:`frozen_batchnorm`).

  The wrapper shares the wrapped model's scope, so variables keep their names and shapes:
  ``FoldedBatchNorm(model, bn_paths).apply({"params": p, "batch_stats": s}, *args,
  **kwargs)`` takes what ``model.apply`` takes, with ``(p, s)`` from
  :func:`fold_batchnorm`. Other methods: the keyword ``method=`` (a string passed to
  ``__call__``) names a method of the wrapped model.
  Typical use::

    pairs = fold.find_conv_bn_pairs(model, x, train=False)
    params, stats = fold.fold_batchnorm(params, stats, pairs)
    folded = fold.FoldedBatchNorm(model, tuple(bn for _, bn in pairs))
    qmodel = jaxq.quantize_model(folded, rules)  # QAT/PTQ of the folded weights
  """

  # Not named "model": wrappers that share one scope need distinct child names (e.g.
  # jaxq.quantize_model(FoldedBatchNorm(...)), whose wrapper holds a "model").
  module: nn.Module
  bn_paths: tuple[str, ...]

  def setup(self):
    nn.share_scope(self, self.module)

  def __call__(self, *args, method: str = "__call__", **kwargs):
    with frozen_batchnorm(self.bn_paths):
      return getattr(self.module, method)(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# Cross-layer equalization
# ---------------------------------------------------------------------------------------


def _channel_range(w: jax.Array, axis: int) -> jax.Array:
  axes = tuple(a for a in range(w.ndim) if a != axis % w.ndim)
  return jnp.max(jnp.abs(w.astype(jnp.float32)), axis=axes)


def equalization_scales(w1: jax.Array, w2: jax.Array) -> jax.Array:
  """Per-channel CLE scales ``s_i = (1 / r2_i) * sqrt(r1_i * r2_i)`` (Nagel et al. 2019).

  ``r1_i = max |w1[..., i]|`` (output channel ``i`` of layer 1, last axis) and
  ``r2_i = max |w2[..., i, :]|`` (input channel ``i`` of layer 2, second to last axis).
  Channels where either range is 0 (or not finite) get ``s_i = 1``.
  """
  w1, w2 = jnp.asarray(w1), jnp.asarray(w2)
  if w1.ndim < 2 or w2.ndim < 2:
    raise ValueError(f"kernels must have rank >= 2; got shapes {w1.shape} and {w2.shape}")
  if w1.shape[-1] != w2.shape[-2]:
    raise ValueError(
        f"layer 1's output channels (kernel shape {w1.shape}, last axis) must match "
        f"layer 2's input channels (kernel shape {w2.shape}, second to last axis); "
        "grouped/depthwise second layers are not supported")
  r1, r2 = _channel_range(w1, -1), _channel_range(w2, -2)
  s = jnp.sqrt(r1 * r2) / r2
  ok = (r1 > 0) & (r2 > 0) & jnp.isfinite(s)
  return jnp.where(ok, s, 1.0)


def equalize(params: Mapping, pairs: Sequence[tuple[str, str]], *,
             iterations: int = 1) -> dict:
  """Cross-layer equalization of ``(layer1_path, layer2_path)`` pairs (Nagel et al. 2019).

  Each pair must be ``layer2(f(layer1(x)))`` with ``f`` positively homogeneous (ReLU,
  leaky ReLU, identity; not ReLU6, GELU or a BatchNorm in between: fold it first).
  ``W1[..., i] /= s_i``, ``b1_i /= s_i``, ``W2[..., i, :] *= s_i`` with
  ``s = equalization_scales(W1, W2)``, which leaves the network's function unchanged
  and both channel ranges equal to ``sqrt(r1_i r2_i)``. For chains (``A -> B -> C`` as
  pairs ``(A, B), (B, C)``) the pairs are equalized in order and the pass is repeated
  ``iterations`` times (the paper iterates until convergence).

  Returns a new params tree (the input is not modified).
  """
  if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
    raise ValueError(f"iterations must be a positive int; got {iterations!r}")
  pairs = [tuple(p) for p in pairs]
  for pair in pairs:
    if len(pair) != 2:
      raise ValueError(f"pairs must hold (layer1_path, layer2_path) tuples; got {pair!r}")
  out = _to_dict(params)
  for _ in range(iterations):
    for p1, p2 in pairs:
      l1, l2 = _get(out, p1, "params"), _get(out, p2, "params")
      w1, w2 = _kernel(l1, p1, "params"), _kernel(l2, p2, "params")
      s = equalization_scales(w1, w2)
      _set(out, p1, "kernel", (w1 / s).astype(w1.dtype))
      if l1.get("bias") is not None:
        b1 = jnp.asarray(l1["bias"])
        _set(out, p1, "bias", (b1 / s).astype(b1.dtype))
      _set(out, p2, "kernel", (w2 * s[:, None]).astype(w2.dtype))
  return out

