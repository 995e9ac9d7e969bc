"""Experiment: residual roles at an average of 2 bits vs uniform 2-bit (ActNN).

Hypothesis: a residual used only to form one parameter cotangent (the input of a Dense
layer: ``dW = x^T dy``; ``dx = dy W^T`` does not read it) cannot compound noise along the
backward pass, so it can go to 1 bit, and the bytes saved can raise residuals on the
cotangent path to 4 bits; at the same residual bytes this should end closer to float
than uniform 2-bit.

Roles (:func:`residual_roles`), from the data flow of the backward jaxpr (the closure
:func:`jaxq.act.compressed_vjp` rebuilds from decompressed residuals, kept leaves and the
output cotangent): residual ``r`` *reaches* output ``o`` when ``o`` depends on ``r``
transitively; call-like equations (``pjit``, ``closed_call``, ...) are followed input by
input, any other equation makes each output depend on all its inputs (conservative: never
a false "param"). ``"param"``: ``r`` reaches exactly one output and it is a parameter
cotangent (so every value computed from ``r`` feeds that one weight gradient only);
``"shared"``: two or more outputs, all parameter cotangents (LayerNorm output into the
q/k/v projections); ``"cotangent"``: anything else, i.e. ``r`` reaches an activation
cotangent (attention probabilities, q/k/v, normalised values, activation derivatives).
Hand-checked on ``tanh(x w) w2`` (:func:`self_check`): x "param", tanh(x w) (read by dW2
*and* the tanh derivative) and 1 - tanh(x w) "cotangent"; ``(x w1) * (x w2)``: x "shared".

Setup (as the per-residual table in ``jaxq/act/adaptive.py``): the whole
``TinyViT(dim=32, depth=2)`` under one :func:`jaxq.act.compressed_vjp` (image input
compressed too, 44 residuals, group size 256), scikit-learn digits, batch 64, Adam with
cosine decay from 3e-3 over ``--steps``, stochastic rounding; every variant starts from
the same initialisation and sees the same minibatches and keys. Variants:

* ``float``: no compression;
* ``uniform2``: every residual at 2 bits;
* ``roles``: :func:`role_bits` ("param" residuals at 1 bit, the bits saved raise
  "cotangent" residuals to 4 bits in closure order, i.e. nearest the input first; the
  rest at 2);
* ``roles+shared``: the same with "shared" residuals at 1 bit too;
* ``roles-top``: as ``roles`` but raising the cotangent residuals nearest the output
  first (closure order reversed).

Reported per seed and as the mean: test accuracy, final training loss (mean of the last
50 steps), gradient error ``|g - g_exact| / |g_exact|`` (64 training images, mean over 4
keys) at initialisation and at the end, and residual bytes
(:func:`jaxq.act.residual_nbytes`).

Run: ``python benchmarks/exp_act_roles.py --seeds 0 1 2 3 4 --steps 600 --diagnose``
(~8 minutes on 2 CPU cores). Result (2026-11): the roles allocation does NOT end closer
to float: mean test accuracy 92.25 vs 92.65 (uniform 2-bit; float 93.45), higher on 2/5
seeds, and it *raises* the gradient error (0.67 vs 0.43 at initialisation). The
diagnosis: "param" residuals do not compound (alone at 1 bit their error is 0.36, ~3x
their 2-bit 0.11, as the additive ``1 / (2^b - 1)^2`` model predicts), but they are only
15% of the residual elements, so 1 bit on them buys 4 bits for only ~7%: the extra
weight-gradient noise outweighs what the few 4-bit residuals remove.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from _models import TinyViT, cross_entropy, load_digits_split  # noqa: E402

from jaxq import act  # noqa: E402
from jaxq.act import pack  # noqa: E402
from jaxq.act.vjp import (  # noqa: E402  pylint: disable=protected-access
    _backward_jaxpr, _reach, _validate)

MODEL = TinyViT(dim=32, depth=2)


# ------------------------------------------------------------------ role analysis
#: The role names :func:`residual_roles` returns.
ROLES = ("param", "shared", "cotangent")


def _check_positions(positions, name: str, n_args: int) -> tuple[int, ...]:
  if isinstance(positions, (int, np.integer)):
    positions = (positions,)
  try:
    positions = tuple(positions)
  except TypeError:
    raise TypeError(f"{name} must be a sequence of argument positions, got {positions!r}"
                    ) from None
  for p in positions:
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= p < n_args:
      raise ValueError(f"{name} must hold argument positions in [0, {n_args}), "
                       f"got {positions!r}")
  return tuple(int(p) for p in positions)


def residual_roles(fn: Callable[..., Any], *args, group_size: int = 256,
                   compress_args: Sequence[int] = (),
                   param_args: Sequence[int] | None = None) -> list[str]:
  """The role (``"param"``, ``"shared"`` or ``"cotangent"``, see the module docstring) of
  each residual :func:`~jaxq.act.compressed_vjp` compresses for ``fn(*args)``, in the
  order of :func:`~jaxq.act.compressed_residuals` (and of a per-residual ``bits`` tuple).

  Args:
    fn, args, group_size, compress_args: as for :func:`~jaxq.act.compressed_residuals`.
    param_args: positions of the parameter arguments (their cotangents are weight
      gradients); default: every position not in ``compress_args``. The cotangents of all
      other arguments are activation cotangents, passed on to the layers below.

  Computed abstractly (traces only).
  """
  _, group_size, compress_args = _validate(8, group_size, compress_args)
  compress_args = _check_positions(compress_args, "compress_args", len(args))
  if param_args is None:
    param_args = tuple(p for p in range(len(args)) if p not in compress_args)
  param_args = _check_positions(param_args, "param_args", len(args))
  # Which flat cotangent output belongs to a parameter argument.
  is_param_out = []
  for p, a in enumerate(args):
    is_param_out += [p in param_args] * len(jax.tree_util.tree_leaves(a))
  cell: list[str] = []

  def f(*a):
    jaxpr, comp = _backward_jaxpr(fn, a, group_size, compress_args)
    n_in = len(jaxpr.invars)
    outs = _reach(jaxpr, [1 << j if j < len(comp) else 0 for j in range(n_in)])
    if len(outs) != len(is_param_out):
      raise ValueError(f"the backward pass of {getattr(fn, '__name__', fn)!r} has "
                       f"{len(outs)} outputs, expected one per argument leaf "
                       f"({len(is_param_out)})")
    for j in range(len(comp)):
      reached = [k for k, m in enumerate(outs) if m >> j & 1]
      if reached and all(is_param_out[k] for k in reached):
        cell.append("param" if len(reached) == 1 else "shared")
      else:
        cell.append("cotangent")
    return 0

  jax.eval_shape(f, *args)
  return cell


def role_bits(roles: Sequence[str], sizes: Sequence[int], avg_bits: int = 2,
              low: int = 1, high: int = 4, shared_low: bool = False) -> tuple[int, ...]:
  """Per-residual widths from roles at ``sum_i b_i n_i <= avg_bits * sum_i n_i``.

  ``"param"`` residuals (and ``"shared"`` ones with ``shared_low``) get ``low`` bits; the
  saved ``(avg_bits - low) * n_i`` bits raise ``"cotangent"`` residuals from ``avg_bits``
  to ``high`` bits, smallest first (the most residuals per bit), while they fit; all other
  residuals stay at ``avg_bits``.

  Args:
    roles: :func:`residual_roles` of the residuals.
    sizes: their element counts (``Residual.size`` of
      :func:`~jaxq.act.compressed_residuals`), same length.
    avg_bits: the average width, ``low <= avg_bits <= high``, all in ``(1, 2, 4, 8)``.
    low, high: the widths of the narrow and the raised residuals.
    shared_low: whether ``"shared"`` residuals go to ``low`` bits too.

  Returns:
    a tuple of ints for :func:`~jaxq.act.compressed_vjp`'s ``bits``.
  """
  for name, b in (("avg_bits", avg_bits), ("low", low), ("high", high)):
    pack.check_bits(b, name)
  if not low <= avg_bits <= high:
    raise ValueError(f"need low <= avg_bits <= high, got low={low}, avg_bits={avg_bits}, "
                     f"high={high}")
  roles, sizes = list(roles), [int(n) for n in sizes]
  if len(roles) != len(sizes):
    raise ValueError(f"roles and sizes must have the same length, got {len(roles)} and "
                     f"{len(sizes)}")
  bad = [r for r in roles if r not in ROLES]
  if bad:
    raise ValueError(f"roles must be in {ROLES}, got {bad[0]!r}")
  if any(n <= 0 for n in sizes):
    raise ValueError("sizes must be > 0")
  lowered = ("param", "shared") if shared_low else ("param",)
  bits = [low if r in lowered else avg_bits for r in roles]
  spare = sum((avg_bits - b) * n for b, n in zip(bits, sizes))
  if high > avg_bits:
    for i in sorted((i for i, r in enumerate(roles) if r == "cotangent"),
                    key=lambda i: (sizes[i], i)):
      cost = (high - avg_bits) * sizes[i]
      if cost <= spare:
        bits[i] = high
        spare -= cost
  return tuple(bits)


# ------------------------------------------------------------------ experiment
BATCH, GROUP = 64, 256


def _fn(p, x):
  return MODEL.apply({"params": p}, x)


def allocations(params, x):
  """``{variant: bits}`` (None: float) and the residuals' roles and sizes."""
  kw = dict(group_size=GROUP, compress_args=(1,))
  res = act.compressed_residuals(_fn, params, x, **kw)
  roles = residual_roles(_fn, params, x, **kw)
  sizes = [r.size for r in res]
  return {
      "float": None,
      "uniform2": 2,
      "roles": role_bits(roles, sizes, 2),
      "roles+shared": role_bits(roles, sizes, 2, shared_low=True),
      # Raising the residuals nearest the output first (their noise crosses every layer).
      "roles-top": role_bits(roles[::-1], sizes[::-1], 2)[::-1],
  }, roles, sizes


