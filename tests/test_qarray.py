"""QArray: quantize / dequantize against a float64 numpy reference, packing, nbytes."""

from __future__ import annotations

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.qarray import QArray, dequantize, pack_bits, quantize, quantize_with, unpack_bits
from jaxq.spec import QuantSpec

EPS = float(np.finfo(np.float32).eps)


# ------------------------------------------------------------------ numpy reference


def np_view(x, spec, group_axis):
  """Grouped view and reduction axes, written independently of jaxq."""
  if spec.granularity == "tensor":
    return x, tuple(range(x.ndim))
  c = spec.axis % x.ndim
  if spec.granularity == "channel":
    return x, tuple(a for a in range(x.ndim) if a != c)
  g = group_axis % x.ndim
  xv = x.reshape(x.shape[:g] + (x.shape[g] // spec.group_size, spec.group_size)
                 + x.shape[g + 1:])
  keep = {g} | ({c if c < g else c + 1} if c != g else set())
  return xv, tuple(a for a in range(xv.ndim) if a not in keep)


def np_qparams(x, spec, group_axis=0):
  x = np.asarray(x, np.float64)
  xv, axes = np_view(x, spec, group_axis)
  fin = np.isfinite(xv)
  lo = np.min(np.where(fin, xv, np.inf), axis=axes, keepdims=True)
  hi = np.max(np.where(fin, xv, -np.inf), axis=axes, keepdims=True)
  lo, hi = np.where(lo > hi, 0, lo), np.where(lo > hi, 0, hi)
  qmin, qmax = spec.qmin, spec.qmax
  if spec.symmetric:
    amax = np.maximum(np.abs(lo), np.abs(hi)) if spec.signed else np.maximum(hi, 0)
    s = np.maximum(amax / qmax, EPS)
    return s, np.zeros_like(s)
  lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
  s = np.maximum((hi - lo) / (qmax - qmin), EPS)
  return s, np.clip(qmin - np.round(lo / s), qmin, qmax)


def np_quantize(x, spec, scale, zp, group_axis=0):
  """Integers (x's shape) in float64 given scale / zero point on the view."""
  x = np.asarray(x, np.float64)
  xv, _ = np_view(x, spec, group_axis)
  with np.errstate(invalid="ignore"):
    q = np.clip(np.round(xv / scale) + zp, spec.qmin, spec.qmax)
  q = np.where(np.isnan(xv), zp, q)
  return q.reshape(x.shape), xv / scale


def check_against_numpy(x, spec, group_axis=0):
  # eager on purpose: op-by-op executables are cached across specs of the same shape,
  # whereas a jitted function recompiles for every (static) spec.
  q = quantize(jnp.asarray(x), spec, group_axis=group_axis)
  ints, deq_out = q.int_values(), dequantize(q)
  s_ref, z_ref = np_qparams(x, spec, group_axis)
  np.testing.assert_allclose(np.asarray(q.scale), s_ref, rtol=2e-6)
  np.testing.assert_array_equal(np.asarray(q.zero_point), z_ref)
  # integers from the library's (float32) scale, in float64; ties within float error of
  # x/s = k + 1/2 may go either way.
  q_ref, v = np_quantize(x, spec, np.asarray(q.scale, np.float64), z_ref, group_axis)
  ints = np.asarray(ints).astype(np.float64)
  assert ints.shape == x.shape
  frac = np.abs(np.abs(v - np.floor(v)) - 0.5).reshape(x.shape)
  np.testing.assert_array_equal(ints[frac > 1e-4], q_ref[frac > 1e-4])
  assert np.all(np.abs(ints - q_ref) <= 1)
  xv, _ = np_view(ints, spec, group_axis)
  deq = ((xv - z_ref) * np.asarray(q.scale, np.float64)).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(deq_out), deq, rtol=1e-6, atol=1e-30)
  return q


GRANULARITIES = [
    # (shape, spec kwargs, group_axis); one shape for most, so eager ops are reused
    ((6, 4, 10), dict(granularity="tensor"), 0),
    ((6, 4, 10), dict(granularity="channel", axis=0), 0),
    ((6, 4, 10), dict(granularity="channel", axis=1), 0),
    ((6, 4, 10), dict(granularity="channel", axis=-1), 0),
    ((6, 4, 10), dict(granularity="group", group_size=3, axis=-1), 0),
    ((6, 4, 10), dict(granularity="group", group_size=2, axis=0), 1),
    ((6, 4, 10), dict(granularity="group", group_size=5, axis=-1), 2),  # axis == grouped
    ((12,), dict(granularity="group", group_size=4), 0),
]
SIGN_SYM_BITS = [(True, True, 8), (True, False, 3), (False, True, 4), (False, False, 2)]


