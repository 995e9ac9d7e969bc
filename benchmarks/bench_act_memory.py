"""Activation memory of a ViT-Tiny training step: float vs jaxq.act compression vs remat.

ViT-Tiny-sized model (dim 192, depth 6, 3 heads, MLP 768, patch 4 on 32x32x3, batch 64),
one AdamW step = forward + backward + update. Variants:

* ``float``      -- plain autodiff;
* ``jaxq-8/4/2`` -- every block under ``jaxq.act.compressed_vjp(bits, compress_args=(1,))``
  (its input included), stochastic rounding;
* ``adaptive``   -- per-block bits from ``jaxq.act.AdaptiveBits`` at an average of 2 bits;
* ``remat``      -- ``jax.checkpoint`` of every block (full recompute).

Printed per variant: residual bytes (what the backward pass keeps: leaves of the VJP
closure, parameters and inputs excluded), compiled temp bytes
(``jit(step).lower(...).compile().memory_analysis()``), trace + compile seconds, median
step time as a ratio to float, and peak RSS of a process that runs only that variant
(subprocess).

``--fit`` instead finds, per variant, the largest batch whose compiled step memory
(arguments + temporaries, from ``memory_analysis()``; compiled, not run) fits in the
float step's at ``--batch``, and times a step at that batch per example against float's:

    python benchmarks/bench_act_memory.py [--steps 10] [--batch 64] [--depth 6]
    python benchmarks/bench_act_memory.py --fit [--depth 12] [--variants float jaxq-2]

``--compile ROUNDS`` only traces and compiles the variants at ``--batch``, interleaved:

    python benchmarks/bench_act_memory.py --compile 2 --variants float jaxq-2
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxq import act

DIM, HEADS, MLP, PATCH, IMG, CLASSES = 192, 3, 768, 4, 32, 10
DEPTH = 6  # set by --depth
VARIANTS = ("float", "jaxq-8", "jaxq-4", "jaxq-2", "adaptive", "remat")


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=DIM)(y, y)
    x = x + y
    y = nn.LayerNorm()(x)
    return x + nn.Dense(DIM)(nn.gelu(nn.Dense(MLP)(y)))


def block_apply(p, h):
  return Block().apply({"params": p}, h)


def init(key, batch):
  k = jax.random.split(key, DEPTH + 4)
  n = (IMG // PATCH) ** 2
  h = jnp.zeros((batch, n + 1, DIM))
  return {
      "embed": nn.Dense(DIM).init(k[0], jnp.zeros((1, PATCH * PATCH * 3)))["params"],
      "cls": jax.random.normal(k[1], (1, 1, DIM)) * 0.02,
      "pos": jax.random.normal(k[2], (1, n + 1, DIM)) * 0.02,
      "blocks": [Block().init(k[4 + i], h)["params"] for i in range(DEPTH)],
      "norm": nn.LayerNorm().init(k[3], h)["params"],
      "head": nn.Dense(CLASSES).init(k[3], jnp.zeros((1, DIM)))["params"],
  }


def forward(params, x, block_fns, key, probes=None):
  b = x.shape[0]
  g = IMG // PATCH
  x = x.reshape(b, g, PATCH, g, PATCH, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
  h = nn.Dense(DIM).apply({"params": params["embed"]}, x)
  h = jnp.concatenate([jnp.broadcast_to(params["cls"], (b, 1, DIM)), h], 1) + params["pos"]
  for i, (fn, p) in enumerate(zip(block_fns, params["blocks"])):
    kw = {}
    if isinstance(fn, _Compressed):
      kw = {"key": jax.random.fold_in(key, i)}
      if probes is not None:
        kw["probe"] = probes[i]
      h = fn.g(p, h, **kw)
    else:
      h = fn(p, h)
  h = nn.LayerNorm().apply({"params": params["norm"]}, h)
  return nn.Dense(CLASSES).apply({"params": params["head"]}, h[:, 0])


class _Compressed:
  def __init__(self, bits):
    self.g = act.compressed_vjp(block_apply, bits=bits, compress_args=(1,))


def block_fns(variant, adaptive_bits=None):
  if variant == "float":
    return [block_apply] * DEPTH
  if variant == "remat":
    return [jax.checkpoint(block_apply)] * DEPTH
  if variant == "adaptive":
    return [_Compressed(b) for b in adaptive_bits]
  return [_Compressed(int(variant.split("-")[1]))] * DEPTH


def loss_fn(params, x, y, key, fns, probes=None):
  logits = forward(params, x, fns, key, probes)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(fns, tx):
  def step(params, opt, x, y, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, key, fns)
    upd, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, upd), opt, loss
  return jax.jit(step, donate_argnums=(0, 1))


def data(batch, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(k1, (batch, IMG, IMG, 3)),
          jax.random.randint(k2, (batch,), 0, CLASSES))


def adaptive_bits(params, x, y, avg_bits=2.0):
  """One estimation step of AdaptiveBits (probe gradients at 4 bits) -> per-block bits."""
  ab = act.AdaptiveBits(list(range(DEPTH)), avg_bits=avg_bits)
  fns = [_Compressed(4)] * DEPTH
  probes = ab.probes()
  pg = jax.jit(jax.grad(lambda pr, p, x, y: loss_fn(p, x, y, jax.random.key(1), fns,
                                                  [pr[i] for i in range(DEPTH)])))(
                                                      probes, params, x, y)
  bits = ab.update(pg)
  return [bits[i] for i in range(DEPTH)]


def measure(variant, batch, steps, bits=None):
  """Residual bytes, temp bytes, median step seconds (and peak RSS of this process)."""
  params = init(jax.random.key(0), batch)
  x, y = data(batch)
  if variant == "adaptive" and bits is None:
    bits = adaptive_bits(params, x, y)
  fns = block_fns(variant, bits)
  res = act.residual_nbytes(lambda p, x, y: loss_fn(p, x, y, jax.random.key(1), fns),
                            params, x, y)
  tx = optax.adamw(1e-3)
  opt = tx.init(params)
  step = make_step(fns, tx)
  t0 = time.perf_counter()
  lowered = step.lower(params, opt, x, y, jax.random.key(1))
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  step_s = median_step_seconds(compiled, params, opt, x, y, steps)
  return {
      "variant": variant, "bits": bits, "residual_bytes": int(res),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "trace_s": t1 - t0, "compile_s": t2 - t1,
      "step_s": step_s,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


#: Trace + compile seconds of each (variant, batch) compiled by :func:`step_memory`.
COMPILE_S: dict = {}


def step_memory(variant, batch, bits=None) -> int:
  """Arguments + temporaries of the compiled step at ``batch`` (compiled, not run)."""
  params = jax.eval_shape(lambda: init(jax.random.key(0), batch))
  x = jax.ShapeDtypeStruct((batch, IMG, IMG, 3), jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  tx = optax.adamw(1e-3)
  opt = jax.eval_shape(tx.init, params)
  step = make_step(block_fns(variant, bits), tx)
  t = time.perf_counter()
  mem = step.lower(params, opt, x, y, jax.random.key(1)).compile().memory_analysis()
  COMPILE_S.setdefault((variant, batch), time.perf_counter() - t)
  total = int(mem.argument_size_in_bytes + mem.temp_size_in_bytes)
  print(f"  {variant} batch {batch}: {total / 2**20:.1f} MB, trace + compile "
        f"{COMPILE_S[(variant, batch)]:.1f} s", flush=True)
  return total


def largest_batch(variant, budget, start) -> int:
  """Largest batch (multiple of 8) whose :func:`step_memory` is at most ``budget``.

  Step memory is affine in the batch up to XLA's layout choices: extrapolated from
  ``start`` and ``2 * start``, then checked in steps of 8 from the prediction (about 4
  compilations instead of a bisection's 8-9)."""
  m0, m1 = step_memory(variant, start), step_memory(variant, 2 * start)
  b = max(8, int(start + (budget - m0) * start / max(m1 - m0, 1)) // 8 * 8)
  if step_memory(variant, b) <= budget:
    while step_memory(variant, b + 8) <= budget:
      b += 8
    return b
  b -= 8
  while b > 8 and step_memory(variant, b) > budget:
    b -= 8
  return b


def step_seconds(variant, batch, steps) -> float:
  params = init(jax.random.key(0), batch)
  x, y = data(batch)
  tx = optax.adamw(1e-3)
  opt = tx.init(params)
  return median_step_seconds(make_step(block_fns(variant), tx), params, opt, x, y, steps)


def median_step_seconds(step, params, opt, x, y, steps) -> float:
  """Median seconds of ``steps`` training steps, after two warm-up steps."""
  times = []
  for i in range(steps + 2):
    t = time.perf_counter()
    params, opt, loss = step(params, opt, x, y, jax.random.key(i))
    loss.block_until_ready()
    times.append(time.perf_counter() - t)
  return float(np.median(times[2:]))


def fit(variants, batch, steps):
  """Batch at the float step's memory, and step time per example (interleaved)."""
  budget = step_memory("float", batch)
  print(f"float step memory at batch {batch}: {budget / 2**20:.1f} MB (arguments + temp)")
  rows = [("float", batch)] + [(v, largest_batch(v, budget, batch))
                               for v in variants if v != "float"]
  per_ex = {v: [] for v, _ in rows}
  for _ in range(2):  # interleaved rounds: the machine's load drifts
    for v, b in rows:
      per_ex[v].append(step_seconds(v, b, steps) / b)
  f = min(per_ex["float"])
  c = COMPILE_S[("float", batch)]
  print(f"{'variant':10s} {'batch':>6s} {'x float':>8s} {'ms/example':>11s} {'x float':>8s} "
        f"{'compile s':>10s} {'x float':>8s}   (compile: trace + compile at batch {batch})")
  for v, b in rows:
    t = min(per_ex[v])
    cv = COMPILE_S[(v, batch)]
    print(f"{v:10s} {b:6d} {b / batch:8.2f} {t * 1e3:11.3f} {t / f:8.2f} {cv:10.1f} "
          f"{cv / c:8.2f}")


def compile_seconds(variants, batch, rounds):
  """Trace + compile seconds of the step at ``batch``, the variants interleaved for
  ``rounds`` rounds after a warm-up compilation (minimum of each, wall and CPU time: on a
  shared machine the CPU time of this process is the steadier of the two), with the
  number of StableHLO ops of the lowered step and of fusions in the compiled one."""
  step_memory(variants[0], batch)  # warm-up: JAX's and XLA's first-use costs
  best, best_cpu = {}, {}
  for _ in range(rounds):
    for v in variants:
      params = jax.eval_shape(lambda: init(jax.random.key(0), batch))
      x = jax.ShapeDtypeStruct((batch, IMG, IMG, 3), jnp.float32)
      y = jax.ShapeDtypeStruct((batch,), jnp.int32)
      tx = optax.adamw(1e-3)
      opt = jax.eval_shape(tx.init, params)
      t, c = time.perf_counter(), time.process_time()
      lowered = make_step(block_fns(v), tx).lower(params, opt, x, y, jax.random.key(1))
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2, c2 = time.perf_counter(), time.process_time()
      ops = len(re.findall(r'= "?stablehlo\.', lowered.as_text()))
      fusions = compiled.as_text().count("fusion(")
      print(f"  {v}: lower {t1 - t:.1f} s, compile {t2 - t1:.1f} s, CPU {c2 - c:.1f} s, "
            f"{ops} StableHLO ops, {fusions} fusions", flush=True)
      best[v] = min(best.get(v, np.inf), t2 - t)
      best_cpu[v] = min(best_cpu.get(v, np.inf), c2 - c)
  for v in variants:
    print(f"{v:10s} trace + compile {best[v]:7.1f} s  x {variants[0]} "
          f"{best[v] / best[variants[0]]:.2f};  CPU {best_cpu[v]:7.1f} s  x {variants[0]} "
          f"{best_cpu[v] / best_cpu[variants[0]]:.2f}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--variant", choices=VARIANTS, help="run one variant, print JSON")
  ap.add_argument("--bits", type=str, default=None, help="per-block bits for adaptive")
  ap.add_argument("--depth", type=int, default=6)
  ap.add_argument("--fit", action="store_true", help="largest batch at float's memory")
  ap.add_argument("--variants", nargs="+", default=["float", "jaxq-4", "jaxq-2", "remat"])
  ap.add_argument("--compile", type=int, metavar="ROUNDS", default=0,
                  help="only trace + compile --variants at --batch, interleaved")
  a = ap.parse_args()
  global DEPTH  # noqa: PLW0603 -- the model's depth, fixed for the whole process
  DEPTH = a.depth
  if a.compile:
    compile_seconds(a.variants, a.batch, a.compile)
    return
  if a.fit:
    fit(a.variants, a.batch, a.steps)
    return
  if a.variant:
    bits = None if a.bits is None else [int(b) for b in a.bits.split(",")]
    print(json.dumps(measure(a.variant, a.batch, a.steps, bits)))
    return
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, ViT-Tiny dim {DIM} depth "
        f"{DEPTH} batch {a.batch} {IMG}x{IMG}x3 patch {PATCH}, {a.steps} timed steps")
  params = init(jax.random.key(0), a.batch)
  bits = adaptive_bits(params, *data(a.batch))
  rows = []
  for v in VARIANTS:
    cmd = [sys.executable, __file__, "--variant", v, "--steps", str(a.steps),
           "--batch", str(a.batch), "--bits", ",".join(map(str, bits)),
           "--depth", str(a.depth)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))
  f = rows[0]
  print(f"{'variant':10s} {'residual MB':>12s} {'x smaller':>9s} {'temp MB':>9s} "
        f"{'trace s':>8s} {'compile s':>9s} {'x float':>8s} "
        f"{'step ms':>8s} {'x float':>8s} {'peak RSS MB':>12s}  bits")
  for r in rows:
    print(f"{r['variant']:10s} {r['residual_bytes'] / 2**20:12.2f} "
          f"{f['residual_bytes'] / max(r['residual_bytes'], 1):9.1f} "
          f"{r['temp_bytes'] / 2**20:9.1f} {r['trace_s']:8.2f} {r['compile_s']:9.2f} "
          f"{(r['trace_s'] + r['compile_s']) / (f['trace_s'] + f['compile_s']):8.2f} "
          f"{r['step_s'] * 1e3:8.1f} "
          f"{r['step_s'] / f['step_s']:8.2f} {r['peak_rss_mb']:12.0f}  "
          f"{r['bits'] if r['variant'] == 'adaptive' else ''}")


if __name__ == "__main__":
  main()