def _model_fn(bits):
  if bits is None:
    return lambda p, x, k: _fn(p, x)
  g = act.compressed_vjp(_fn, bits=bits, group_size=GROUP, compress_args=(1,))
  return lambda p, x, k: g(p, x, key=k)


@functools.lru_cache(maxsize=None)
def _train_fn(bits, steps):
  f = _model_fn(bits)
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))

  @jax.jit
  def run(params, x, y, keys):
    def step(carry, k):
      p, o = carry
      k_idx, k_rng = jax.random.split(k)
      idx = jax.random.randint(k_idx, (BATCH,), 0, x.shape[0])
      loss, g = jax.value_and_grad(lambda p: cross_entropy(f(p, x[idx], k_rng), y[idx]))(p)
      upd, o = tx.update(g, o, p)
      return (optax.apply_updates(p, upd), o), loss

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), keys)
    return params, losses

  return run


@functools.lru_cache(maxsize=None)
def _grad_fn(bits):
  f = _model_fn(bits)
  return jax.jit(jax.grad(lambda p, x, y, k: cross_entropy(f(p, x, k), y)))


def grad_error(bits, params, x, y, key) -> float:
  """``|g - g_exact| / |g_exact|``, mean over 4 rounding keys."""
  ref = jnp.concatenate([l.ravel() for l in jax.tree_util.tree_leaves(
      _grad_fn(None)(params, x, y, key))])
  errs = []
  for k in jax.random.split(key, 4):
    g = jnp.concatenate([l.ravel() for l in jax.tree_util.tree_leaves(
        _grad_fn(bits)(params, x, y, k))])
    errs.append(float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref)))
  return float(np.mean(errs))


