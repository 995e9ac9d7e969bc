"""``QuantSpec.axis`` and ``granularity="group"`` mean one thing in every context.

The grouped axis is the contraction axis (a kernel's innermost input axis, a bare array's
``group_axis``) and ``axis`` the kept channel: ``quantize``, ``quantize_params`` and a
Flax layer give the same weights for the same kernel. Where a context cannot honour an
``axis`` it raises a ValueError naming what it expects.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq

GROUP = jaxq.QuantSpec(bits=4, granularity="group", group_size=4)


@jax.jit
def _round_trip_rows(w):
  """``quantize`` of ``w``'s ``(K, N)`` view (contracted axes flattened), back in shape."""
  return jaxq.dequantize(jaxq.quantize(w.reshape(-1, w.shape[-1]), GROUP)).reshape(w.shape)


@jax.jit
def _by_params(w):
  return jaxq.quantize_params({"layer": {"kernel": w}}, jaxq.Rule(weight=GROUP))["layer"]["kernel"]


def _group_reference(w, group_axis, group_size, qmax=7):
  """float64 symmetric per-(group, output channel) fake quantization of ``w``."""
  w = np.moveaxis(np.asarray(w, np.float64), group_axis, 0)
  n = w.shape[0]
  g = w.reshape((n // group_size, group_size) + w.shape[1:])
  amax = np.abs(g).reshape(g.shape[:2] + (-1, w.shape[-1])).max(axis=(1, 2))
  scale = np.maximum(amax / qmax, np.finfo(np.float32).eps)
  scale = scale.reshape((n // group_size, 1) + (1,) * (w.ndim - 2) + (w.shape[-1],))
  out = np.clip(np.round(g / scale), -8, 7) * scale
  return np.moveaxis(out.reshape(w.shape), 0, group_axis)


def test_dense_kernel_same_in_quantize_params_layer_and_quantize():
  w = jax.random.normal(jax.random.key(0), (16, 8), jnp.float32)
  ref = _group_reference(w, 0, 4)
  by_array = _round_trip_rows(w)  # group_axis=0: the input axis
  qmodel = jaxq.quantize_model(nn.Dense(8, use_bias=False), [jaxq.Rule(weight=GROUP)])
  by_layer = jax.jit(qmodel.apply)({"params": {"kernel": w}}, jnp.eye(16))
  np.testing.assert_allclose(by_array, ref, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(_by_params(w), by_array)
  np.testing.assert_array_equal(by_layer, by_array)


def test_conv_kernel_groups_the_rows_of_its_k_by_n_view():
  w = jax.random.normal(jax.random.key(1), (3, 3, 8, 4), jnp.float32)
  by_view = _round_trip_rows(w)
  np.testing.assert_array_equal(_by_params(w), by_view)
  ref = _group_reference(w.reshape(72, 4), 0, 4).reshape(w.shape)
  np.testing.assert_allclose(by_view, ref, rtol=1e-6, atol=1e-7)
  # A bare array keeps every axis but the grouped one: one scale per (in-group, out),
  # shared by the kernel positions, which is not what a layer does.
  by_axis = jax.jit(lambda w: jaxq.dequantize(jaxq.quantize(w, GROUP, group_axis=2)))(w)
  np.testing.assert_allclose(by_axis, _group_reference(w, 2, 4), rtol=1e-6, atol=1e-7)
  assert not np.allclose(by_axis, by_view)


def test_weight_axis_must_be_an_output_axis_in_every_api():
  spec = GROUP.replace(axis=0)
  w = jnp.ones((16, 8))
  with pytest.raises(ValueError, match=r"'Dense_0'.*axis=0 is not an output axis"):
    jaxq.quantize_params({"Dense_0": {"kernel": w}}, jaxq.Rule(weight=spec))
  qmodel = jaxq.quantize_model(nn.Dense(8, use_bias=False), [jaxq.Rule(weight=spec)])
  with pytest.raises(ValueError, match=r"axis=0 is not an output axis"):
    qmodel.apply({"params": {"kernel": w}}, jnp.ones((2, 16)))


@pytest.mark.parametrize("granularity, extra", [("channel", {}), ("group", {"group_size": 4})])
def test_activation_axis_is_the_feature_axis(granularity, extra):
  act = jaxq.QuantSpec(granularity=granularity, axis=0, **extra)
  qmodel = jaxq.quantize_model(nn.Dense(8), [jaxq.Rule(act=act)])
  variables = nn.Dense(8).init(jax.random.key(0), jnp.ones((2, 16)))
  with pytest.raises(ValueError, match=rf"activation '{granularity}' spec .*axis=-1.*axis=0"):
    qmodel.apply(variables, jnp.ones((2, 16)))


def test_quantize_axis_out_of_range_names_the_field():
  with pytest.raises(ValueError, match=r"QuantSpec.axis=2 is out of range"):
    jaxq.quantize(jnp.ones((4, 8)), GROUP.replace(axis=2))
