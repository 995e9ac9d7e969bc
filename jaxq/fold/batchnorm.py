"""BatchNorm folding (Nagel et al. 2021, "A White Paper on Neural Network Quantization",
sec. 2.3.1; Krishnamoorthi 2018, sec. 3.2; Jacob et al. 2018).

A BatchNorm after a Conv/Dense in inference mode is a per-output-channel affine map, so it
merges into the layer: with ``sigma = sqrt(var + eps)``,
``W'[..., c] = W[..., c] * gamma_c / sigma_c`` and
``b'_c = beta_c + (b_c - mean_c) * gamma_c / sigma_c``. :func:`fold_batchnorm` does this
on the trees (layers named by paths, :mod:`jaxq.fold.tree`), :func:`find_conv_bn_pairs`
finds the pairs by tracing the model, and :class:`FoldedBatchNorm` /
:func:`frozen_batchnorm` run the *unchanged* model definition with the folded BatchNorms
reduced to their (now trivial) affine part, in training as in evaluation mode. This is
the white paper's *static folding* for QAT (sec. 4.2): fold with the running statistics,
then quantize and train the folded weights (wrap the :class:`FoldedBatchNorm` in
:func:`jaxq.quantize_model`); for PTQ, fold and then calibrate/convert the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxq.flax.paths import module_path
from jaxq.fold.tree import has_layer, layer_at, layer_kernel, mutable_copy, set_entry

#: Default BatchNorm epsilon of ``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm``.
BN_EPSILON = 1e-5

__all__ = [
    "BN_EPSILON", "FoldedBatchNorm", "find_conv_bn_pairs", "fold_batchnorm", "fold_conv_bn",
    "frozen_batchnorm",
]


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

  Stacked layers (``nn.scan`` / ``nnx.vmap``): statistics of shape ``(*lead, C)`` fold
  into a kernel with the same leading axes ``(*lead, ..., C)``, one layer of the stack
  at a time.
  """
  kernel = jnp.asarray(kernel)
  c = kernel.shape[-1]
  ct = jnp.promote_types(kernel.dtype, jnp.float32)
  mean, var = jnp.asarray(mean, ct), jnp.asarray(var, ct)
  shape = mean.shape[:-1] + (c,)
  lead = shape[:-1]
  gamma = jnp.ones(shape, ct) if gamma is None else jnp.asarray(gamma, ct)
  beta = jnp.zeros(shape, ct) if beta is None else jnp.asarray(beta, ct)
  bias = jnp.zeros(shape, ct) if bias is None else jnp.asarray(bias, ct)
  for name, v in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var),
                  ("bias", bias)):
    if v.shape != shape:
      raise ValueError(
          f"{name} must have shape {shape} to match the kernel's {c} output channels "
          f"(kernel shape {kernel.shape}); got {v.shape}")
  if kernel.ndim < len(lead) + 2 or kernel.shape[:len(lead)] != lead:
    raise ValueError(
        f"statistics of shape {shape} belong to a stack of {lead} layers: the kernel needs "
        f"the same leading (stacking) axes and rank >= {len(lead) + 2}; got {kernel.shape}")
  return _folded(kernel, bias, gamma, beta, mean, var, jnp.asarray(eps, ct))


@jax.jit
def _folded(kernel, bias, gamma, beta, mean, var, eps):
  """:func:`fold_conv_bn`'s arithmetic on checked arrays (one compilation per shape)."""
  factor = gamma * jax.lax.rsqrt(var + eps)
  lead = mean.ndim - 1
  per_output = factor.reshape(factor.shape[:-1] + (1,) * (kernel.ndim - lead - 1)
                              + factor.shape[-1:])
  new_kernel = (kernel.astype(factor.dtype) * per_output).astype(kernel.dtype)
  return new_kernel, beta + (bias - mean) * factor


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
  out_params, out_stats = mutable_copy(params), mutable_copy(batch_stats)
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
    layer = layer_at(params, layer_path, "params")
    bn = layer_at(params, bn_path, "params") if has_layer(params, bn_path) else {}
    stats = layer_at(batch_stats, bn_path, "batch_stats")
    if "mean" not in stats or "var" not in stats:
      raise ValueError(f"batch_stats[{bn_path!r}] must hold 'mean' and 'var'; got keys "
                       f"{sorted(map(str, stats))}")
    e = eps[bn_path] if isinstance(eps, Mapping) else eps
    kernel = layer_kernel(layer, layer_path, "params")
    new_kernel, new_bias = fold_conv_bn(kernel, layer.get("bias"), bn.get("scale"),
                                        bn.get("bias"), stats["mean"], stats["var"], e)
    set_entry(out_params, layer_path, "kernel", new_kernel)
    if "bias" in layer:
      set_entry(out_params, layer_path, "bias", new_bias.astype(jnp.asarray(layer["bias"]).dtype))
      if "bias" in bn:
        set_entry(out_params, bn_path, "bias", jnp.zeros_like(bn["bias"]))
    elif "bias" in bn:
      set_entry(out_params, bn_path, "bias", new_bias.astype(jnp.asarray(bn["bias"]).dtype))
    elif bool(jnp.any(new_bias != 0)):
      raise ValueError(
          f"cannot fold {bn_path!r} into {layer_path!r}: the folded bias is non-zero but "
          "neither layer has a 'bias' parameter to hold it (use_bias=False on both)")
    if "scale" in bn:
      set_entry(out_params, bn_path, "scale", jnp.ones_like(bn["scale"]))
    set_entry(out_stats, bn_path, "mean", jnp.zeros_like(stats["mean"]))
    set_entry(out_stats, bn_path, "var", jnp.full_like(stats["var"], 1.0 - e))
  return out_params, out_stats


def abstract_call(fn: Callable, *args, **kwargs) -> Any:
  """``fn(*args, **kwargs)`` under ``jax.eval_shape`` (nothing is computed).

  Array leaves of ``args``/``kwargs`` (``jax.Array``, ``np.ndarray``,
  ``jax.ShapeDtypeStruct``) are traced; every other leaf stays static (e.g.
  ``train=False``). Returns the shapes and dtypes of the result.
  """
  leaves, treedef = jax.tree.flatten((args, kwargs))
  is_array = [isinstance(a, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) for a in leaves]

  def call(*arrays):
    it = iter(arrays)
    a, k = jax.tree.unflatten(treedef, [next(it) if d else l
                                        for l, d in zip(leaves, is_array)])
    return fn(*a, **k)

  return jax.eval_shape(call, *[l for l, d in zip(leaves, is_array) if d])


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

  def init(*a, **k):
    with nn.intercept_methods(interceptor):
      return model.init(jax.random.key(0), *a, **k)

  abstract_call(init, *args, **kwargs)
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
