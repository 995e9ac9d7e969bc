"""Experiment: per-sample widths ranked by gradient estimates (ActNN's ``G_n R_n``).

Hypothesis: late in training most samples are fitted and their gradients nearly vanish,
so their saved activations can take 1 bit and the bits saved can give the few samples that
carry the gradient 4 bits. At the same residual bytes as uniform 2-bit the parameter
gradient is then much closer to the exact one, provided the compressed residuals feed
only parameter cotangents (ActNN's per-layer setting: a Dense/Conv layer saves its input
for ``dW = x^T dy``), where rounding noise adds up across layers instead of compounding.

Setup: ``TinyViT(dim=32, depth=2)`` on scikit-learn's digits, batch 64, Adam with cosine
decay from 3e-3 over ``--steps``, stochastic rounding. ``--regions layers``: every Dense and
Conv layer is its own ``Rule(act_compress=...)`` region of :func:`jaxq.quantize_model`
(group size 64); ``--regions blocks``: each encoder block is one region (its attention
maps, normalised values and GELU factors are compressed too). Each training example keeps
``G_n``, the EMA (0.5, as ActNN) of :func:`jaxq.act.output_grad_sqnorm` of its loss over
its visits (1 before the first); the step passes ``G[idx]`` through
:func:`jaxq.act.linen.sample_weights`. Variants, all within uniform 2-bit's residual bytes:

* ``float``: no compression; ``uniform2``: every residual at 2 bits;
* ``range``: ``SampleBits({4: 1/4, 2: 1/4, 1: 1/2})`` ranked by range alone (``R_n``);
* ``weighted``: the same fractions ranked by ``G_n R_n``;
* ``auto``: fractions re-chosen every ``--interval`` steps by
  ``SampleBits.from_sensitivity(G, 2, (1, 2, 4), batch_size=64)`` over the training set
  (one width while the ``G_n`` are alike, mixed once most samples are fitted), ranked
  by ``G_n R_n``.

Reported per seed and as the mean: test accuracy, final training loss (mean of the last 50
steps) and gradient error ``|g - g_exact| / |g_exact|`` at the end (the first 64 training
images with their ``G_n``, mean over 4 keys).

Run: ``python benchmarks/exp_act_sample_weight.py --seeds 0 1 2 3 4 5 6 7 8 9`` (~15 min
on 2 CPU cores). Results: see the ``jaxq/act/adaptive.py`` docstring.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from _models import TinyViT, load_digits_split  # noqa: E402

import jaxq  # noqa: E402
from jaxq import act  # noqa: E402

MODEL = TinyViT(dim=32, depth=2)
BATCH, GROUP = 64, 64
REGIONS = {"layers": r"embed|head|.*/(query|key|value|out|Dense_\d+)", "blocks": r"block_\d+"}
FIXED = act.SampleBits({4: 0.25, 2: 0.25, 1: 0.5})


def per_sample_loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def variants() -> dict:
  """``{name: (bits, ranked by G)}``; bits None: float, "auto": re-chosen fractions."""
  return {"float": (None, False), "uniform2": (2, False), "range": (FIXED, False),
          "weighted": (FIXED, True), "auto": ("auto", True)}


@functools.lru_cache(maxsize=None)
def _model(bits, regions: str):
  if bits is None:
    return MODEL
  return jaxq.quantize_model(MODEL, [jaxq.Rule(REGIONS[regions], weight=None,
                                               act_compress=bits)])


def _apply(bits, regions, params, x, key, weight):
  m = _model(bits, regions)
  if bits is None:
    return m.apply({"params": params}, x)
  if weight is None:
    return m.apply({"params": params}, x, rngs={"jaxq": key})
  with act.linen.sample_weights(weight):
    return m.apply({"params": params}, x, rngs={"jaxq": key})


@functools.lru_cache(maxsize=None)
def _chunk(bits, weighted: bool, regions: str, steps: int):
  """``lax.scan`` over a chunk of steps at fixed widths; carries params, Adam state, G."""
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))

  @jax.jit
  def run(params, opt, g_est, x, y, keys):
    def step(carry, k):
      p, o, g_est = carry
      k_idx, k_rng = jax.random.split(k)
      idx = jax.random.randint(k_idx, (BATCH,), 0, x.shape[0])

      def loss(p):
        logits = _apply(bits, regions, p, x[idx], k_rng, g_est[idx] if weighted else None)
        return per_sample_loss(logits, y[idx]).mean(), logits

      (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(p)
      g_new = act.output_grad_sqnorm(per_sample_loss, logits, y[idx])
      g_est = g_est.at[idx].set(0.5 * g_est[idx] + 0.5 * g_new)
      upd, o = tx.update(grads, o, p)
      return (optax.apply_updates(p, upd), o, g_est), value

    (params, opt, g_est), losses = jax.lax.scan(step, (params, opt, g_est), keys)
    return params, opt, g_est, losses

  return run, tx


def _widths(bits, g_est):
  if bits != "auto":
    return bits
  return act.SampleBits.from_sensitivity(np.asarray(g_est), 2, (1, 2, 4), batch_size=BATCH)


def train(bits, weighted, regions, params, x, y, keys, interval):
  steps = len(keys)
  g_est, opt, losses, history = jnp.ones(x.shape[0]), None, [], []
  for start in range(0, steps, interval):
    widths = _widths(bits, g_est)
    if bits == "auto":
      history.append((start, widths.fractions))
    run, tx = _chunk(widths, weighted, regions, steps)
    opt = tx.init(params) if opt is None else opt
    params, opt, g_est, chunk_losses = run(params, opt, g_est, x, y,
                                           keys[start:start + interval])
    losses.append(chunk_losses)
  return params, g_est, np.concatenate([np.asarray(l) for l in losses]), history


@functools.lru_cache(maxsize=None)
def _grad_fn(bits, regions):
  return jax.jit(jax.grad(lambda p, x, y, k, w: per_sample_loss(
      _apply(bits, regions, p, x, k, w), y).mean()))


def grad_error(bits, regions, params, x, y, weight) -> float:
  """``|g - g_exact| / |g_exact|``, mean over 4 rounding keys."""
  flat = lambda t: jnp.concatenate([l.ravel() for l in jax.tree_util.tree_leaves(t)])  # noqa: E731
  ref = flat(_grad_fn(None, regions)(params, x, y, None, None))
  errs = [float(jnp.linalg.norm(flat(_grad_fn(bits, regions)(params, x, y, k, weight)) - ref)
                / jnp.linalg.norm(ref)) for k in jax.random.split(jax.random.key(7), 4)]
  return float(np.mean(errs))


def run_seed(seed, steps, regions, interval) -> dict:
  xtr, ytr, xte, yte = load_digits_split(seed)
  params0 = MODEL.init(jax.random.key(seed), xtr[:2])["params"]
  keys = jax.random.split(jax.random.key(seed + 1), steps)
  out = {}
  for name, (bits, weighted) in variants().items():
    t = time.time()
    params, g_est, losses, history = train(bits, weighted, regions, params0, xtr, ytr, keys,
                                           interval)
    acc = float(jnp.mean(jnp.argmax(MODEL.apply({"params": params}, xte), -1) == yte) * 100)
    end = None if bits is None else _widths(bits, g_est)
    gerr = 0.0 if end is None else grad_error(end, regions, params, xtr[:BATCH], ytr[:BATCH],
                                              g_est[:BATCH] if weighted else None)
    out[name] = dict(acc=acc, loss=float(losses[-50:].mean()), gerr=gerr)
    print(f"  seed {seed} {name:9s} acc {acc:6.2f}  loss {out[name]['loss']:.4f}  "
          f"gerr_end {gerr:.3f}  ({time.time() - t:.0f}s)", flush=True)
    for start, fractions in history[::max(1, len(history) // 4)]:
      print(f"      step {start}: {dict(fractions)}")
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--interval", type=int, default=50)
  ap.add_argument("--regions", choices=sorted(REGIONS), default="layers")
  a = ap.parse_args()
  if a.steps < 50 or a.interval < 1:
    ap.error(f"--steps must be >= 50 and --interval >= 1, got {a.steps}, {a.interval}")
  runs = [run_seed(s, a.steps, a.regions, a.interval) for s in a.seeds]
  print(f"\nmean over seeds {a.seeds} (regions: {a.regions}):")
  for name in variants():
    acc, loss, gerr = (np.mean([r[name][k] for r in runs]) for k in ("acc", "loss", "gerr"))
    wins = sum(r[name]["acc"] > r["uniform2"]["acc"] for r in runs)
    print(f"  {name:9s} acc {acc:6.2f}  loss {loss:.4f}  gerr_end {gerr:.3f}  "
          f"above uniform2 on {wins}/{len(runs)} seeds")


if __name__ == "__main__":
  main()
