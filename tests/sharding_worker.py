"""Runs every sharding scenario on 8 simulated CPU devices and prints one JSON object.

Started by ``tests/test_sharding.py`` in a subprocess (the device count is fixed when JAX
starts, so it cannot share a process with the rest of the suite). Each training scenario
runs the SAME step function twice: once on one device, once with its state and batches
placed on a 4x2 ("data", "model") mesh (batch split over "data", kernels split over
"model", quantizer scales following their weights), and reports both loss curves and the
largest parameter / statistic differences. The test asserts on them.

Run by hand: ``python tests/sharding_worker.py [scenario ...]``.
"""

from __future__ import annotations

import os
import sys

# 8 simulated CPU devices; LLVM optimisation off: the programs are tiny and compiling
# them dominates the run (-1/3 of the time), and both sides of every comparison use it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import flax.linen as nn  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jaxq  # noqa: E402
from jaxq import kernels, sharding  # noqa: E402
from jaxq.flax import ptq  # noqa: E402
from jaxq.qarray import QArray, quantize  # noqa: E402
from jaxq.spec import QuantSpec, Rule  # noqa: E402
from _models import MlpBlock, TinyViT, cross_entropy, load_digits_split  # noqa: E402

STEPS = 3
BATCH = 32
A8 = QuantSpec(granularity="tensor")
# Plain SGD: parameter differences are gradient differences (Adam would turn the float
# noise of exactly-zero gradients, e.g. attention key biases, into whole steps).
TX = optax.sgd(0.1)
# Parameters agree when |a - b| <= PARAM_ATOL + PARAM_RTOL * max|a| (per leaf): "param_diff"
# is that ratio (<= 1 passes).
PARAM_ATOL, PARAM_RTOL = 1e-5, 1e-4
MESH = None


def _data():
  x, y, _, _ = load_digits_split()
  xs = np.asarray(x[: STEPS * BATCH]).reshape(STEPS, BATCH, 8, 8, 1)
  ys = np.asarray(y[: STEPS * BATCH]).reshape(STEPS, BATCH)
  return xs, ys


class Block(nn.Module):
  """Pre-LN residual MLP block (two Dense layers)."""

  @nn.compact
  def __call__(self, x):
    return x + MlpBlock(32, 16)(nn.LayerNorm()(x))


