"""PTQ benchmark: float vs W8A8 (static, int8 matmuls) vs W4 (per-group 32, weight-only),
each with round-to-nearest, SmoothQuant / AWQ scaling (``Rule.smooth``) and GPTQ
(``QuantSpec(rounding="gptq")``), all through ``jaxq.calibrate`` / ``jaxq.convert``.

For a ViT trained on scikit-learn's digits in this run, reports test accuracy, the bytes
of the serving parameters (all of them, and the quantized kernels alone), the
calibration + conversion time (first call: compilation included) and the serving
latency (jitted ``apply`` on a batch, median of ``--iters`` timed calls after warm-up).
A second table runs the same PTQ variants on tests/_bert_like.py's pre-LN block with
LayerNorm outlier channels (output cosine to float: worst token and mean).
Each quantized model is also served with ``convert(..., compact_scales=True)`` (float16 /
float8 weight scales): its rows add the share of served kernel weights that differ from
the exact (float32-scale) conversion, which reproduces the QAT weights, and the relative
L2 distance of its test logits to the exact conversion's.

  PYTHONPATH=. python benchmarks/bench_ptq.py [--dim 64] [--steps 300] [--batch 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _models import TinyViT, load_digits_split, train  # noqa: E402  pylint: disable=wrong-import-position
import _bert_like  # noqa: E402  pylint: disable=wrong-import-position

from jaxq.flax import ptq  # noqa: E402
from jaxq.flax.linen import quantize_model  # noqa: E402
from jaxq.qarray import QArray, dequantize  # noqa: E402
from jaxq.spec import QuantSpec, Rule  # noqa: E402


def _latency(fn, *args, iters):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times)) * 1e3


def _kernel_bytes(params):
  leaves = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, QArray))[0]
  total = 0
  for path, leaf in leaves:
    if "kernel" in jax.tree_util.keystr(path):
      total += leaf.nbytes if isinstance(leaf, QArray) else leaf.size * leaf.dtype.itemsize
  return total


def _changed_weights(exact, compact) -> float:
  """Share of served kernel weights (dequantized) that differ between two conversions."""
  qs = lambda t: [l for l in jax.tree_util.tree_leaves(  # noqa: E731
      t, is_leaf=lambda x: isinstance(x, QArray)) if isinstance(l, QArray)]
  diff = total = 0
  for qe, qc in zip(qs(exact), qs(compact)):
    diff += int(jnp.sum(dequantize(qe) != dequantize(qc)))
    total += qe.size
  return diff / total


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dim", type=int, default=64)
  ap.add_argument("--depth", type=int, default=2)
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--iters", type=int, default=20)
  a = ap.parse_args()

  xtr, ytr, xte, yte = load_digits_split()
  model = TinyViT(dim=a.dim, mlp=2 * a.dim, depth=a.depth)
  v = model.init(jax.random.key(0), xtr[:2])
  t0 = time.perf_counter()
  v = train(model, v, xtr, ytr, steps=a.steps)
  print(f"trained {a.steps} steps in {time.perf_counter() - t0:.1f}s; device "
        f"{jax.devices()[0].device_kind}, backend {jax.default_backend()}")
  cal = [xtr[i:i + 256] for i in range(0, 1024, 256)]
  xb = jnp.tile(xte, (a.batch // xte.shape[0] + 1, 1, 1, 1))[:a.batch]

  w8 = Rule(".*", weight=QuantSpec(8), act=QuantSpec(8, granularity="tensor"))
  w4 = [Rule("embed", weight=QuantSpec(8)),
        Rule(".*", weight=QuantSpec(4, granularity="group", group_size=32))]
  configs = [("float", None, False), ("W8A8 static", [w8], False),
             ("W8A8 static, compact scales", [w8], True),
             ("W4 g32 weight-only", w4, False),
             ("W4 g32 weight-only, compact scales", w4, True)]
  configs += [(name, rules, False) for name, rules in _llm_variants(w8, w4)]
  rows = []
  exact = None
  for name, rules, compact in configs:
    t0 = time.perf_counter()
    if rules is None:
      sm, sv = model, v
    else:
      qmodel = quantize_model(model, rules)
      cv = ptq.calibrate(qmodel, v, cal)
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPTQ's few-tokens warning (K <= 128 here)
        sm, sv = ptq.convert(qmodel, cv, compact_scales=compact)
    cal_s = time.perf_counter() - t0
    fn = jax.jit(sm.apply)
    logits = fn(sv, xte)
    acc = float(jnp.mean(jnp.argmax(logits, -1) == yte) * 100)
    changed = err = None
    if compact:
      changed = _changed_weights(exact[1], sv["params"])
      err = float(jnp.linalg.norm(logits - exact[0]) / jnp.linalg.norm(exact[0]))
    elif rules is not None:
      exact = (logits, sv["params"])
    rows.append((name, acc, ptq.serving_nbytes(sv["params"]), _kernel_bytes(sv["params"]),
                 _latency(fn, sv, xb, iters=a.iters), changed, err, cal_s))
  f_total, f_kern = rows[0][2], rows[0][3]
  print(f"\nTinyViT(dim={a.dim}, depth={a.depth}) on digits; latency: batch {a.batch}, "
        f"median of {a.iters}")
  print("| model | test acc (%) | serving params (bytes) | kernels (bytes) | kernels vs "
        "float | latency (ms) | calibrate + convert (s) | weights changed | logits rel. "
        "L2 vs exact |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, acc, tot, kern, ms, changed, err, cal_s in rows:
    extra = "| | |" if changed is None else f"| {changed:.1%} | {err:.2e} |"
    print(f"| {name} | {acc:.2f} | {tot} ({tot / f_total:.1%}) | {kern} | "
          f"{kern / f_kern:.1%} | {ms:.2f} | {cal_s:.1f} {extra}")
  _bert_like_table(w8, w4)


def _llm_variants(w8: Rule, w4: list[Rule]) -> list[tuple[str, list[Rule]]]:
  """SmoothQuant / AWQ / GPTQ variants of the W8A8 and W4 rules (Contract 7); the
  last rule of each is the one varied, a leading "embed" rule (a patch Conv: no
  smoothing, its kernel rows are not the input channels) is kept as it is."""
  g = w4[-1].weight.replace(rounding="gptq")
  w8_embed = [Rule("embed", weight=w8.weight, act=w8.act)]
  rep = dataclasses.replace
  return [
      ("W8A8 static, SmoothQuant alpha 0.5", w8_embed + [rep(w8, smooth=0.5)]),
      ("W8A8 static, smooth auto", w8_embed + [rep(w8, smooth="auto")]),
      ("W4 g32, AWQ (smooth auto)", w4[:-1] + [rep(w4[-1], smooth="auto")]),
      ("W4 g32, GPTQ", w4[:-1] + [rep(w4[-1], weight=g)]),
      ("W4 g32, GPTQ + AWQ", w4[:-1] + [rep(w4[-1], weight=g, smooth="auto")])]


def _bert_like_table(w8: Rule, w4: list[Rule]) -> None:
  """The variants on the BERT-like block with outlier channels: output cosine."""
  params = {"params": _bert_like.block_params(0)}
  model = _bert_like.LinenBlock()
  cal = [_bert_like.inputs(4, seed) for seed in range(4)]
  test = _bert_like.inputs(8, 100)
  ref = jax.jit(model.apply)(params, test)
  w4 = [Rule("embed", weight=None), w4[-1]]  # the block has no "embed" layer
  variants = [("W8A8 static", [w8]), ("W4 g32 weight-only", w4[1:])]
  variants += [(name, rules[1:]) for name, rules in _llm_variants(w8, w4)]
  print("\nBERT-like block (tests/_bert_like.py, LayerNorm outlier channels 20/60/100x), "
        "output cosine to float on 8 x 16 test tokens")
  print("| PTQ | worst-token cosine | mean cosine | rel. output error | calibrate + "
        "convert (s) |")
  print("|---|---|---|---|---|")
  for name, rules in variants:
    t0 = time.perf_counter()
    qmodel = quantize_model(model, rules)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      sm, sv = ptq.convert(qmodel, ptq.calibrate(qmodel, params, cal))
    cal_s = time.perf_counter() - t0
    y = jax.jit(sm.apply)(sv, test)
    cos = _bert_like.cosines(y, ref)
    err = float(jnp.sum((y - ref) ** 2) / jnp.sum(ref ** 2))
    print(f"| {name} | {cos.min():.4f} | {cos.mean():.5f} | {err:.2e} | {cal_s:.1f} |")


if __name__ == "__main__":
  main()
