"""NF4 (jaxq.nf4): levels, round trip, packing, error vs int4, STE, non-finite, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import serialization

from jaxq import checkpoint
from jaxq import nf4
from jaxq import quantizer
from jaxq.layer.qat import qat_contraction
from jaxq.layer.views import dot_general_contraction
from jaxq.params import quantize_params
from jaxq.qarray import (QArray, dequantize, pack_bits, qarray_from_state, qarray_to_state,
                         quantize, unpack_bits)
from jaxq.spec import QuantSpec, Rule

# The NF4 code table as printed in the QLoRA paper's appendix and in bitsandbytes.
PUBLISHED = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def _gaussian(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _reference(w, group_size):
  """Numpy float64 reference for axis 0: nearest level (ties to the lower one)."""
  w = np.asarray(w, np.float64)
  k, n = w.shape
  wg = w.reshape(k // group_size, group_size, n)
  absmax = np.abs(wg).max(axis=1, keepdims=True)
  xn = np.where(absmax > 0, wg / np.where(absmax > 0, absmax, 1), 0)
  codes = np.argmin(np.abs(xn[..., None] - PUBLISHED), axis=-1)  # first = lower on ties
  return codes.reshape(k, n), (PUBLISHED[codes] * absmax).reshape(k, n), absmax


def test_levels_equal_published_table():
  assert abs(nf4.NF4_OFFSET - (1 - (1 / 30 + 1 / 32) / 2)) < 1e-7
  np.testing.assert_allclose(nf4.NF4_LEVELS, PUBLISHED, rtol=0, atol=2e-7)
  assert nf4.NF4_LEVELS.dtype == np.float32
  assert (nf4.NF4_LEVELS[0], nf4.NF4_LEVELS[7], nf4.NF4_LEVELS[15]) == (-1.0, 0.0, 1.0)
  assert np.all(np.diff(nf4.NF4_LEVELS) > 0) and nf4.ZERO_CODE == 7


@pytest.mark.parametrize("axis", [0, 1])
def test_levels_times_absmax_round_trip_exactly(axis):
  g, groups, n = 32, 3, 5
  rng = np.random.default_rng(0)
  codes = np.stack([rng.permutation(np.tile(np.arange(16), 2))
                    for _ in range(groups * n)], axis=1).reshape(groups, g, n)
  scales = (10.0 ** rng.uniform(-30, 30, size=(groups, 1, n))).astype(np.float32)
  w = (nf4.NF4_LEVELS[codes] * scales).reshape(groups * g, n)
  if axis == 1:
    w = w.T
  packed, absmax = nf4.nf4_quantize(w, g, axis)
  got_scales = absmax if axis == 0 else np.transpose(absmax, (1, 2, 0))
  np.testing.assert_array_equal(got_scales, scales)
  np.testing.assert_array_equal(nf4.nf4_dequantize(packed, absmax, w.shape, g, axis), w)
  np.testing.assert_array_equal(nf4.nf4_fake_quant(w, g, axis), w)


def test_matches_numpy_reference_on_random_input():
  w = np.asarray(_gaussian((96, 7)))
  packed, absmax = nf4.nf4_quantize(w, 32)
  codes = np.asarray(unpack_bits(packed, 4, 7))
  ref_codes, ref_w, ref_absmax = _reference(w, 32)
  np.testing.assert_array_equal(absmax, ref_absmax.astype(np.float32))
  np.testing.assert_array_equal(codes, ref_codes)
  np.testing.assert_allclose(nf4.nf4_dequantize(packed, absmax, w.shape, 32), ref_w,
                             rtol=1e-6, atol=0)


def test_tie_on_a_midpoint_takes_the_lower_level():
  mids = nf4.NF4_MIDPOINTS
  w = np.concatenate([mids, [1.0]]).astype(np.float32)[:, None]  # absmax 1
  packed, _ = nf4.nf4_quantize(w, 16)
  np.testing.assert_array_equal(unpack_bits(packed, 4, 1)[:15, 0], np.arange(15))


def test_packing_is_the_qarray_4bit_layout():
  w = _gaussian((16, 5), seed=1)
  packed, _ = nf4.nf4_quantize(w, 16)
  codes = np.asarray(unpack_bits(packed, 4, 5)).astype(np.uint8)
  padded = np.pad(codes, [(0, 0), (0, 1)])
  np.testing.assert_array_equal(packed, padded[:, 0::2] | (padded[:, 1::2] << 4))
  np.testing.assert_array_equal(packed, pack_bits(jnp.asarray(codes), 4, axis=-1))


def test_error_lower_than_uniform_int4_on_gaussian_group_64():
  w = _gaussian((512, 64), seed=2)
  rel = lambda w_hat: float(jnp.linalg.norm(w_hat - w) / jnp.linalg.norm(w))
  nf4_err = rel(nf4.nf4_dequantize(*nf4.nf4_quantize(w, 64), w.shape, 64))
  spec = QuantSpec(4, granularity="group", group_size=64, axis=-1)
  int4_err = rel(dequantize(quantize(w, spec)))
  assert nf4_err < 0.9 * int4_err, (nf4_err, int4_err)


@pytest.mark.parametrize("shape,g,axis", [((8, 3), 8, 0), ((12, 1), 4, 0),
                                          ((3, 12), 6, 1), ((6, 8), 2, -1)])
def test_shapes_and_odd_dims(shape, g, axis):
  w = _gaussian(shape, seed=3)
  packed, absmax = nf4.nf4_quantize(w, g, axis)
  assert packed.shape == (shape[0], (shape[1] + 1) // 2) and packed.dtype == jnp.uint8
  assert absmax.shape == nf4.absmax_shape(shape, g, axis) and absmax.dtype == jnp.float32
  w_hat = nf4.nf4_dequantize(packed, absmax, shape, g, axis)
  assert w_hat.shape == shape
  np.testing.assert_array_equal(w_hat, nf4.nf4_fake_quant(w, g, axis))
  # |w - w_hat| <= half the largest level gap times the group's absmax
  gap = float(np.max(np.diff(nf4.NF4_LEVELS))) / 2
  bound = np.max(np.abs(np.asarray(w)), axis=axis % 2, keepdims=True) * gap
  assert np.all(np.abs(np.asarray(w_hat - w)) <= bound + 1e-7)


def test_bf16_input_keeps_dtype_on_request():
  w = _gaussian((32, 6), seed=4, dtype=jnp.bfloat16)
  packed, absmax = nf4.nf4_quantize(w, 16)
  w32 = nf4.nf4_dequantize(packed, absmax, w.shape, 16)
  w16 = nf4.nf4_dequantize(packed, absmax, w.shape, 16, dtype=jnp.bfloat16)
  assert w32.dtype == jnp.float32 and w16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(w16, w32.astype(jnp.bfloat16))
  fq = nf4.nf4_fake_quant(w, 16)
  assert fq.dtype == jnp.bfloat16
  np.testing.assert_array_equal(fq, w16)
  np.testing.assert_array_equal(absmax, _reference(np.asarray(w, np.float32), 16)[2])


def test_jit_and_vmap_equal_eager():
  ws = _gaussian((3, 32, 4), seed=5)
  quant = jax.jit(nf4.nf4_quantize, static_argnums=(1, 2))
  p, a = nf4.nf4_quantize(ws[0], 16)
  pj, aj = quant(ws[0], 16, 0)
  np.testing.assert_array_equal(pj, p)
  np.testing.assert_array_equal(aj, a)
  pv, av = jax.vmap(lambda w: nf4.nf4_quantize(w, 16))(ws)
  fv = jax.jit(jax.vmap(lambda w: nf4.nf4_fake_quant(w, 16)))(ws)
  for i in range(3):
    pi, ai = nf4.nf4_quantize(ws[i], 16)
    np.testing.assert_array_equal(pv[i], pi)
    np.testing.assert_array_equal(av[i], ai)
    np.testing.assert_array_equal(fv[i], nf4.nf4_dequantize(pi, ai, (32, 4), 16))


def test_straight_through_gradient():
  w = _gaussian((32, 4), seed=6)
  c = _gaussian((32, 4), seed=7)
  grad = jax.jit(jax.grad(lambda w: jnp.sum(c * nf4.nf4_fake_quant(w, 16))))(w)
  np.testing.assert_array_equal(grad, c)
  w_bad = w.at[0, 0].set(jnp.nan)
  np.testing.assert_array_equal(
      jax.grad(lambda w: jnp.sum(c * nf4.nf4_fake_quant(w, 16)))(w_bad), c)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nonfinite_poisons_only_its_group(bad):
  w = _gaussian((32, 3), seed=8)
  w_bad = w.at[20, 1].set(bad).at[0:16, 2].set(0.0)
  packed, absmax = nf4.nf4_quantize(w_bad, 16)
  w_hat = np.asarray(nf4.nf4_dequantize(packed, absmax, w.shape, 16))
  clean = np.asarray(nf4.nf4_dequantize(*nf4.nf4_quantize(w, 16), w.shape, 16))
  assert np.isnan(absmax[1, 0, 1]) and np.all(np.isnan(w_hat[16:, 1]))
  assert np.all(np.isfinite(np.delete(w_hat[16:], 1, axis=1))) and np.all(
      np.isfinite(w_hat[:16]))
  np.testing.assert_array_equal(w_hat[:, 0], clean[:, 0])
  np.testing.assert_array_equal(w_hat[:16, 2], 0.0)  # all-zero group: absmax 0, zeros
  np.testing.assert_array_equal(nf4.nf4_fake_quant(w_bad, 16), w_hat)


def test_nbytes():
  k, n, g = 128, 64, 64
  packed, absmax = nf4.nf4_quantize(_gaussian((k, n)), g)
  assert nf4.nf4_nbytes(packed, absmax) == k * n // 2 + 4 * k * n // g
  k, n, g = 1024, 64, 64  # G = 1024 groups: 4 blocks of 256
  packed, dq = nf4.nf4_quantize(_gaussian((k, n)), g, double_quant=True)
  groups = k * n // g
  assert nf4.nf4_nbytes(packed, dq) == k * n // 2 + groups + 4 * (groups // 256) + 4


def test_double_quant_recovers_absmax_within_half_a_step():
  w = _gaussian((64 * 20, 30), seed=9).at[100, 7].set(jnp.nan)  # 600 groups: 3 blocks
  packed, absmax = nf4.nf4_quantize(w, 64)
  packed_dq, dq = nf4.nf4_quantize(w, 64, double_quant=True)
  np.testing.assert_array_equal(packed_dq, packed)
  assert dq.codes.dtype == jnp.int8 and dq.codes.shape == (600,)
  assert dq.block_scale.shape == (3,) and dq.mean.dtype == jnp.float32
  got, want = np.asarray(nf4.recover_absmax(dq)), np.asarray(absmax).reshape(-1)
  assert np.isnan(got[1 * 30 + 7]) and np.sum(np.isnan(got)) == 1
  step = np.repeat(np.asarray(dq.block_scale), 256)[:600]
  ok = ~np.isnan(want)
  assert np.all(np.abs(got - want)[ok] <= step[ok] / 2 * (1 + 1e-5) + 1e-7)
  w_hat = nf4.nf4_dequantize(packed_dq, dq, w.shape, 64)
  recovered = jnp.asarray(got).reshape(absmax.shape)
  np.testing.assert_array_equal(w_hat, nf4.nf4_dequantize(packed, recovered, w.shape, 64))


def test_bad_input_names_the_field():
  w = _gaussian((48, 4))
  with pytest.raises(ValueError, match="group_size=32 must divide"):
    nf4.nf4_quantize(w, 32)
  with pytest.raises(ValueError, match="group_size must be a positive int"):
    nf4.nf4_quantize(w, 0)
  with pytest.raises(ValueError, match="w must be a 2-D"):
    nf4.nf4_quantize(_gaussian((2, 16, 4)), 16)
  with pytest.raises(ValueError, match="rank >= 1"):
    nf4.nf4_fake_quant(jnp.float32(1.0), 16)
  with pytest.raises(ValueError, match="axis must be an axis"):
    nf4.nf4_codes(_gaussian((16, 4)), 16, axis=2)
  with pytest.raises(ValueError, match="axis must be"):
    nf4.nf4_quantize(w, 16, axis=2)
  with pytest.raises(ValueError, match="dtype int32"):
    nf4.nf4_quantize(jnp.ones((16, 4), jnp.int32), 16)
  packed, absmax = nf4.nf4_quantize(w, 16)
  with pytest.raises(ValueError, match="absmax must have shape"):
    nf4.nf4_dequantize(packed, absmax[:2], w.shape, 16)
  with pytest.raises(ValueError, match="packed must be uint8"):
    nf4.nf4_dequantize(packed[:, :1], absmax, w.shape, 16)
  with pytest.raises(ValueError, match="shape must be a 2-D"):
    nf4.nf4_dequantize(packed, absmax, (48, 4, 1), 16)
  _, dq = nf4.nf4_quantize(w, 16, double_quant=True)
  with pytest.raises(ValueError, match="double-quantized groups"):
    nf4.nf4_dequantize(packed, dq, w.shape, 8)
  with pytest.raises(ValueError, match=r"QuantSpec\.bits must be 4"):
    nf4.check_nf4_fields(8, "group", 64)
  with pytest.raises(ValueError, match=r"QuantSpec\.granularity must be 'group'"):
    nf4.check_nf4_fields(4, "channel", None)
  with pytest.raises(ValueError, match=r"QuantSpec\.group_size must be a positive int"):
    nf4.check_nf4_fields(4, "group", None)
  with pytest.raises(ValueError, match=r"QuantSpec\.symmetric must be True"):
    nf4.check_nf4_fields(4, "group", 64, symmetric=False)
  with pytest.raises(ValueError, match=r"layer\.signed must be True"):
    nf4.check_nf4_fields(4, "group", 64, signed=False, owner="layer")
  nf4.check_nf4_fields(4, "group", 64)


# --------------------------------------------------------------------------------------
# QuantSpec(scheme="nf4"): QArray storage, serialization, fake quant, params, QAT
# --------------------------------------------------------------------------------------

NF4_SPEC = QuantSpec(4, scheme="nf4", granularity="group", group_size=16)


def test_qarray_holds_packed_codes_and_float32_absmax():
  w = _gaussian((64, 6), seed=10)
  q = quantize(w, NF4_SPEC)
  packed, absmax = nf4.nf4_quantize(w, 16)
  np.testing.assert_array_equal(q.values, packed)
  np.testing.assert_array_equal(q.scale, absmax)
  np.testing.assert_array_equal(q.int_values(), unpack_bits(packed, 4, 6))
  assert q.int_values().dtype == jnp.uint8 and int(q.int_values().max()) <= 15
  np.testing.assert_array_equal(dequantize(q), nf4.nf4_dequantize(packed, absmax, w.shape, 16))
  assert q.nbytes == 64 * 6 // 2 + 4 * (64 // 16) * 6 + 1  # codes + absmax + int8 zero
  k, n = 4096, 64
  big = quantize(jnp.zeros((k, n)), NF4_SPEC.replace(group_size=64))
  assert big.nbytes == k * n // 2 + 4 * k * n // 64 + 1


@pytest.mark.parametrize("group_axis", [0, 1, 2])
def test_qarray_round_trips_levels_times_absmax_exactly(group_axis):
  rng = np.random.default_rng(11)
  shape = [2, 3, 4]
  shape[group_axis] = 32
  codes = rng.integers(0, 16, size=shape)
  codes = np.moveaxis(codes, group_axis, 0)
  codes[0], codes[16] = 15, 0  # every group reaches +-absmax
  codes = np.moveaxis(codes, 0, group_axis)
  stat = list(shape)
  stat[group_axis:group_axis + 1] = [2, 1]
  absmax = (10.0 ** rng.uniform(-20, 20, size=stat)).astype(np.float32)
  view = list(shape)
  view[group_axis:group_axis + 1] = [2, 16]
  w = (nf4.NF4_LEVELS[codes].reshape(view) * absmax).reshape(shape)
  q = quantize(jnp.asarray(w), NF4_SPEC, group_axis=group_axis)
  np.testing.assert_array_equal(q.scale, absmax)
  np.testing.assert_array_equal(q.int_values(), codes)
  np.testing.assert_array_equal(dequantize(q), w)
  fq = quantizer.fake_quantize(jnp.asarray(w), NF4_SPEC, group_axis=group_axis)
  np.testing.assert_array_equal(fq, w)


@pytest.mark.parametrize("double_quant", [False, True])
def test_qarray_serialization_and_checkpoint_round_trip(tmp_path, double_quant):
  w = _gaussian((512, 10), seed=12)  # 320 groups: two double-quant blocks
  q = quantize(w, NF4_SPEC, double_quant=double_quant)
  assert isinstance(q.scale, nf4.DoubleQuantAbsmax) == double_quant
  state = {"params": {"dense": {"kernel": q, "bias": jnp.ones(10)}}}
  blob = serialization.msgpack_serialize(serialization.to_state_dict(state))
  back = serialization.from_state_dict(state, serialization.msgpack_restore(blob))
  checkpoint.save(tmp_path / "ckpt", state)
  for restored in (back, checkpoint.restore(tmp_path / "ckpt"),
                   checkpoint.restore(tmp_path / "ckpt", state)):
    r = restored["params"]["dense"]["kernel"]
    assert isinstance(r, QArray) and r.spec == NF4_SPEC and r.nbytes == q.nbytes
    for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(q)):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(dequantize(r), dequantize(q))
  if double_quant:
    np.testing.assert_array_equal(
        dequantize(q), nf4.nf4_dequantize(q.values, q.scale, w.shape, 16))
    bad = qarray_to_state(q)
    bad["scale"] = {"codes": bad["scale"]["codes"][:5], "block_scale": bad["scale"][
        "block_scale"], "mean": bad["scale"]["mean"]}
    with pytest.raises(ValueError, match="double-quantized scale codes must be int8"):
      qarray_from_state(bad)


def test_spec_fake_quant_is_nf4_with_straight_through_gradient():
  w = _gaussian((2, 32, 5), seed=13)
  c = _gaussian((2, 32, 5), seed=14)
  fq = jax.jit(lambda w: quantizer.fake_quantize(w, NF4_SPEC, group_axis=1))
  np.testing.assert_array_equal(fq(w), jax.vmap(lambda v: nf4.nf4_fake_quant(v, 16))(w))
  grad = jax.grad(lambda w: jnp.sum(c * quantizer.fake_quantize(w, NF4_SPEC, group_axis=1)))
  np.testing.assert_array_equal(grad(w), c)
  with pytest.raises(ValueError, match="do not pass scale"):
    quantizer.fake_quantize(w, NF4_SPEC, scale=jnp.ones(()))
  with pytest.raises(ValueError, match="scheme='nf4' has no"):
    quantizer.compute_qparams(w, NF4_SPEC)
  with pytest.raises(ValueError, match="double_quant=True applies to scheme='nf4'"):
    quantize(w, QuantSpec(4), double_quant=True)


def test_quantize_params_and_qat_use_the_kernel_view():
  params = {"dense": {"kernel": _gaussian((32, 6), seed=15), "bias": jnp.zeros(6)},
            # DenseGeneral over (2, 16) inputs: groups along the inner input axis
            "general": {"kernel": _gaussian((2, 16, 3, 4), seed=16),
                        "bias": jnp.zeros((3, 4))}}
  out = quantize_params(params, Rule(weight=NF4_SPEC))
  np.testing.assert_array_equal(out["dense"]["kernel"],
                                nf4.nf4_fake_quant(params["dense"]["kernel"], 16))
  kg = params["general"]["kernel"]
  np.testing.assert_array_equal(
      out["general"]["kernel"], nf4.nf4_fake_quant(kg.reshape(32, 12), 16).reshape(kg.shape))
  np.testing.assert_array_equal(out["general"]["bias"], params["general"]["bias"])
  grads = jax.grad(lambda p: jnp.sum(quantize_params(p, Rule(weight=NF4_SPEC))["dense"][
      "kernel"] ** 2))(params)
  np.testing.assert_array_equal(grads["dense"]["kernel"], 2 * out["dense"]["kernel"])
  # QAT of one contraction: the kernel view fake-quantized with NF4
  x = _gaussian((3, 32), seed=17)
  dn = (((2, 3), (0, 1)), ((), ()))
  xg = x.reshape(3, 2, 16)[:, None]
  op = dot_general_contraction(xg, kg, dn, lambda l, r: jax.lax.dot_general(l, r, dn), "g")
  got = qat_contraction(op, "g", NF4_SPEC, None, lambda s, v: {}, lambda s, v: {},
                        lambda: None, "off")
  np.testing.assert_array_equal(got, jax.lax.dot_general(xg, out["general"]["kernel"], dn))
  with pytest.raises(ValueError, match="layer 'g': weight group_size=32 does not divide"):
    qat_contraction(op, "g", NF4_SPEC.replace(group_size=32), None, lambda s, v: {},
                    lambda s, v: {}, lambda: None, "off")
