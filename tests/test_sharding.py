"""jaxq on a device mesh (jaxq.sharding; docs/scaling.md).

The multi-device checks run ``tests/sharding_worker.py`` ONCE in a subprocess with 8
simulated CPU devices (``--xla_force_host_platform_device_count=8`` must be set before
JAX starts, and must not leak into the rest of the suite); it prints one JSON object
with every scenario's measurements, which the tests below assert on. The layout rules
themselves are unit-tested in-process on abstract meshes.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from _workers import run_json_worker
from jaxq import sharding
from jaxq.qarray import quantize
from jaxq.spec import QuantSpec, Rule

WORKER = os.path.join(os.path.dirname(__file__), "sharding_worker.py")
LOSS_RTOL = 2e-3


@pytest.fixture(scope="module")
def results():
  return run_json_worker(WORKER)


TRAINING = ["params_w8a8", "model_w8a8", "params_act4", "model_act4"]


@pytest.mark.parametrize("name", TRAINING)
def test_training_matches_one_device(results, name):
  """A few steps of QAT / compressed-activation training on a 4x2 (data, model) mesh
  give the losses and parameters of the one-device run."""
  r = results[name]
  assert len(r["losses_1"]) == len(r["losses_8"]) >= 3
  assert np.all(np.isfinite(r["losses_1"]))
  assert r["losses_1"][0] == pytest.approx(r["losses_8"][0], rel=1e-5)
  assert r["loss_rel"] < LOSS_RTOL, r
  # |a - b| <= 1e-5 + 1e-4 * max|a| per leaf (the worker's PARAM_ATOL / PARAM_RTOL).
  assert r["param_diff"] <= 1.0, r
  for spec in r["kernel_specs"].values():  # still tensor-parallel after training
    assert spec == "P(None, 'model')", r["kernel_specs"]


def test_lsq_qstate_follows_weights_and_matches(results):
  r = results["params_w8a8"]
  # LSQ per-group scale f32[2, 1, 64] of a kernel f32[32, 64] split P(None, "model").
  assert r["qstate_spec"] == "P(None, None, 'model')"
  assert r["qstate_diff"] < 1e-4


def test_observer_statistics_are_global(results):
  """EMA min/max observer fed a batch split over "data": the statistics are the global
  ones (equal to the one-device run), not per-shard."""
  assert results["model_w8a8"]["quant_stats_diff"] < 1e-6


def test_ptq_calibrate_convert_serve_sharded(results):
  r = results["ptq"]
  assert r["stats_diff"] < 1e-6
  assert r["out_diff"] < 1e-5
  assert r["head_values_dtype"] == "int8"
  assert r["head_values_spec"] == "P(None, 'model')"
  assert r["head_scale_spec"] == "P(None, 'model')"


def _gathers(entries, dtype):
  return [tuple(shape) for t, shape in entries if t == dtype]


def test_int8_serving_gathers_int8(results):
  """FSDP-style serving weights: the compiled HLO all-gathers the int8 values, not a
  float copy of the weight (the dequantize-first control does gather f32)."""
  r = results["hlo_int8_gather"]
  assert (256, 128) in _gathers(r["serve"], "s8"), r["serve"]
  assert (256, 128) not in _gathers(r["serve"], "f32"), r["serve"]
  assert (256, 128) in _gathers(r["naive"], "f32"), r["naive"]
  # The ptq serving model with FSDP-style QArray kernels: int8 gathers of the kernels,
  # no float gather of any kernel-shaped array, same outputs.
  p = results["ptq"]
  gathered = p["fsdp_gathers"]
  kernel_shapes = {tuple(s) for s in p["kernel_shapes"]}
  assert kernel_shapes & set(_gathers(gathered, "s8")), gathered
  assert not kernel_shapes & set(_gathers(gathered, "f32")), (kernel_shapes, gathered)
  assert p["fsdp_out_diff"] < 1e-5


def test_shard_map_kernels(results):
  r = results["kernels_shard_map"]
  for k, v in r.items():
    if k.startswith("matmul_"):
      assert v == 0.0, (k, v)  # int32 psum over the sharded contraction: exact
  assert r["pack_reproducible"]
  assert r["pack_shards_distinct"]
  assert r["pack_err_over_step"] <= 1.0 + 1e-5


# --------------------------------------------------------------------------------------
# Layout rules (in-process, abstract meshes)
# --------------------------------------------------------------------------------------

MESH42 = AbstractMesh((4, 2), ("data", "model"))


def test_parse_mesh():
  assert sharding.parse_mesh("data=4,model=2") == {"data": 4, "model": 2}
  assert sharding.parse_mesh(" data = 8 ") == {"data": 8}
  for bad in ("", "data", "data=0", "data=x", "data=2,data=2", "=2"):
    with pytest.raises(ValueError, match="mesh"):
      sharding.parse_mesh(bad)


def test_make_mesh():
  mesh = sharding.make_mesh("data=1")
  assert mesh.axis_names == ("data",) and mesh.shape["data"] == 1
  with pytest.raises(ValueError, match="needs 2 devices"):
    sharding.make_mesh({"data": 2}, devices=jax.devices()[:1])


def test_param_spec():
  assert sharding.param_spec((32, 64), MESH42) == P(None, "model")
  assert sharding.param_spec((2, 2, 1, 16), MESH42) == P(None, None, None, "model")
  assert sharding.param_spec((32, 9), MESH42) == P()  # 9 does not split over 2
  assert sharding.param_spec((64,), MESH42) == P()  # biases, norm scales
  assert sharding.param_spec((32, 64), AbstractMesh((8,), ("data",))) == P()


@pytest.mark.parametrize("shape,stat,ga,spec,want", [
    ((32, 64), (1, 64), None, P(None, "model"), P(None, "model")),     # per channel
    ((32, 64), (1, 1), None, P(None, "model"), P()),                   # per tensor
    ((32, 64), (1, 64), None, P("data", "model"), P(None, "model")),   # FSDP: K reduced
    ((32, 64), (2, 1, 64), 0, P(None, "model"), P(None, None, "model")),  # groups of 16
    ((32, 64), (4, 1, 64), 0, P("data", "model"), P("data", None, "model")),  # 4 groups
    ((32, 64), (2, 1, 64), 0, P("data", None), P()),   # 2 groups cannot split over 4
    ((64, 32), (64, 4, 1), 1, P("data", None), P("data")),  # embedding rows
])
def test_scale_spec(shape, stat, ga, spec, want):
  assert sharding.scale_spec(spec, shape, stat, group_axis=ga, mesh=MESH42) == want


def test_scale_spec_rejects_bad_layout():
  with pytest.raises(ValueError, match="keepdims"):
    sharding.scale_spec(P(), (32, 64), (64,))


def test_qarray_shardings_follow_weight():
  mesh = sharding.make_mesh({"data": 1, "model": 1})
  w = jnp.asarray(np.random.default_rng(0).normal(size=(32, 16)), jnp.float32)
  ws = NamedSharding(mesh, P(None, "model"))
  for spec, vspec, sspec in [
      (QuantSpec(), P(None, "model"), P(None, "model")),
      (QuantSpec(bits=4), P(None, "model"), P(None, "model")),  # packed along the last axis
      (QuantSpec(bits=4, granularity="group", group_size=8),
       P(None, "model"), P(None, None, "model")),
  ]:
    q = quantize(w, spec)
    sh = sharding.qarray_shardings(q, ws)
    assert sh.values.spec == vspec and sh.scale.spec == sspec
    assert sh.zero_point.spec == (sspec if np.ndim(q.zero_point) else P())
    placed = sharding.shard_qarray(q, ws)
    np.testing.assert_array_equal(np.asarray(placed.values), np.asarray(q.values))


def test_qstate_shardings_structure():
  mesh = sharding.make_mesh({"data": 1, "model": 1})
  params = {"Dense_0": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)},
            "Dense_1": {"kernel": jnp.ones((8, 4))}}
  rules = (Rule(path="Dense_0", weight=QuantSpec(estimator="lsq", granularity="group",
                                                 group_size=8)),
           Rule(path=".*", weight=QuantSpec(estimator="lsq", symmetric=False)))
  from jaxq.params import init_qstate  # pylint: disable=import-outside-toplevel
  qstate = init_qstate(params, rules)
  psh = sharding.param_shardings(params, mesh)
  qsh = sharding.qstate_shardings(qstate, params, psh, rules)
  assert qsh["Dense_0"]["kernel"]["scale"].spec == P(None, None, "model")
  assert set(qsh["Dense_1"]["kernel"]) == {"scale", "zero_point"}
  assert qsh["Dense_1"]["kernel"]["scale"].spec == P(None, "model")
  placed = jax.device_put(qstate, qsh)
  assert jax.tree_util.tree_structure(placed) == jax.tree_util.tree_structure(qstate)


def test_qarray_shardings_packed_split_must_hold_whole_bytes():
  w = jnp.ones((8, 6), jnp.float32)  # int4: 2 values a byte; 6 / (4 * 2) is not whole
  q = quantize(w, QuantSpec(bits=4, granularity="tensor"))
  with pytest.raises(ValueError, match="multiple of 8"):
    sharding.qarray_shardings(q, NamedSharding(MESH42, P(None, "data")))


def test_opt_state_shardings_follow_params():
  import optax  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh({"data": 1, "model": 1})
  params = {"Dense_0": {"kernel": jnp.ones((4, 6)), "bias": jnp.zeros(6)}}
  psh = sharding.param_shardings(params, mesh)
  osh = sharding.opt_state_shardings(optax.adam(1e-3), params, psh)
  assert osh[0].mu["Dense_0"]["kernel"].spec == P(None, "model")
  assert osh[0].nu["Dense_0"]["bias"].spec == P()
  assert osh[0].count.spec == P()
  state = jax.jit(optax.adam(1e-3).init, out_shardings=osh)(params)
  assert state[0].mu["Dense_0"]["kernel"].sharding.spec == P(None, "model")