@pytest.mark.parametrize("shape,kw,group_axis", GRANULARITIES)
def test_matches_numpy_all_granularities(shape, kw, group_axis):
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3
  for signed, symmetric, bits in SIGN_SYM_BITS:
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric, **kw)
    check_against_numpy(x + (0.0 if signed else 0.5), spec, group_axis)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed,symmetric", [(True, True), (True, False), (False, True),
                                              (False, False)])
def test_all_bit_widths(bits, signed, symmetric):
  if bits == 1 and signed and symmetric:
    with pytest.raises(ValueError, match="bits"):
      QuantSpec(bits=1, signed=True, symmetric=True)
    return
  spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric, granularity="channel")
  x = np.random.default_rng(bits).standard_normal((5, 13)).astype(np.float32)
  q = check_against_numpy(x, spec)
  ints = np.asarray(q.int_values())
  assert ints.min() >= spec.qmin and ints.max() <= spec.qmax
  # storage: packed uint8 for 1/2/4 bits, a byte each otherwise
  if bits in (1, 2, 4):
    assert q.values.dtype == jnp.uint8
    assert q.values.shape == (5, -(-13 * bits // 8))
  else:
    assert q.values.dtype == (jnp.int8 if signed else jnp.uint8)
    assert q.values.shape == (5, 13)


def test_one_bit_unsigned_is_binary():
  x = jnp.array([0.0, 0.2, 0.7, 1.0])
  q = quantize(x, QuantSpec(bits=1, signed=False, granularity="tensor"))
  np.testing.assert_array_equal(q.int_values(), [0, 0, 1, 1])
  np.testing.assert_allclose(dequantize(q), [0.0, 0.0, 1.0, 1.0])


# ------------------------------------------------------------------ packing


def np_pack(q, bits):
  """Reference packing of the last axis, little end first."""
  per = 8 // bits
  u = np.asarray(q).astype(np.int64) & (2**bits - 1)
  n = u.shape[-1]
  u = np.concatenate([u, np.zeros(u.shape[:-1] + (-n % per,), np.int64)], -1)
  u = u.reshape(u.shape[:-1] + (-1, per))
  return (u << (np.arange(per) * bits)).sum(-1).astype(np.uint8)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [1, 13])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_round_trip(bits, n, signed):
  rng = np.random.default_rng(n * bits)
  lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
  q = rng.integers(lo, hi, size=(3, n)).astype(np.int8 if signed else np.uint8)
  packed = pack_bits(jnp.asarray(q), bits)
  assert packed.dtype == jnp.uint8 and packed.shape == (3, -(-n * bits // 8))
  np.testing.assert_array_equal(packed, np_pack(q, bits))
  out = unpack_bits(packed, bits, n, signed=signed)
  assert out.dtype == (jnp.int8 if signed else jnp.uint8)
  np.testing.assert_array_equal(out, q)
  # along axis 0
  packed0 = pack_bits(jnp.asarray(q.T), bits, axis=0)
  np.testing.assert_array_equal(packed0, np_pack(q, bits).T)
  np.testing.assert_array_equal(unpack_bits(packed0, bits, n, axis=0, signed=signed), q.T)


def test_pack_layout_little_end_first():
  packed = pack_bits(jnp.array([1, 2, 3], jnp.uint8), 2)
  assert int(packed[0]) == 1 | 2 << 2 | 3 << 4
  packed = pack_bits(jnp.array([-1, 1], jnp.int8), 4)  # two's complement nibbles
  assert int(packed[0]) == 0xF | 0x1 << 4


def test_pack_bad_args():
  with pytest.raises(ValueError, match="bits"):
    pack_bits(jnp.zeros(4, jnp.int8), 3)
  with pytest.raises(TypeError, match="integer"):
    pack_bits(jnp.zeros(4), 4)
  with pytest.raises(ValueError, match="n=9"):
    unpack_bits(jnp.zeros(4, jnp.uint8), 4, 9)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("shape", [(2, 3, 9), ()])
def test_packed_quantize_odd_shapes(bits, shape):
  spec = QuantSpec(bits=bits, signed=False, granularity="tensor")
  x = np.random.default_rng(1).uniform(0, 1, shape).astype(np.float32)
  check_against_numpy(x, spec)


# ------------------------------------------------------------------ nbytes


def test_nbytes_exact():
  # shapes only: eval_shape gives the same QArray structure without computing it
  x = jax.ShapeDtypeStruct((1000, 1000), jnp.float32)
  q = jax.eval_shape(lambda a: quantize(a, QuantSpec(bits=4)), x)  # per channel, axis -1
  assert q.values.shape == (1000, 500) and q.values.dtype == jnp.uint8
  assert q.values.size == 500_000
  assert q.scale.shape == (1, 1000) and q.zero_point.shape == (1, 1000)
  assert q.nbytes == 500_000 + 1000 * 4 + 1000 * 1
  q8 = jax.eval_shape(lambda a: quantize(a, QuantSpec(bits=8, granularity="tensor")), x)
  assert q8.nbytes == 1_000_000 + 4 + 1
  q3 = quantize(jnp.ones((10, 7)), QuantSpec(bits=3, granularity="tensor"))
  assert q3.nbytes == 70 + 5
  q1 = quantize(jnp.ones((10, 7)), QuantSpec(bits=1, signed=False, granularity="tensor"))
  assert q1.nbytes == 10 * 1 + 5
  qg = quantize(jnp.ones((64, 10)), QuantSpec(bits=4, granularity="group", group_size=32))
  assert qg.scale.shape == (2, 1, 10) and qg.nbytes == 64 * 5 + 20 * 5


def test_repr_and_properties():
  q = quantize(jnp.ones((4, 6), jnp.bfloat16), QuantSpec(bits=4))
  assert q.shape == (4, 6) and q.ndim == 2 and q.size == 24 and q.dtype == jnp.bfloat16
  assert q.packed and q.bits == 4
  r = repr(q)
  assert "QArray" in r and "bits=4" in r and "(4, 6)" in r and "bfloat16" in r


# ------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("value", [0.0, 3.5, -2.0])
def test_constant_tensors(symmetric, value):
  x = jnp.full((4, 5), value)
  q = quantize(x, QuantSpec(symmetric=symmetric))
  assert np.all(np.isfinite(q.scale)) and np.all(np.asarray(q.scale) > 0)
  out = np.asarray(dequantize(q))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, value, rtol=1e-6)


def test_far_outside_range_saturates():
  spec = QuantSpec(bits=8, granularity="tensor", symmetric=False)
  q = quantize_with(jnp.array([-1e30, -5.0, 0.5, 5.0, 1e30]), spec, 0.01, 3)
  np.testing.assert_array_equal(q.int_values(), [-128, -128, 53, 127, 127])
  np.testing.assert_allclose(dequantize(q), [-1.31, -1.31, 0.5, 1.24, 1.24], rtol=1e-6)


def test_nan_inf_policy():
  """Range ignores NaN/Inf; NaN is stored as the zero point (-> 0.0), Inf saturates."""
  x = jnp.array([[jnp.nan, 1.0, -2.0, jnp.inf, -jnp.inf, 0.5]])
  for symmetric in (True, False):
    spec = QuantSpec(granularity="tensor", symmetric=symmetric)
    q = quantize(x, spec)
    s_ref, z_ref = np_qparams(np.asarray(x), spec)
    np.testing.assert_allclose(q.scale, s_ref, rtol=1e-6)
    ints = np.asarray(q.int_values())[0]
    assert ints[0] == int(z_ref.ravel()[0])
    assert ints[3] == spec.qmax and ints[4] == spec.qmin
    out = np.asarray(dequantize(q))[0]
    assert out[0] == 0.0 and np.all(np.isfinite(out))
  q = quantize(jnp.full((3,), jnp.nan), QuantSpec(granularity="tensor"))
  np.testing.assert_array_equal(dequantize(q), 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes(dtype):
  x = jnp.asarray(np.random.default_rng(2).standard_normal((8, 6)), dtype)
  spec = QuantSpec(bits=8)
  q = quantize(x, spec)
  assert q.dtype == dtype
  out = dequantize(q)
  assert out.dtype == dtype and out.shape == x.shape
  ref = dequantize(quantize(x.astype(jnp.float32), spec))
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(ref.astype(dtype), np.float32))


def test_bad_inputs():
  with pytest.raises(TypeError, match="floating"):
    quantize(jnp.arange(4), QuantSpec())
  with pytest.raises(TypeError, match="QuantSpec"):
    quantize(jnp.ones(4), "int8")
  with pytest.raises(ValueError, match="scheme"):
    quantize(jnp.ones(4), QuantSpec(scheme="log2", granularity="tensor"))
  with pytest.raises(ValueError, match="group_size"):
    quantize(jnp.ones((6, 4)), QuantSpec(granularity="group", group_size=4))
  with pytest.raises(ValueError, match="scale"):
    quantize_with(jnp.ones((6, 4)), QuantSpec(), jnp.ones((6, 3)), None)
  with pytest.raises(ValueError, match="key"):
    quantize(jnp.ones(4), QuantSpec(rounding="stochastic"))


def test_quantize_with_matches_quantize():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((6, 4)), jnp.float32)
  spec = QuantSpec(symmetric=False, bits=6)
  q = quantize(x, spec)
  q2 = quantize_with(x, spec, q.scale, q.zero_point)
  np.testing.assert_array_equal(q.values, q2.values)
  # zero point rounded and clipped into [qmin, qmax]
  q3 = quantize_with(x, spec, 0.1, 40.4)
  np.testing.assert_array_equal(q3.zero_point, 31)


# ------------------------------------------------------------------ transformations


def test_jit_pytree():
  spec = QuantSpec(bits=4, symmetric=False)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((6, 10)), jnp.float32)
  q = jax.jit(quantize, static_argnums=1)(x, spec)
  assert isinstance(q, QArray) and q.shape == (6, 10)
  q_eager = quantize(x, spec)
  np.testing.assert_array_equal(q.values, q_eager.values)
  out = jax.jit(dequantize)(q)
  np.testing.assert_array_equal(out, dequantize(q_eager))
  leaves, treedef = jax.tree_util.tree_flatten(q)
  assert len(leaves) == 3
  q_round = jax.tree_util.tree_unflatten(treedef, leaves)
  assert q_round.spec == spec and q_round.shape == q.shape
  # identity through jit as input and output
  q_id = jax.jit(lambda a: a)(q)
  np.testing.assert_array_equal(q_id.values, q.values)


