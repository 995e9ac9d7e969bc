"""A Vision Transformer trained in float, then quantized (QAT and PTQ) and served in int8.

    python examples/vit_qat.py                # about 3-4 min on 2 CPU cores
    python examples/vit_qat.py --act-bits 2   # training activations saved in 2 bits

1. Train a small ViT (Flax Linen) on scikit-learn's 8x8 digits with optax, in float.
2. Fine-tune it quantized (QAT): ``jaxq.quantize_model(model, rules)`` wraps the
   unchanged model. W8A8: int8 weights per output channel, int8 activations per tensor.
   W4A4: LSQ 4-bit weights, LSQ+ 4-bit activations (the patch embedding and the head
   keep 8 bits).
3. Or quantize the float model without training (PTQ): calibration only.
4. Serve each quantized model: ``jaxq.calibrate`` records activation ranges,
   ``jaxq.convert`` stores the kernels as int8 / packed int4 ``QArray``s and runs
   int8 x int8 -> int32 matmuls. The served model computes what QAT trained.
5. Print a table; write ``results.json`` and ``curves.png`` to ``--out``.

More modes, seeds, CIFAR-10, device meshes and checkpoints: benchmarks/vit_experiments.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

import jaxq
import jaxq.optim
from jaxq.flax import init_quant_params
from jaxq.flax.ptq import serving_nbytes

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

# ------------------------------------------------------------------------------ data


def digits(seed: int):
  """sklearn's digits: standardized f32[N, 8, 8, 1] images and labels, a stratified
  75 / 25 split: (x_train, y_train, x_test, y_test)."""
  d = load_digits()
  x_train, x_test, y_train, y_test = train_test_split(
      d.images[..., None].astype(np.float32), d.target.astype(np.int32),
      test_size=0.25, stratify=d.target, random_state=seed)
  mean, std = x_train.mean(), x_train.std()
  return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Each image moved by up to one pixel along each axis (zero fill): augmentation."""
  n, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  dy, dx = rng.integers(0, 3, size=(2, n, 1, 1))
  return padded[np.arange(n)[:, None, None], dy + np.arange(h)[:, None], dx + np.arange(w)]


# ----------------------------------------------------------------------------- model


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: attention, then a GELU MLP, each residual."""
  dim: int
  heads: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(name="norm1")(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, name="attention")(y, y)
    y = nn.gelu(nn.Dense(4 * self.dim, name="fc1")(nn.LayerNorm(name="norm2")(x)))
    return x + nn.Dense(self.dim, name="fc2")(y)


class ViT(nn.Module):
  """ViT (Dosovitskiy et al. 2021): 2x2 patches, learned positions, ``depth`` blocks,
  mean pooling. Layer paths, which rules match: "embed", "block_{i}/attention/{query,
  key,value,out}", "block_{i}/fc1", "block_{i}/fc2", "head"."""
  dim: int = 48
  depth: int = 4
  heads: int = 4

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(self.dim, (2, 2), strides=2, name="embed")(images)
    x = x.reshape(x.shape[0], -1, self.dim)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), x.shape[1:])
    for i in range(self.depth):
      x = EncoderBlock(self.dim, self.heads, name=f"block_{i}")(x)
    return nn.Dense(10, name="head")(nn.LayerNorm(name="final_norm")(x).mean(axis=1))


# ---------------------------------------------------------------- quantization rules

W8 = jaxq.QuantSpec(8)  # symmetric, one scale per output channel, straight-through
A8 = jaxq.QuantSpec(8, granularity="tensor", calibration="ema")  # EMA of batch ranges
W4_LSQ = jaxq.QuantSpec(4, estimator="lsq")  # learned step per channel (Esser et al.)
A4_LSQ = jaxq.QuantSpec(4, granularity="tensor", signed=False, symmetric=False,
                        estimator="lsq")  # LSQ+: learned step and zero point
#: mode -> rules; the first rule whose regex matches a layer's path quantizes it.
RULES = {
    "w8a8": [jaxq.Rule(".*", weight=W8, act=A8)],
    "w4a4": [jaxq.Rule("embed|head", weight=W8, act=A8),
             jaxq.Rule(".*", weight=W4_LSQ, act=A4_LSQ)],
    "ptq-w8a8": [jaxq.Rule(".*", weight=W8, act=jaxq.QuantSpec(
        8, granularity="tensor", calibration="percentile", percentile=99.99))],
    "ptq-w4": [jaxq.Rule(".*", weight=jaxq.QuantSpec(4, calibration="mse"))],  # weights only
}