def run_seed(seed: int, steps: int, variants: dict) -> dict:
  xtr, ytr, xte, yte = load_digits_split(seed)
  params = MODEL.init(jax.random.key(seed), xtr[:2])["params"]
  keys = jax.random.split(jax.random.key(seed + 1), steps)
  xg, yg, kg = xtr[:BATCH], ytr[:BATCH], jax.random.key(seed + 2)
  out = {}
  for name, bits in variants.items():
    t = time.time()
    p, losses = _train_fn(bits, steps)(params, xtr, ytr, keys)
    logits = jax.jit(_fn)(p, xte)
    acc = float(jnp.mean(jnp.argmax(logits, -1) == yte) * 100.0)
    g0 = 0.0 if bits is None else grad_error(bits, params, xg, yg, kg)
    g1 = 0.0 if bits is None else grad_error(bits, p, xg, yg, kg)
    out[name] = dict(acc=acc, loss=float(np.mean(np.asarray(losses)[-50:])), g0=g0, g1=g1)
    print(f"  seed {seed} {name:13s} acc {acc:6.2f}  loss {out[name]['loss']:.4f}  "
          f"gerr0 {g0:.3f}  gerr_end {g1:.3f}  ({time.time() - t:.0f}s)", flush=True)
  return out


def self_check():
  """Roles of small functions derived by hand (see the module docstring)."""
  k = jax.random.split(jax.random.key(0), 3)
  x, w, w2 = (jax.random.normal(kk, sh) for kk, sh in zip(k, [(64, 32), (32, 16), (16, 8)]))
  tanh_mlp = lambda w, w2, x: jnp.tanh(x @ w) @ w2  # noqa: E731
  gated = lambda w1, w2, x: (x @ w1) * (x @ w2)  # noqa: E731
  for fn, want in ((tanh_mlp, ["param", "cotangent", "cotangent"]),
                   (jax.jit(tanh_mlp), ["param", "cotangent", "cotangent"]),
                   (gated, ["shared", "cotangent", "cotangent"])):
    got = residual_roles(fn, w, w2 if fn is not gated else w, x, group_size=32,
                         compress_args=(2,))
    assert got == want, (got, want)
  assert residual_roles(lambda w, x: x @ w, w, x, group_size=32, compress_args=(1,),
                        param_args=()) == ["cotangent"]
  assert role_bits(["param", "cotangent", "cotangent", "cotangent"], [6, 4, 2, 1], 2) == (
      1, 2, 4, 4)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--diagnose", action="store_true",
                  help="also measure the gradient error of each role's residuals alone")
  args = ap.parse_args()
  self_check()

  xtr = load_digits_split(0)[0]
  params = MODEL.init(jax.random.key(0), xtr[:2])["params"]
  x = xtr[:BATCH]
  variants, roles, sizes = allocations(params, x)
  print("roles (elements):", {r: sum(n for n, q in zip(sizes, roles) if q == r)
                              for r in sorted(set(roles))})
  nbytes = {}
  for name, bits in variants.items():
    if bits is None:
      nbytes[name] = act.residual_nbytes(_fn, params, x)
    else:
      g = act.compressed_vjp(_fn, bits=bits, group_size=GROUP, compress_args=(1,))
      nbytes[name] = act.residual_nbytes(lambda p, x: g(p, x, key=jax.random.key(0)),
                                         params, x)
    if isinstance(bits, tuple):
      print(f"{name}: bits {bits}  avg "
            f"{sum(b * n for b, n in zip(bits, sizes)) / sum(sizes):.3f}")
  for name in ("roles", "roles+shared", "roles-top"):
    if nbytes[name] > nbytes["uniform2"]:
      raise SystemExit(f"{name} stores {nbytes[name]} bytes > uniform2 {nbytes['uniform2']}")

  results = {s: run_seed(s, args.steps, variants) for s in args.seeds}
  print(f"\n{len(args.seeds)} seeds {args.seeds}, {args.steps} steps; per-seed test acc %")
  hdr = ("variant", "acc per seed", "mean acc", "train loss", "gerr 0", "gerr end",
         "bytes")
  print("| " + " | ".join(hdr) + " |")
  print("|" + "---|" * len(hdr))
  for name in variants:
    rs = [results[s][name] for s in args.seeds]
    m = lambda k: np.mean([r[k] for r in rs])  # noqa: E731
    per_seed = "/".join(f"{r['acc']:.2f}" for r in rs)
    print(f"| {name} | {per_seed} | {m('acc'):.2f} | "
          f"{m('loss'):.4f} | {m('g0'):.3f} | {m('g1'):.3f} | {nbytes[name]:,} |")
  for name in ("roles", "roles+shared", "roles-top"):
    wins = sum(results[s][name]["acc"] > results[s]["uniform2"]["acc"] for s in args.seeds)
    print(f"{name}: higher test accuracy than uniform2 on {wins}/{len(args.seeds)} seeds")
  if args.diagnose:
    diagnose(roles, sizes)


def diagnose(roles, sizes):
  """Gradient error at initialisation (seed 0) with one role's residuals at 1 or 2 bits
  and all others at 8: how much each role's noise costs on its own."""
  xtr, ytr = load_digits_split(0)[:2]
  params = MODEL.init(jax.random.key(0), xtr[:2])["params"]
  x, y, key = xtr[:BATCH], ytr[:BATCH], jax.random.key(2)
  print("\ngradient error at init, one role at b bits, others at 8 (seed 0):")
  print("| role | elements | 1 bit | 2 bits |")
  print("|---|---|---|---|")
  for role in ROLES:
    n = sum(s for s, r in zip(sizes, roles) if r == role)
    errs = [grad_error(tuple(b if r == role else 8 for r in roles), params, x, y, key)
            for b in (1, 2)]
    print(f"| {role} | {n:,} | {errs[0]:.3f} | {errs[1]:.3f} |")


if __name__ == "__main__":
  main()