class TinyMixer(nn.Module):
  """Conv patch embedding (Conv kernel quantized too), one block, mean pool, head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(16, (2, 2), strides=(2, 2), padding="VALID", name="embed")(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    x = Block(name="block_0")(x)
    return nn.Dense(10, name="head")(nn.LayerNorm(name="final_norm")(x).mean(axis=1))


def _model(vit: bool = False):
  return TinyViT(dim=32, depth=1, heads=2, mlp=32) if vit else TinyMixer()


def _max_diff(a, b, atol=0.0, rtol=1.0):
  """max over elements of ``|a - b| / (atol + rtol * max|a_leaf|)``, and its leaf.

  Defaults: the difference relative to the largest value of the leaf. With ``atol``
  (as ``np.allclose``), leaves whose values are all ~0 (e.g. attention key biases, whose
  gradient is exactly zero in exact arithmetic) are not judged by float noise alone.
  """
  worst, where = 0.0, ""
  fa = jax.tree_util.tree_flatten_with_path(a)[0]
  fb = jax.tree_util.tree_leaves(b)
  for (path, x), y in zip(fa, fb):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if not x.size:
      continue
    d = float(np.max(np.abs(x - y)) / max(atol + rtol * np.max(np.abs(x)), 1e-12))
    if d > worst:
      worst, where = d, jax.tree_util.keystr(path)
  return worst, where


def _run(step, state, shardings, xs, ys, key):
  """Runs ``STEPS`` steps of ``jit(step)``; with ``shardings`` (a pytree of
  NamedSharding for state) on the mesh, else on one device."""
  if shardings is None:
    dev = jax.devices()[0]
    state = jax.device_put(state, dev)
    fn = jax.jit(step)
    put = lambda a: jax.device_put(a, dev)  # noqa: E731
  else:
    state = jax.device_put(state, shardings)
    fn = jax.jit(step, out_shardings=(shardings, None))
    put = lambda a: jax.device_put(a, sharding.batch_sharding(MESH, a.ndim))  # noqa: E731
  losses = []
  for i in range(STEPS):
    state, loss = fn(state, put(xs[i]), put(ys[i]), jax.random.fold_in(key, i))
    losses.append(float(loss))
  return state, losses


def _compare(name, step, state, shardings, xs, ys, extra=None):
  key = jax.random.key(42)
  t0 = time.time()
  s1, l1 = _run(step, state, None, xs, ys, key)
  s8, l8 = _run(step, state, shardings, xs, ys, key)
  rel = [abs(a - b) / max(abs(a), 1e-6) for a, b in zip(l1, l8)]
  pd, pwhere = _max_diff(s1["params"], s8["params"], atol=PARAM_ATOL, rtol=PARAM_RTOL)
  out = {"losses_1": l1, "losses_8": l8, "loss_rel": max(rel),
         "param_abs": _max_diff(s1["params"], s8["params"], atol=1.0, rtol=0.0)[0],
         "param_diff": pd, "param_worst": pwhere, "seconds": round(time.time() - t0, 2)}
  for k in ("qstate", "quant_stats"):
    if k in s1:
      out[k + "_diff"] = _max_diff(s1[k], s8[k])[0]
  # Are the trained kernels still laid out over the mesh?
  specs = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(s8["params"])[0]:
    ks = jax.tree_util.keystr(path)
    if ks.endswith("['head']['kernel']") or "Dense_0']['kernel" in ks:
      specs[ks] = str(leaf.sharding.spec)
  out["kernel_specs"] = specs
  if extra:
    out.update(extra(s1, s8))
  return out


def _opt_state_shardings(tx, params, params_sh):
  return sharding.opt_state_shardings(tx, params, params_sh)


# --------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------


PARAM_RULES = (
    # LSQ per-group step (group 16 along the input axis): scale f32[2, 1, 64].
    Rule(path=r".*Dense_0", weight=QuantSpec(estimator="lsq", granularity="group",
                                              group_size=16)),
    # stochastic rounding of the weights, keys from the step key.
    Rule(path="head", weight=QuantSpec(rounding="stochastic")),
    Rule(path=".*", weight=QuantSpec()),
)


def scenario_params_w8a8(xs, ys):
  """quantize_params (int8 STE + LSQ per-group + stochastic) weights, int8 per-tensor
  activations through quantize_model (act-only rule), adam; 4x2 mesh vs one device."""
  model = _model()
  amodel = jaxq.quantize_model(model, Rule(path=".*", act=A8), int8="off")
  params = model.init(jax.random.key(0), xs[0][:2])["params"]
  qstate = jaxq.init_qstate(params, PARAM_RULES)
  tx = TX

  def step(st, xb, yb, key):
    def loss_fn(p, qs):
      qp = jaxq.quantize_params(p, PARAM_RULES, qs, key=key)
      return cross_entropy(amodel.apply({"params": qp}, xb), yb)
    loss, (gp, gq) = jax.value_and_grad(loss_fn, argnums=(0, 1))(st["params"], st["qstate"])
    upd, opt = tx.update((gp, gq), st["opt"], (st["params"], st["qstate"]))
    p, qs = optax.apply_updates((st["params"], st["qstate"]), upd)
    return {"params": p, "qstate": qs, "opt": opt}, loss

  psh = sharding.param_shardings(params, MESH)
  qsh = sharding.qstate_shardings(qstate, params, psh, PARAM_RULES)
  osh = _opt_state_shardings(tx, (params, qstate), (psh, qsh))
  state = {"params": params, "qstate": qstate, "opt": tx.init((params, qstate))}
  sh = {"params": psh, "qstate": qsh, "opt": osh}
  out = _compare("params_w8a8", step, state, sh, xs, ys)
  out["qstate_spec"] = str(qsh["block_0"]["MlpBlock_0"]["Dense_0"]["kernel"]["scale"].spec)
  return out


MODEL_RULES = (
    # activation observer (EMA) in quant_stats: must see the GLOBAL batch range.
    Rule(path="head", weight=QuantSpec(), act=QuantSpec(granularity="tensor",
                                                        calibration="ema")),
    # learned steps (LSQ) for weight and activation, in params.
    Rule(path=r".*Dense_0", weight=QuantSpec(estimator="lsq"),
         act=QuantSpec(granularity="tensor", estimator="lsq")),
    # W8A8 on int8 operands (int8 forward path) everywhere else.
    Rule(path=".*", weight=QuantSpec(), act=A8),
)


def _model_scenario(xs, ys, rules, int8, streams, vit=False):
  model = _model(vit)
  qmodel = jaxq.quantize_model(model, rules, int8=int8)
  variables = qmodel.init({"params": jax.random.key(0), "jaxq": jax.random.key(1)},
                          xs[0][:2])
  variables = jax.tree_util.tree_map(lambda a: a, dict(variables))
  params = variables["params"]
  others = {k: v for k, v in variables.items() if k != "params"}
  mutable = list(others)
  tx = TX

  def step(st, xb, yb, key):
    rngs = {s: jax.random.fold_in(key, i) for i, s in enumerate(streams)}

    def loss_fn(p):
      if mutable:
        logits, new = qmodel.apply({"params": p, **st["others"]}, xb, rngs=rngs,
                                   mutable=mutable)
      else:
        logits, new = qmodel.apply({"params": p}, xb, rngs=rngs), {}
      return cross_entropy(logits, yb), dict(new)
    (loss, new), g = jax.value_and_grad(loss_fn, has_aux=True)(st["params"])
    upd, opt = tx.update(g, st["opt"], st["params"])
    return {"params": optax.apply_updates(st["params"], upd), "opt": opt,
            "others": new}, loss

  psh = sharding.param_shardings(params, MESH)
  osh = _opt_state_shardings(tx, params, psh)
  rep = NamedSharding(MESH, P())
  state = {"params": params, "opt": tx.init(params), "others": others}
  sh = {"params": psh, "opt": osh,
        "others": jax.tree_util.tree_map(lambda _: rep, others)}

  def extra(s1, s8):
    if "quant_stats" not in s1["others"]:
      return {}
    return {"quant_stats_diff": _max_diff(s1["others"]["quant_stats"],
                                          s8["others"]["quant_stats"])[0]}
  return _compare("model", step, state, sh, xs, ys, extra)


def scenario_model_w8a8(xs, ys):
  """quantize_model on the ViT (attention DenseGeneral too): W8A8 with int8 matmuls
  forward AND backward (``int8="all"``: gradients rounded stochastically with keys from
  the "jaxq" stream), LSQ weight+act steps, an EMA observer."""
  return _model_scenario(xs, ys, MODEL_RULES, "all", ("jaxq",), vit=True)


def scenario_model_act4(xs, ys):
  """quantize_model: every encoder block under compressed_vjp (4-bit, stochastic), int8
  weights elsewhere."""
  rules = (Rule(path=r"block_\d+", act_compress=4), Rule(path=".*", weight=QuantSpec()))
  return _model_scenario(xs, ys, rules, "forward", ("jaxq",))


def scenario_params_act4(xs, ys):
  """compressed_vjp (4-bit, stochastic, group 64) around the whole model, weights
  quantized by quantize_params (default int8 rules)."""
  model = _model()
  params = model.init(jax.random.key(0), xs[0][:2])["params"]
  tx = TX

  def fwd(p, x):
    return model.apply({"params": jaxq.quantize_params(p)}, x)
  cfwd = jaxq.act.compressed_vjp(fwd, bits=4, group_size=64, compress_args=(1,))

  def step(st, xb, yb, key):
    loss, g = jax.value_and_grad(lambda p: cross_entropy(cfwd(p, xb, key=key), yb))(
        st["params"])
    upd, opt = tx.update(g, st["opt"], st["params"])
    return {"params": optax.apply_updates(st["params"], upd), "opt": opt}, loss

  psh = sharding.param_shardings(params, MESH)
  state = {"params": params, "opt": tx.init(params)}
  sh = {"params": psh, "opt": _opt_state_shardings(tx, params, psh)}
  return _compare("params_act4", step, state, sh, xs, ys)


_GATHER = re.compile(r"=\s*(\w+)\[([0-9,]*)\][^=]*?\ball-gather(?:-start)?\(")


def _gathers(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
  """(element type, shape) of every all-gather result in compiled HLO text."""
  out = []
  for line in hlo.splitlines():
    if "all-gather" not in line:
      continue
    m = _GATHER.search(line)
    if m:
      out.append((m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)))
  return out


def _lay_out(sv, spec_fn):
  """Places serving variables: QArrays with shard_qarray, the rest with device_put."""
  def one(x):
    sh = NamedSharding(MESH, spec_fn(np.shape(x)))
    return sharding.shard_qarray(x, sh) if isinstance(x, QArray) else jax.device_put(x, sh)
  return jax.tree_util.tree_map(one, sv, is_leaf=lambda x: isinstance(x, QArray))


def scenario_ptq(xs, ys):
  """calibrate (batches split over "data") + convert + int8 serving with QArray kernels
  laid out over the mesh: statistics and outputs equal to one device. Then the same
  serving model with FSDP-style kernels (split over "data" along K): its compiled HLO
  all-gathers int8 kernels, never float ones."""
  model = _model()
  rules = (Rule(path=".*", weight=QuantSpec(), act=A8),)
  qmodel = jaxq.quantize_model(model, rules)
  variables = {"params": model.init(jax.random.key(0), xs[0][:2])["params"]}
  bsh = sharding.batch_sharding(MESH, xs.ndim - 1)
  batches = [xs[0], xs[1]]
  cal1 = ptq.calibrate(qmodel, variables, batches)
  psh = sharding.param_shardings(variables["params"], MESH)
  var8 = {"params": jax.device_put(variables["params"], psh)}
  cal8 = ptq.calibrate(qmodel, var8, [jax.device_put(b, bsh) for b in batches])
  stats_diff = _max_diff(cal1["quant_stats"], cal8["quant_stats"])[0]
  serve, sv1 = ptq.convert(qmodel, cal1)
  sv8 = _lay_out(sv1, lambda shape: sharding.param_spec(shape, MESH))
  apply = jax.jit(serve.apply)
  xb = jax.device_put(xs[0], bsh)
  y1 = np.asarray(apply(sv1, xs[0]))
  y8 = np.asarray(apply(sv8, xb))
  head = sv8["params"]["head"]["kernel"]
  out = {"stats_diff": stats_diff,
         "out_diff": float(np.max(np.abs(y1 - y8)) / np.max(np.abs(y1))),
         "head_values_spec": str(head.values.sharding.spec),
         "head_values_dtype": str(head.values.dtype),
         "head_scale_spec": str(head.scale.sharding.spec)}

  def fsdp(shape):
    ok = len(shape) >= 2 and shape[0] % MESH.shape[sharding.DATA] == 0
    return P(sharding.DATA) if ok else P()
  svf = _lay_out(sv1, fsdp)
  out["fsdp_gathers"] = _gathers(apply.lower(svf, xb).compile().as_text())
  out["fsdp_out_diff"] = float(np.max(np.abs(y1 - np.asarray(apply(svf, xb))))
                               / np.max(np.abs(y1)))
  out["kernel_shapes"] = [list(q.shape) for q in jax.tree_util.tree_leaves(
      sv1, is_leaf=lambda x: isinstance(x, QArray)) if isinstance(q, QArray)]
  return out


def scenario_hlo_int8_gather(xs, ys):
  """One FSDP-style serving matmul (weight split over "data" along K, so every device
  must gather the whole weight): int8_matmul on the QArray values gathers s8; the
  control, dequantize-then-matmul, gathers the f32 weight."""
  del xs, ys
  k, n, m = 256, 128, 64
  w = jax.random.normal(jax.random.key(0), (k, n))
  qs = sharding.shard_qarray(quantize(w, QuantSpec()), NamedSharding(MESH, P(sharding.DATA)))
  x = jax.device_put(jax.random.normal(jax.random.key(1), (m, k)),
                     NamedSharding(MESH, P(sharding.DATA)))
  sx = jnp.float32(4.0 / 127)

  def serve(x, q):
    xq = jnp.clip(jnp.round(x / sx), -127, 127).astype(jnp.int8)
    return kernels.int8_matmul(xq, q.values, jnp.full((m,), sx), q.scale.reshape(-1))

  def naive(x, q):
    return x @ jaxq.dequantize(q)

  return {name: _gathers(jax.jit(fn).lower(x, qs).compile().as_text())
          for name, fn in (("serve", serve), ("naive", naive))}


def scenario_kernels_shard_map(xs, ys):
  """shard_map helpers: int8_matmul with a sharded contraction (int32 psum) equals the
  unsharded kernel bit for bit (Pallas interpret mode per shard and XLA); per-shard
  stochastic packing is reproducible and independent across shards."""
  ka, kb = jax.random.split(jax.random.key(3))
  a = jax.random.randint(ka, (32, 64), -128, 128, jnp.int32).astype(jnp.int8)
  b = jax.random.randint(kb, (64, 16), -128, 128, jnp.int32).astype(jnp.int8)
  sa = jnp.linspace(0.01, 0.02, 32)
  sb = jnp.linspace(0.5, 1.0, 16)
  bias = jnp.linspace(-1, 1, 16)
  ref = np.asarray(kernels.int8_matmul(a, b, sa, sb, bias, activation="relu",
                                       backend="xla"))
  res = {}
  for backend, contract in (("xla", None), ("xla", sharding.MODEL),
                            ("interpret", sharding.MODEL)):
    cols = None if contract else sharding.MODEL
    y = sharding.int8_matmul_sharded(a, b, sa, sb, bias, mesh=MESH, rows=sharding.DATA,
                                     cols=cols, contract=contract, activation="relu",
                                     backend=backend)
    res[f"matmul_{backend}_{contract}"] = float(np.max(np.abs(np.asarray(y) - ref)))
  x = jnp.tile(jax.random.normal(jax.random.key(4), (4, 64)), (4, 1))  # 4 equal blocks
  key = jax.random.key(5)
  p1, lo1, s1 = sharding.quantize_pack_sharded(x, 2, mesh=MESH, key=key, backend="xla")
  p2, _, _ = sharding.quantize_pack_sharded(x, 2, mesh=MESH, key=key, backend="xla")
  p1 = np.asarray(p1)
  blocks = p1.reshape(4, 4, -1)
  deq = sharding.unpack_dequantize_sharded(p1, lo1, s1, 2, mesh=MESH)
  res["pack_reproducible"] = bool(np.array_equal(p1, np.asarray(p2)))
  res["pack_shards_distinct"] = bool(all(not np.array_equal(blocks[i], blocks[j])
                                         for i in range(4) for j in range(i + 1, 4)))
  res["pack_err_over_step"] = float(np.max(np.abs(np.asarray(deq) - np.asarray(x))
                                           * np.asarray(s1)[:, None]))
  return res


SCENARIOS = {
    "params_w8a8": scenario_params_w8a8,
    "model_w8a8": scenario_model_w8a8,
    "params_act4": scenario_params_act4,
    "model_act4": scenario_model_act4,
    "ptq": scenario_ptq,
    "hlo_int8_gather": scenario_hlo_int8_gather,
    "kernels_shard_map": scenario_kernels_shard_map,
}


def main(names):
  global MESH
  assert jax.device_count() == 8, jax.devices()
  MESH = sharding.make_mesh({sharding.DATA: 4, sharding.MODEL: 2})
  xs, ys = _data()
  out = {}
  for name in names or SCENARIOS:
    t0, c0 = time.time(), time.process_time()
    out[name] = SCENARIOS[name](xs, ys)
    out[name]["seconds"] = round(time.time() - t0, 2)
    out[name]["cpu_seconds"] = round(time.process_time() - c0, 2)
  print("JSON:" + json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1:])