def test_vmap():
  spec = QuantSpec(bits=4)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 5, 8)), jnp.float32)
  qs = jax.jit(jax.vmap(lambda a: quantize(a, spec)))(x)
  assert qs.values.shape == (3, 5, 4)
  out = jax.jit(jax.vmap(dequantize))(qs)
  ref = jnp.stack([dequantize(quantize(a, spec)) for a in x])
  np.testing.assert_array_equal(out, ref)


def test_checkpoint_and_grad_of_dequantize_wrt_scale():
  spec = QuantSpec(bits=8, granularity="tensor")
  x = jnp.asarray(np.random.default_rng(6).standard_normal((4, 4)), jnp.float32)

  def f(scale):
    return jnp.sum(dequantize(quantize_with(x, spec, scale, None)))

  g = jax.grad(jax.checkpoint(f))(jnp.float32(0.05))
  # d/ds sum((q - z) * s) = sum(q - z) with q held fixed
  q = quantize_with(x, spec, 0.05, None)
  np.testing.assert_allclose(g, np.sum(np.asarray(q.int_values(), np.float64)), rtol=1e-6)


def test_stochastic_rounding_unbiased():
  spec = QuantSpec(bits=4, granularity="tensor", rounding="stochastic")
  x = jnp.linspace(-1.0, 1.0, 37)
  keys = jax.random.split(jax.random.key(0), 4000)
  outs = jax.jit(jax.vmap(lambda k: dequantize(quantize(x, spec, key=k))))(keys)
  step = float(quantize(x, spec, key=keys[0]).scale.ravel()[0])
  # each output is x_lo or x_lo + step: the std of the mean is <= step / (2 sqrt(N))
  np.testing.assert_allclose(np.mean(outs, 0), x, atol=5 * step / (2 * np.sqrt(4000)))
  assert np.all(np.abs(outs - x) < step * (1 + 1e-5))
  # nearest rounding is not the same as the mean of stochastic rounding
  near = dequantize(quantize(x, spec.replace(rounding="nearest")))
  assert np.max(np.abs(np.mean(outs, 0) - x)) < np.max(np.abs(near - x))


# ------------------------------------------------------------------ property


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    x=hnp.arrays(np.float32, (3, 5), elements=st.floats(-1e4, 1e4, width=32)),
    bits=st.sampled_from([2, 3, 8]),
    symmetric=st.booleans(),
    granularity=st.sampled_from(["tensor", "channel"]),
)
def test_roundtrip_within_half_step(x, bits, symmetric, granularity):
  spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity)
  q = quantize(jnp.asarray(x), spec)
  out = np.asarray(dequantize(q), np.float64)
  scale = np.broadcast_to(np.asarray(q.scale, np.float64), x.shape)
  err = np.abs(out - x.astype(np.float64))
  assert np.all(err <= scale / 2 * (1 + 1e-5) + 1e-6 * np.abs(x)), (err, scale)