# ------------------------------------------------------------------------- training


def make_optimizer(lr: float, steps: int) -> optax.GradientTransformation:
  """Clipping, then AdamW (warmup + cosine) with weight decay on kernels only; jaxq's
  learned quantizer steps get their own Adam at a tenth of the rate, no decay."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps,
                                                lr / 100)
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      jaxq.optim.quant_aware(
          optax.adamw(schedule, weight_decay=0.05, mask=jaxq.optim.decay_mask),
          optax.adam(lambda step: 0.1 * schedule(step))))


def train(model, variables, data, tx, steps, args, name, first_step=0):
  """Trains ``variables`` (params plus collections such as jaxq's "quant_stats", whose
  observers the model updates) for ``steps`` steps; evaluates after every epoch.
  Returns (variables, result row, history)."""
  x_train, y_train, x_test, y_test = data

  def train_step(params, stats, opt_state, x, y, key):
    def loss_fn(params):  # "jaxq" rngs: stochastic rounding of compressed activations
      logits, stats_update = model.apply({"params": params, **stats}, x, mutable=list(stats),
                                         rngs={"jaxq": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats_update
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  params = jax.tree.map(jnp.copy, variables["params"])  # the step donates its inputs
  stats = {k: v for k, v in variables.items() if k != "params"}
  opt_state, batch, key = tx.init(params), args.batch_size, jax.random.key(args.seed)
  step_fn = jax.jit(train_step, donate_argnums=(0, 1, 2)).lower(
      params, stats, opt_state, x_train[:batch], y_train[:batch], key).compile()
  memory = step_fn.memory_analysis()  # XLA's plan for one step: what it must hold
  test_accuracy = jax.jit(lambda v: accuracy(model.apply(v, x_test), y_test))
  rng = np.random.default_rng(args.seed)
  steps_per_epoch, seconds, losses = len(x_train) // batch, 0.0, []
  history = {"step": [], "loss": [], "test_accuracy": []}
  bar = tqdm(range(steps), desc=f"{name:>9}", unit="step", disable=args.quiet)
  for step in bar:
    if step % steps_per_epoch == 0:
      order = rng.permutation(len(x_train))
    idx = order[step % steps_per_epoch * batch:][:batch]
    t0 = time.perf_counter()
    params, stats, opt_state, loss = step_fn(params, stats, opt_state,
                                             shift(x_train[idx], rng), y_train[idx],
                                             jax.random.fold_in(key, step))
    losses.append(float(loss))
    seconds += time.perf_counter() - t0
    if (step + 1) % steps_per_epoch == 0 or step + 1 == steps:
      acc = float(test_accuracy({"params": params, **stats}))
      history["step"].append(first_step + step + 1)
      history["loss"].append(float(np.mean(losses)))
      history["test_accuracy"].append(acc)
      losses = []
      bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", test_acc=f"{acc:.2f}")
  row = {"test_accuracy": acc, "train_seconds": seconds,
         "train_step_bytes": memory.argument_size_in_bytes + memory.output_size_in_bytes
         + memory.temp_size_in_bytes - memory.alias_size_in_bytes}
  return {"params": params, **stats}, row, history


def accuracy(logits: jax.Array, labels) -> jax.Array:
  return 100.0 * jnp.mean(jnp.argmax(logits, -1) == labels)


def serve(qmodel, variables, data, *, reset: bool) -> dict:
  """Calibrates on 8 training batches and converts to int8 / int4 serving; evaluates.
  PTQ starts the observers empty (``reset``); QAT keeps its trained ranges."""
  x_train, _, x_test, y_test = data
  batches = [x_train[i:i + 64] for i in range(0, 8 * 64, 64)]
  variables = jaxq.calibrate(qmodel, variables, batches, reset=reset)
  serving_model, serving_vars = jaxq.convert(qmodel, variables)
  logits = jax.jit(serving_model.apply)(serving_vars, x_test)
  return {"served_accuracy": float(accuracy(logits, y_test)),
          "serving_bytes": serving_nbytes(serving_vars["params"])}


# ------------------------------------------------------------------ the whole story


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the modes; returns ``{mode: result row}`` (also ``<out>/results.json``)."""
  args = parse_args(argv)
  data = digits(args.seed)
  x_train, _, x_test, _ = data
  model = ViT(args.dim, args.depth, args.heads)
  # --act-bits: every encoder block saves its activations for the backward pass in
  # that many bits (ActNN); the forward pass is unchanged.
  compress = ([] if args.act_bits is None else
              [jaxq.Rule(r"block_\d+", weight=None, act=None, act_compress=args.act_bits)])
  suffix = "" if args.act_bits is None else f"+act{args.act_bits}"
  steps_per_epoch = len(x_train) // args.batch_size

  # 1. Float training from scratch.
  float_model = jaxq.quantize_model(model, compress) if compress else model
  variables = model.init(jax.random.key(args.seed), x_train[:1])
  steps = args.steps or args.epochs * steps_per_epoch
  fp32, row, history = train(float_model, variables, data, make_optimizer(2e-3, steps),
                             steps, args, "fp32" + suffix)
  row.update(served_accuracy=row["test_accuracy"], serving_bytes=serving_nbytes(fp32))
  results, histories = {"fp32" + suffix: row}, {"fp32" + suffix: history}
  ref = row["test_accuracy"]

  for mode in args.modes:
    name = mode if mode.startswith("ptq-") else mode + suffix
    if mode.startswith("ptq-"):  # 3. PTQ: calibrate the float variables, convert, serve.
      t0 = time.perf_counter()
      row = serve(jaxq.quantize_model(model, RULES[mode]), fp32, data, reset=True)
      row.update(test_accuracy=row["served_accuracy"],
                 train_seconds=time.perf_counter() - t0, train_step_bytes=None)
    else:  # 2. QAT: fine-tune the float variables quantized, then 4. serve.
      qmodel = jaxq.quantize_model(model, compress + RULES[mode])
      # LSQ steps from the trained weights, activation observers from one batch.
      start = init_quant_params(qmodel, fp32, x_train[:args.batch_size])
      steps = args.steps or args.finetune_epochs * steps_per_epoch
      trained, row, histories[name] = train(qmodel, start, data, make_optimizer(1e-3, steps),
                                            steps, args, name, history["step"][-1])
      row.update(serve(qmodel, trained, data, reset=False))
    results[name] = row

  # 5. Table, results.json, curves.
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  plot(histories, os.path.join(args.out, "curves.png"))
  print(table(results, ref))
  print(f"wrote {args.out}/results.json and {args.out}/curves.png")
  return results


