"""Calibration batches as the PTQ entry points take them (Linen and NNX alike)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["normalize_batch", "split_static_kwargs", "is_empty_batch"]


def normalize_batch(batch) -> tuple[tuple, dict]:
  """``(args, kwargs)`` of one calibration batch: a tuple/list of positional arguments,
  a dict of keyword arguments, or a bare array (one positional argument)."""
  if isinstance(batch, tuple):
    return batch, {}
  if isinstance(batch, list):
    return tuple(batch), {}
  if isinstance(batch, Mapping):
    return (), dict(batch)
  return (batch,), {}


def split_static_kwargs(kwargs: Mapping[str, Any]) -> tuple[tuple, dict]:
  """``(static, arrays)``: keyword arguments that are Python scalars / strings / None
  (flags such as ``train=False``, hashable: a jit static argument) and the others."""
  static = tuple(sorted((k, v) for k, v in kwargs.items()
                        if v is None or isinstance(v, (bool, int, float, str))))
  names = {k for k, _ in static}
  return static, {k: v for k, v in kwargs.items() if k not in names}


def is_empty_batch(args, kwargs) -> bool:
  """Whether a batch holds an array with no elements (e.g. a zero-length final batch)."""
  return any(jnp.size(a) == 0 for a in jax.tree_util.tree_leaves((args, kwargs))
             if hasattr(a, "shape"))
