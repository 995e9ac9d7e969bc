"""The storage layout of a :class:`jaxq.QArray`: shapes and dtypes of its three arrays.

``values``: widths that divide 8 (:data:`PACKED_BITS`: 1, 2, 4) are bit-packed into
``uint8`` along the last axis with :func:`jaxq.bitpack.pack_bits` (a 0-d array as shape
``(1,)``); other widths take one byte per element, ``int8`` signed / ``uint8`` unsigned,
in the logical shape. ``scale``: floating, in the keepdims layout of
:mod:`jaxq.quantizer` (against the grouped view for "group"), or NF4's double-quantized
absmax (:class:`jaxq.nf4.DoubleQuantAbsmax`). ``zero_point``: integer, broadcasting
like ``scale``. :func:`check_arrays` checks all of it, for arrays read back from a
checkpoint or built by hand.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxq import nf4
from jaxq.spec import QuantSpec

__all__ = ["PACKED_BITS", "check_arrays", "storage_dtype", "storage_shape"]

#: Widths stored bit-packed (more than one element a byte).
PACKED_BITS = (1, 2, 4)


def storage_dtype(signed: bool) -> jnp.dtype:
  """``int8`` for signed, ``uint8`` for unsigned integers a byte each (and zero points)."""
  return jnp.dtype(jnp.int8) if signed else jnp.dtype(jnp.uint8)


def storage_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of ``values`` for a logical ``shape`` (bit-packed along the last axis)."""
  if spec.bits not in PACKED_BITS:
    return tuple(shape)
  flat = tuple(shape) if shape else (1,)
  return flat[:-1] + (-(-flat[-1] // (8 // spec.bits)),)


def check_arrays(values, scale, zero_point, *, spec: QuantSpec, shape, dtype,
                 group_axis: int) -> None:
  """ValueError unless the three arrays are what ``spec``, ``shape``, ``dtype`` and
  ``group_axis`` describe: ``values`` of :func:`storage_shape` and the storage dtype,
  a floating ``scale`` and an integer ``zero_point`` broadcasting against the quant
  view. Leading axes shared by all three (a stack of QArrays, under ``vmap`` or
  ``scan``) are allowed."""
  shape = tuple(shape)
  if not jnp.issubdtype(np.dtype(dtype), jnp.floating):
    raise ValueError(f"QArray dtype must be floating; got {dtype}")
  want = storage_shape(spec, shape)
  vshape = tuple(np.shape(values))
  lead = len(vshape) - len(want)
  if lead < 0 or vshape[lead:] != want:
    raise ValueError(
        f"QArray values of shape {vshape} do not match its logical shape {shape} "
        f"({spec.bits}-bit values are stored as {want})")
  vdtype = jnp.dtype(jnp.uint8) if spec.bits in PACKED_BITS else storage_dtype(spec.signed)
  if np.dtype(values.dtype) != vdtype:
    raise ValueError(f"QArray values must be {vdtype} for a {spec.bits}-bit "
                     f"{'signed' if spec.signed else 'unsigned'} spec; got {values.dtype}")
  view = shape
  if spec.granularity == "group":
    if not shape or not -len(shape) <= group_axis < len(shape) or (
        shape[group_axis] % spec.group_size):
      raise ValueError(f"QArray group_axis={group_axis} with group_size={spec.group_size} "
                       f"does not fit its logical shape {shape}")
    ga = group_axis % len(shape)
    view = shape[:ga] + (shape[ga] // spec.group_size, spec.group_size) + shape[ga + 1:]
  checked = (("zero_point", zero_point, jnp.integer),)
  if isinstance(scale, nf4.DoubleQuantAbsmax):
    _check_double_quant(scale, spec, view, lead)
  else:
    checked = (("scale", scale, jnp.floating),) + checked
  for name, a, kind in checked:
    ashape = tuple(np.shape(a))
    core = ashape[lead:] if ashape[:lead] == vshape[:lead] else ashape
    if len(core) > len(view) or any(c not in (1, d) for c, d in zip(core[::-1], view[::-1])):
      raise ValueError(f"QArray {name} of shape {ashape} does not broadcast against its "
                       f"quantized view of shape {view} (logical shape {shape})")
    if not jnp.issubdtype(a.dtype, kind):
      raise ValueError(f"QArray {name} must be {kind.__name__}; got dtype {a.dtype}")


def _check_double_quant(dq, spec: QuantSpec, view, lead: int) -> None:
  """A double-quantized absmax must be NF4's, with one int8 code per group."""
  if spec.scheme != "nf4":
    raise ValueError(f"a double-quantized scale belongs to scheme='nf4'; got "
                     f"scheme={spec.scheme!r}")
  groups = math.prod(view) // spec.group_size
  blocks = -(-groups // nf4.DOUBLE_QUANT_BLOCK)
  want = {"codes": ((groups,), jnp.int8), "block_scale": ((blocks,), jnp.float32),
          "mean": ((), jnp.float32)}
  for name, (shape, dtype) in want.items():
    a = getattr(dq, name)
    if tuple(np.shape(a))[lead:] != shape or np.dtype(a.dtype) != dtype:
      raise ValueError(f"QArray double-quantized scale {name} must be {np.dtype(dtype)}"
                       f"{shape} for {groups} groups; got {a.dtype}{tuple(np.shape(a))}")