def table(results: dict, ref: float) -> str:
  """The results as a Markdown table."""
  lines = ["| mode | test acc (%) | vs fp32 | served acc (%) | train (s) | "
           "train step mem (MiB) | serving (KiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
  for mode, r in results.items():
    delta = "" if mode.startswith("fp32") else f"{r['test_accuracy'] - ref:+.2f}"
    mem = r["train_step_bytes"]
    lines.append(f"| {mode} | {r['test_accuracy']:.2f} | {delta} | "
                 f"{r['served_accuracy']:.2f} | {r['train_seconds']:.1f} | "
                 f"{'-' if mem is None else f'{mem / 2**20:.1f}'} | "
                 f"{r['serving_bytes'] / 1024:.1f} |")
  return "\n".join(lines)


def plot(histories: dict, path: str) -> None:
  """Training loss and test accuracy against the step, one line per trained mode."""
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for mode, h in histories.items():
    ax_loss.plot(h["step"], h["loss"], label=mode)
    ax_acc.plot(h["step"], h["test_accuracy"], label=mode)
  ax_loss.set(xlabel="step", ylabel="training cross-entropy", yscale="log")
  final = min(h["test_accuracy"][-1] for h in histories.values())
  ax_acc.set(xlabel="step", ylabel="test accuracy (%)", ylim=(max(0, final - 15), 100))
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--modes", default=",".join(RULES),
                 help=f"after fp32, which always runs: any of {', '.join(RULES)}")
  p.add_argument("--act-bits", type=int, choices=(1, 2, 4, 8), default=None,
                 help="save the training activations of every block in this many bits")
  p.add_argument("--epochs", type=int, default=100, help="float training")
  p.add_argument("--finetune-epochs", type=int, default=60, help="QAT fine-tuning")
  p.add_argument("--steps", type=int, default=None, help="steps per mode (quick runs)")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--dim", type=int, default=48)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="runs/vit_qat")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  args = p.parse_args(argv)
  args.modes = [m for m in args.modes.split(",") if m]
  unknown = [m for m in args.modes if m not in RULES]
  if unknown:
    p.error(f"--modes: unknown {unknown}; choose from {', '.join(RULES)}")
  return args


if __name__ == "__main__":
  main(sys.argv[1:])
