"""QArray: a quantized array as a pytree of integer values, scales and zero points.

``quantize(x, spec)`` stores ``q = clip(round(x / s) + z, qmin, qmax)`` and
``dequantize(q)`` returns ``(q - z) * s`` in the original dtype (Jacob et al. 2018).

Storage (what :attr:`QArray.nbytes` counts; :mod:`jaxq.qarray_layout` checks it):

* ``values``: widths that divide 8 (1, 2, 4 bits) are bit-packed into ``uint8`` along the
  last axis, ``8 // bits`` elements a byte, the last axis zero-padded to a multiple of
  ``8 // bits``; element ``j`` of a byte occupies bits ``[j*bits, (j+1)*bits)`` (little
  end first, as the Pallas kernels of Contract 5). Signed values are stored as their
  low ``bits`` bits in two's complement and sign-extended on unpacking. Other widths
  (3, 5, 6, 7, 8 bits) take one byte per element: ``int8`` when signed, ``uint8`` when
  unsigned, in the logical shape. A 0-d array is stored as shape ``(1,)``-packed bytes.
* ``scale``: float32 (float64 for float64 arrays under ``jax_enable_x64``), keepdims
  layout of :mod:`jaxq.quantizer` (broadcasts against the array, or against its grouped
  view for "group").
* ``zero_point``: integer-valued, same shape as ``scale``, ``int8`` when signed and
  ``uint8`` when unsigned; it is stored (as zeros) for symmetric specs too, so every
  QArray has the same three leaves.

NF4 (``QuantSpec(4, scheme="nf4", granularity="group", group_size=g)``, QLoRA's
NormalFloat-4, :mod:`jaxq.nf4`): ``values`` are the packed 4-bit codes (unsigned, code
``c`` stands for ``NF4_LEVELS[c]``), ``scale`` the float32 absmax of each group of ``g``
consecutive elements of ``group_axis`` and each index of every other axis (keepdims
layout of the grouped view; ``spec.axis`` does not apply), or with
``quantize(..., double_quant=True)`` its double-quantized form
(:class:`jaxq.nf4.DoubleQuantAbsmax`: int8 codes, one float32 scale per 256 absmaxes in
flattened order, a float32 mean); ``zero_point`` is a scalar int8 zero. It dequantizes
to ``level[code] * absmax``, so ``levels * absmax`` round-trips exactly with float32
scales.

Serialization: QArray is registered with :mod:`flax.serialization` (a self-describing
dict of its three arrays, bit-exact, plus its static metadata; :func:`qarray_from_state`
rebuilds it without a target) and with ``jax.export`` (pytree name "jaxq.QArray"), so
:mod:`jaxq.checkpoint` and :mod:`jaxq.export` handle trees holding QArrays.

Non-finite inputs: integers cannot hold NaN, so ``quantize`` maps NaN to the zero point
(it dequantizes to 0.0) and saturates +-Inf to ``qmax`` / ``qmin``. (Fake quantization,
:func:`jaxq.quantizer.fake_quantize`, propagates NaN instead.)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from jaxq import nf4
from jaxq import numerics
from jaxq import quantizer
from jaxq.bitpack import pack_bits, unpack_bits  # re-exported: jaxq.qarray.pack_bits
from jaxq.qarray_layout import PACKED_BITS, check_arrays, storage_dtype, storage_shape
from jaxq.spec import QuantSpec, check_spec

# ---------------------------------------------------------------------------------------
# QArray
# ---------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class QArray:
  """A quantized array: leaves ``values``, ``scale``, ``zero_point``; static metadata.

  Attributes:
    values: integer storage (bit-packed ``uint8`` for 1/2/4 bits; see module docstring).
    scale: float32 scales (keepdims layout of :mod:`jaxq.quantizer`).
    zero_point: integer zero points (int8 signed / uint8 unsigned), ``scale``'s shape.
    spec: the :class:`~jaxq.spec.QuantSpec` it was quantized with (static).
    shape: the logical shape (static).
    dtype: the original floating dtype, returned by :func:`dequantize` (static).
    group_axis: the grouped axis for granularity "group" (static).

  Build one with :func:`quantize` / :func:`quantize_with`. Under ``vmap`` the leaves
  carry the batch axis while ``shape`` stays the per-example logical shape.
  """

  def __init__(self, values, scale, zero_point, *, spec: QuantSpec, shape, dtype,
               group_axis: int = 0):
    self.values = values
    self.scale = scale
    self.zero_point = zero_point
    self.spec = spec
    self.shape = tuple(shape)
    self.dtype = np.dtype(dtype)
    self.group_axis = group_axis

  def tree_flatten(self):
    return ((self.values, self.scale, self.zero_point),
            (self.spec, self.shape, self.dtype, self.group_axis))

  @classmethod
  def tree_unflatten(cls, aux, children):
    spec, shape, dtype, group_axis = aux
    return cls(*children, spec=spec, shape=shape, dtype=dtype, group_axis=group_axis)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def bits(self) -> int:
    return self.spec.bits

  @property
  def packed(self) -> bool:
    """Whether ``values`` are bit-packed (1, 2 or 4 bits)."""
    return self.spec.bits in PACKED_BITS

  @property
  def nbytes(self) -> int:
    """Bytes of storage: ``values`` + ``scale`` (all its arrays) + ``zero_point``."""
    return sum(int(np.prod(jnp.shape(a), dtype=np.int64)) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree_util.tree_leaves((self.values, self.scale,
                                                   self.zero_point)))

  def int_values(self) -> jax.Array:
    """The integers ``q`` in the logical shape (int8 signed / uint8 unsigned; the
    uint8 codes of an NF4 array)."""
    if not self.packed:
      return self.values
    flat_shape = self.shape if self.shape else (1,)
    q = unpack_bits(self.values, self.bits, flat_shape[-1], axis=-1,
                    signed=self.spec.signed and self.spec.scheme == "uniform")
    return q.reshape(q.shape[:q.ndim - len(flat_shape)] + self.shape)

  def dequantize(self) -> jax.Array:
    return dequantize(self)

  def __repr__(self) -> str:
    s = self.spec
    return (f"QArray(shape={self.shape}, dtype={self.dtype.name}, bits={s.bits}, "
            f"signed={s.signed}, symmetric={s.symmetric}, granularity={s.granularity!r}"
            f"{f', group_size={s.group_size}' if s.group_size else ''}, "
            f"values={getattr(self.values, 'dtype', '?')}{tuple(jnp.shape(self.values))}, "
            f"scale={_scale_repr(self.scale)}, nbytes={self.nbytes})")


def _scale_repr(scale) -> str:
  if isinstance(scale, nf4.DoubleQuantAbsmax):
    return f"double-quantized{tuple(jnp.shape(scale.codes))}"
  return str(tuple(jnp.shape(scale)))


def _as_qarray_spec(spec, schemes=("uniform", "nf4")) -> QuantSpec:
  """QArray stores uniform or NF4 quantization (``quantize_with``: uniform only)."""
  return check_spec(spec, schemes, "QArray stores uniform or NF4 quantization")


def quantize(x: jax.Array, spec: QuantSpec, *, key: jax.Array | None = None,
             group_axis: int = 0, double_quant: bool = False) -> QArray:
  """Quantizes ``x`` with min-max qparams at ``spec.granularity`` into a :class:`QArray`.

  "group" splits ``group_axis`` (axis 0 by default, as the contract says for a bare
  array) into groups of ``spec.group_size``, keeping ``spec.axis`` as the channel axis
  when it is another axis. ``spec.rounding == "stochastic"`` needs ``key``.
  ``scheme="nf4"``: packed NF4 codes and a float32 absmax per group (module docstring);
  ``double_quant=True`` stores the absmaxes double-quantized (QLoRA; NF4 only).
  """
  spec = _as_qarray_spec(spec)
  x = numerics.check_float(x)
  if spec.scheme == "nf4":
    return _quantize_nf4(x, spec, group_axis, double_quant)
  if double_quant:
    raise ValueError("double_quant=True applies to scheme='nf4' absmaxes only; got "
                     f"scheme={spec.scheme!r}")
  scale, zero_point = quantizer.compute_qparams(x, spec, group_axis=group_axis)
  return quantize_with(x, spec, scale, zero_point, key=key, group_axis=group_axis)


def quantize_with(x: jax.Array, spec: QuantSpec, scale: jax.Array,
                  zero_point: jax.Array | None = None, *, key: jax.Array | None = None,
                  group_axis: int = 0) -> QArray:
  """Quantizes ``x`` with given (e.g. calibrated) ``scale`` and ``zero_point``.

  ``scale`` must broadcast against ``x`` (or its grouped view for "group"); a scale
  of magnitude below :data:`jaxq.numerics.SCALE_EPS` (0 included) is stored as
  ``+-SCALE_EPS`` (:func:`jaxq.numerics.floor_scale`).
  ``zero_point`` (None: 0) is rounded to an integer and clipped into ``[qmin, qmax]``,
  since it is stored as such. Both are stored broadcast to their
  common shape. ``q = clip(round(x / scale) + zero_point, qmin, qmax)``, round half to
  even, or ``floor(x / scale + u)`` with ``u ~ U[0, 1)`` drawn from ``key`` when
  ``spec.rounding == "stochastic"``.
  """
  spec = _as_qarray_spec(spec, ("uniform",))
  x = numerics.check_float(x)
  if spec.rounding == "stochastic" and key is None:
    raise ValueError(
        "QuantSpec.rounding='stochastic' needs a PRNG key: quantize(x, spec, "
        "key=jax.random.key(...))")
  if spec.symmetric:
    numerics.check_symmetric_range(spec.bits, spec.signed)
  qmin, qmax = spec.qmin, spec.qmax
  xv = quantizer.quant_view(x.astype(numerics.compute_dtype(x.dtype)), spec, group_axis)
  scale = numerics.floor_scale(jnp.asarray(scale, numerics.float_dtype(x)))
  zero_point = jnp.zeros((), jnp.float32) if zero_point is None else jnp.asarray(
      zero_point, jnp.float32)
  numerics.check_broadcast("scale", scale, xv.shape)
  numerics.check_broadcast("zero_point", zero_point, xv.shape)
  stat = jnp.broadcast_shapes(scale.shape, zero_point.shape)
  scale = jnp.broadcast_to(scale, stat)
  zero_point = jnp.clip(jnp.round(jnp.broadcast_to(zero_point, stat)), qmin, qmax)

  v = xv / scale
  r = numerics.round_stochastic(v, key) if spec.rounding == "stochastic" else jnp.round(v)
  q = jnp.clip(r + zero_point, qmin, qmax)
  q = jnp.where(jnp.isnan(xv), zero_point, q)
  q = quantizer.from_quant_view(q, spec, group_axis).astype(storage_dtype(spec.signed))
  if spec.bits in PACKED_BITS:
    values = pack_bits(q.reshape(q.shape if q.ndim else (1,)), spec.bits, axis=-1)
  else:
    values = q
  return QArray(values, scale, zero_point.astype(storage_dtype(spec.signed)),
                spec=spec, shape=x.shape, dtype=x.dtype, group_axis=group_axis)


def _quantize_nf4(x: jax.Array, spec: QuantSpec, group_axis: int, double_quant: bool
                  ) -> QArray:
  if x.ndim == 0:
    raise ValueError("scheme='nf4' needs an array of rank >= 1; got a scalar")
  ga = numerics.normalize_axis(group_axis, x.ndim, "group_axis")
  codes, absmax = nf4.nf4_codes(x, spec.group_size, ga)
  scale = nf4.double_quantize_absmax(absmax) if double_quant else absmax
  return QArray(pack_bits(codes, 4, axis=-1), scale, jnp.zeros((), jnp.int8), spec=spec,
                shape=x.shape, dtype=x.dtype, group_axis=ga)


def nf4_absmax(q: QArray) -> jax.Array:
  """The float32 absmax of an NF4 :class:`QArray` (recovered when double-quantized), in
  the keepdims layout of its grouped view."""
  if not isinstance(q.scale, nf4.DoubleQuantAbsmax):
    return jnp.asarray(q.scale, jnp.float32)
  ga = q.group_axis % q.ndim
  stat = q.shape[:ga] + (q.shape[ga] // q.spec.group_size, 1) + q.shape[ga + 1:]
  flat = nf4.recover_absmax(q.scale)
  return flat.reshape(flat.shape[:-1] + stat)


def dequantize(q: QArray) -> jax.Array:
  """``(q - zero_point) * scale`` in the logical shape and the original dtype (a grid
  point beyond the largest finite float, for a range reaching it, gives that float);
  ``level[code] * absmax`` for NF4."""
  if not isinstance(q, QArray):
    raise TypeError(f"dequantize needs a QArray; got {type(q).__name__}")
  if q.spec.scheme == "nf4":
    codes = q.int_values()
    lead = codes.ndim - q.ndim
    values = nf4.nf4_values(codes, nf4_absmax(q), q.spec.group_size,
                            lead + q.group_axis % q.ndim)
    return values.astype(q.dtype)
  scale = jnp.asarray(q.scale)
  dtype = numerics.float_dtype(scale)
  ints = q.int_values().astype(dtype)
  zp = jnp.asarray(q.zero_point).astype(dtype)
  scale = scale.astype(dtype)
  iv = quantizer.quant_view(ints, q.spec, q.group_axis)
  big = jnp.finfo(dtype).max  # a grid end beyond the float range (a +-3.4e38 range)
  x = jnp.clip((iv - zp) * scale, -big, big)
  return quantizer.from_quant_view(x, q.spec, q.group_axis).astype(q.dtype)


# ---------------------------------------------------------------------------------------
# Serialization
# ---------------------------------------------------------------------------------------

#: Key marking a serialized QArray inside a state dict.
STATE_MARK = "__jaxq_qarray__"


def _meta(spec: QuantSpec, shape, dtype, group_axis) -> dict:
  return {"spec": dataclasses.asdict(spec), "shape": [int(d) for d in shape],
          "dtype": np.dtype(dtype).name, "group_axis": int(group_axis)}


def _from_meta(meta: Mapping) -> dict:
  return {"spec": QuantSpec(**meta["spec"]), "shape": tuple(int(d) for d in meta["shape"]),
          "dtype": np.dtype(meta["dtype"]), "group_axis": int(meta["group_axis"])}


def qarray_to_state(q: QArray) -> dict:
  """A QArray as a msgpack-able dict: its arrays as they are plus its metadata (a
  double-quantized NF4 absmax as the dict of its three arrays)."""
  scale = q.scale._asdict() if isinstance(q.scale, nf4.DoubleQuantAbsmax) else q.scale
  return {STATE_MARK: True, "values": q.values, "scale": scale,
          "zero_point": q.zero_point, "meta": _meta(q.spec, q.shape, q.dtype, q.group_axis)}


def qarray_from_state(state: Mapping) -> QArray:
  """Inverse of :func:`qarray_to_state`; ValueError when the metadata is malformed or
  does not describe the arrays (:func:`check_arrays`)."""
  missing = {"values", "scale", "zero_point", "meta"} - set(state)
  if missing:
    raise ValueError(f"not a serialized QArray: missing {sorted(missing)}")
  try:
    meta = _from_meta(state["meta"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"malformed QArray metadata {state['meta']!r}: {e}") from None
  scale = state["scale"]
  if isinstance(scale, Mapping):
    if set(scale) != set(nf4.DoubleQuantAbsmax._fields):
      raise ValueError(f"not a serialized QArray: a dict scale must hold the arrays "
                       f"{nf4.DoubleQuantAbsmax._fields} of a double-quantized NF4 absmax; "
                       f"got {sorted(scale)}")
    scale = nf4.DoubleQuantAbsmax(**scale)
  check_arrays(state["values"], scale, state["zero_point"], **meta)
  return QArray(state["values"], scale, state["zero_point"], **meta)


serialization.register_serialization_state(
    QArray, qarray_to_state, lambda target, state: qarray_from_state(state), override=True)


def _aux_to_bytes(aux) -> bytes:
  return json.dumps(_meta(*aux)).encode()


def _aux_from_bytes(data: bytes):
  m = _from_meta(json.loads(data.decode()))
  return (m["spec"], m["shape"], m["dtype"], m["group_axis"])


try:
  jax.export.register_pytree_node_serialization(
      QArray, serialized_name="jaxq.QArray", serialize_auxdata=_aux_to_bytes,
      deserialize_auxdata=_aux_from_bytes)
except ValueError:  # already registered (module reloaded)
  pass
