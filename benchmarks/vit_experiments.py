"""The ViT experiment harness: every mode, seed and option behind docs/vit_qat.md, docs/act.md
and benchmarks/RESULTS.md (``examples/vit_qat.py`` is the short showcase of the same run).

    python benchmarks/vit_experiments.py              # digits: fp32,w8a8,w4a4,ptq-w8a8,ptq-w4
    python benchmarks/vit_experiments.py --modes fp32,w8a8,w4a4,w4a8,fqvit
    python benchmarks/vit_experiments.py --dataset cifar10 \
        --data-dir ~/data/cifar-10-batches-py --patch 4 --dim 192 --depth 12 --heads 3
    python benchmarks/vit_experiments.py --eval-only \
        --checkpoint runs/vit_experiments/checkpoints/w8a8
    python benchmarks/vit_experiments.py --modes fp32 --optimizer adamw4   # 4-bit AdamW
    python benchmarks/vit_experiments.py --modes fp32 --act-bits auto      # adaptive ActNN
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python \
        benchmarks/vit_experiments.py --modes w8a8 --mesh data=4,model=2   # a device mesh

A mode is a training mode (fp32, w8a8, w4a8, w4a4, fqvit), optionally with compressed
activations ("+act<bits>", "+actauto": per-block widths from measured gradient
sensitivity), or a post-training mode (ptq-w8a8, ptq-w4). The fp32 mode trains a ViT
(Flax Linen) from scratch with optax (AdamW, linear warmup + cosine decay, global-norm
clipping). Quantized training modes then fine-tune the trained fp32 variables quantized
(``--qat-init scratch`` trains them from the same initialisation as fp32 instead), with
learnable quantizer parameters in their own optimizer group without weight decay; PTQ
modes calibrate and convert the fp32 variables.

Writes to ``--out`` (default ``runs/vit_experiments``): ``results.json``, ``curves.png``
(loss and test accuracy per mode) and one checkpoint per mode under
``checkpoints/<mode>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxq
from jaxq import optim as jaxq_optim
from jaxq import sharding as jaxq_sharding
from jaxq.flax import init_quant_params, ptq
from jaxq.flax.linen import QuantizedModel

# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train/test images (f32[N, H, W, C], standardized) and integer labels."""

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


def _standardize(x_train: np.ndarray, x_test: np.ndarray):
  """Per-channel mean/std of the training images, applied to both splits."""
  mean = x_train.mean(axis=(0, 1, 2), keepdims=True)
  std = x_train.std(axis=(0, 1, 2), keepdims=True)
  return (x_train - mean) / std, (x_test - mean) / std


def load_digits(seed: int, test_fraction: float = 0.25) -> Dataset:
  """scikit-learn's 8x8 grayscale digits (1797 images, shipped with the package).

  A seeded, stratified split: ``test_fraction`` of each class goes to the test set.
  """
  from sklearn.datasets import load_digits as sk_load_digits  # pylint: disable=import-outside-toplevel
  d = sk_load_digits()
  x = d.images.astype(np.float32)[..., None] / 16.0
  y = d.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  test = np.zeros(len(y), bool)
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    test[idx[:int(round(len(idx) * test_fraction))]] = True
  x_train, x_test = _standardize(x[~test], x[test])
  return Dataset("digits", x_train, y[~test], x_test, y[test], 10)


CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def load_cifar10(data_dir: str | None) -> Dataset:
  """CIFAR-10 from its standard python-pickle files (``cifar-10-batches-py``).

  ``data_dir`` is that directory or its parent. Nothing is downloaded.
  """
  if not data_dir:
    raise ValueError(
        "--dataset cifar10 needs --data-dir: the directory holding the CIFAR-10 python "
        f"batches ({', '.join(CIFAR10_FILES)}), e.g. cifar-10-batches-py")
  candidates = [data_dir, os.path.join(data_dir, "cifar-10-batches-py")]
  root = next((c for c in candidates
               if all(os.path.isfile(os.path.join(c, f)) for f in CIFAR10_FILES)), None)
  if root is None:
    missing = [f for f in CIFAR10_FILES if not os.path.isfile(os.path.join(data_dir, f))]
    raise FileNotFoundError(
        f"CIFAR-10 files not found in --data-dir {data_dir!r} (nor in its "
        f"cifar-10-batches-py subdirectory); missing: {', '.join(missing)}. Download the "
        "'CIFAR-10 python version' from https://www.cs.toronto.edu/~kriz/cifar.html and "
        "extract it there.")

  def read(name):
    with open(os.path.join(root, name), "rb") as f:
      batch = pickle.load(f, encoding="bytes")
    x = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x.astype(np.float32) / 255.0, np.asarray(batch[b"labels"], np.int32)

  train = [read(f) for f in CIFAR10_FILES[:-1]]
  x_test, y_test = read(CIFAR10_FILES[-1])
  x_train = np.concatenate([x for x, _ in train])
  y_train = np.concatenate([y for _, y in train])
  x_train, x_test = _standardize(x_train, x_test)
  return Dataset("cifar10", x_train, y_train, x_test, y_test, 10)


def load_dataset(name: str, data_dir: str | None, seed: int) -> Dataset:
  if name == "digits":
    return load_digits(seed)
  if name == "cifar10":
    return load_cifar10(data_dir)
  raise ValueError(f"--dataset must be one of 'digits', 'cifar10'; got {name!r}")


def augment(x: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
  """Random translation by up to ``max_shift`` pixels (zero padding) and, for images
  wider than 8 pixels, random horizontal flips (digits are not flip-invariant)."""
  if max_shift == 0:
    return x
  n, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
  rows = dy[:, None] + np.arange(h)[None, :]
  cols = dx[:, None] + np.arange(w)[None, :]
  out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  if w > 8:
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
  return out


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  patch: int = 2
  dim: int = 48
  depth: int = 4
  heads: int = 4
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  num_classes: int = 10


class Mlp(nn.Module):
  hidden: int
  dim: int

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(self.hidden, name="fc1")(x))
    return nn.Dense(self.dim, name="fc2")(x)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block."""

  dim: int
  heads: int
  mlp_hidden: int
  dropout: float

  @nn.compact
  def __call__(self, x, train: bool):
    drop = nn.Dropout(self.dropout, deterministic=not train)
    y = nn.LayerNorm(name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.heads, qkv_features=self.dim, dropout_rate=self.dropout,
        deterministic=not train, name="attention")(y, y)
    x = x + drop(y)
    return x + drop(Mlp(self.mlp_hidden, self.dim, name="mlp")(nn.LayerNorm(name="norm2")(x)))


class ViT(nn.Module):
  """Vision Transformer (Dosovitskiy et al. 2021): patch embedding, learned position
  embedding, ``depth`` pre-LN encoder blocks, final LayerNorm, mean pooling, linear head.

  Module paths (what quantization rules match): "embed", "block_{i}/norm1",
  "block_{i}/attention" (``nn.MultiHeadDotProductAttention``, whose softmax FQ-ViT's log2
  rule quantizes) with its DenseGeneral layers "block_{i}/attention/{query,key,value,out}",
  "block_{i}/norm2", "block_{i}/mlp/{fc1,fc2}", "final_norm", "head".
  """

  config: ViTConfig

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = self.config
    x = nn.Conv(c.dim, (c.patch, c.patch), strides=(c.patch, c.patch), padding="VALID",
                name="embed")(x)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w, d))
    for i in range(c.depth):
      x = EncoderBlock(c.dim, c.heads, int(c.dim * c.mlp_ratio), c.dropout,
                       name=f"block_{i}")(x, train)
    x = nn.LayerNorm(name="final_norm")(x).mean(axis=1)
    return nn.Dense(c.num_classes, name="head")(x)


def check_config(config: ViTConfig, image_shape: Sequence[int]) -> None:
  h, w, _ = image_shape
  if h % config.patch or w % config.patch:
    raise ValueError(f"--patch {config.patch} must divide the image size {h}x{w}")
  if config.dim % config.heads:
    raise ValueError(f"--dim {config.dim} must be divisible by --heads {config.heads}")


# ----------------------------------------------------------------------------------------
# Modes: which jaxq rules make the float ViT a quantized one
# ----------------------------------------------------------------------------------------

#: 8-bit weights: symmetric, one scale per output channel, straight-through estimator.
W8 = jaxq.QuantSpec(bits=8)
#: 8-bit activations: symmetric per tensor, range from an EMA of the batch min/max
#: (observer in the "quant_stats" collection; W8A8 matmuls then run on int8 operands).
A8 = jaxq.QuantSpec(bits=8, granularity="tensor", calibration="ema")
#: 4-bit weights with LSQ's learned step size per output channel (Esser et al. 2020).
W4_LSQ = jaxq.QuantSpec(bits=4, estimator="lsq")
#: 4-bit activations: LSQ+ (Bhalgat et al. 2020), a learned step and zero point.
A4_LSQ = jaxq.QuantSpec(bits=4, granularity="tensor", symmetric=False, signed=False,
                        estimator="lsq")
#: The patch embedding and the classifier head keep 8 bits in the 4-bit modes (as in LSQ).
EDGES = r"embed|head"
#: FQ-ViT (Lin et al. 2022): power-of-two-factor LayerNorm inputs, 4-bit log2 softmax.
PTF8 = jaxq.QuantSpec(bits=8, scheme="ptf", signed=False, symmetric=False)
LOG2_4 = jaxq.QuantSpec(bits=4, scheme="log2", signed=False)

#: Post-training quantization of the fp32 run: activation ranges from training batches.
A8_PTQ = jaxq.QuantSpec(bits=8, granularity="tensor", calibration="percentile",
                        percentile=99.99)
#: Weight-only 4 bits per output channel, clipping range by MSE search.
W4_PTQ = jaxq.QuantSpec(bits=4, calibration="mse")

#: Training modes: name -> quantization rules (first match wins; None: the float model).
QAT_MODES: dict[str, tuple[jaxq.Rule, ...] | None] = {
    "fp32": None,
    "w8a8": (jaxq.Rule(".*", weight=W8, act=A8),),
    "w4a8": (jaxq.Rule(EDGES, weight=W8, act=A8), jaxq.Rule(".*", weight=W4_LSQ, act=A8)),
    "w4a4": (jaxq.Rule(EDGES, weight=W8, act=A8),
             jaxq.Rule(".*", weight=W4_LSQ, act=A4_LSQ)),
    "fqvit": (jaxq.Rule(r"block_\d+/norm[12]|final_norm", weight=None, act=PTF8),
              jaxq.Rule(r"block_\d+/attention", weight=None, act=LOG2_4),
              jaxq.Rule(".*", weight=W8, act=A8)),
}
#: Post-training modes: the trained fp32 variables, calibrated and converted for serving.
PTQ_MODES: dict[str, tuple[jaxq.Rule, ...]] = {
    "ptq-w8a8": (jaxq.Rule(".*", weight=W8, act=A8_PTQ),),
    "ptq-w4": (jaxq.Rule(".*", weight=W4_PTQ),),
}
#: A training mode may carry "+act<bits>": its encoder blocks are run through
#: ``jaxq.act.compressed_vjp`` (``Rule(act_compress=bits)``), which saves the activations
#: the backward pass needs in ``bits`` bits (ActNN). "+actauto": per-block widths from
#: ``jaxq.act.AdaptiveBits`` under an average of ``--act-avg-bits``.
ACT_BITS = (1, 2, 4, 8)
AUTO = "auto"
BLOCKS = r"block_\d+"


def split_mode(mode: str) -> tuple[str, int | str | None]:
  """``"w8a8+act2"`` -> ``("w8a8", 2)``; ``"w8a8+actauto"`` -> ``("w8a8", "auto")``;
  ``"w8a8"`` -> ``("w8a8", None)``."""
  base, sep, act = mode.partition("+act")
  if not sep and (base in PTQ_MODES or base in QAT_MODES):
    return base, None
  if base in QAT_MODES and act == AUTO:
    return base, AUTO
  if base in QAT_MODES and act in map(str, ACT_BITS):
    return base, int(act)
  raise ValueError(
      f"--modes: unknown mode {mode!r}; use one of {', '.join(QAT_MODES)} (optionally "
      f"with +act{{{','.join(map(str, ACT_BITS))},{AUTO}}}, e.g. w8a8+act2) or "
      f"{', '.join(PTQ_MODES)}")


def parse_modes(text: str, act_bits: int | str | None = None,
                fine_tune: bool = False) -> list[str]:
  """The modes of ``--modes``, checked; ``act_bits`` adds "+act<bits>" to training modes.
  PTQ modes (and, with ``fine_tune``, quantized training modes) start from the fp32 run,
  which is added first when not listed."""
  modes = [m.strip() for m in text.split(",") if m.strip()]
  if not modes:
    raise ValueError(f"--modes must not be empty; got {text!r}")
  if act_bits is not None:
    modes = [m if m in PTQ_MODES or "+act" in m else f"{m}+act{act_bits}" for m in modes]
  for m in modes:
    split_mode(m)
  needed = {float_source(m, modes) for m in modes
            if m in PTQ_MODES or fine_tunes(m, fine_tune)}
  # Float runs go first: other modes start from them.
  return list(dict.fromkeys(sorted(needed) + modes))


def float_source(mode: str, modes: Sequence[str]) -> str:
  """The float run a PTQ or fine-tuned ``mode`` starts from: "fp32+act<b>" for a
  "<base>+act<b>" mode when that run is listed, else "fp32"."""
  act = split_mode(mode)[1]
  same = f"fp32+act{act}"
  return same if act is not None and same in modes else "fp32"


def mode_rules(mode: str, block_bits: Mapping[str, int] | None = None
               ) -> tuple[jaxq.Rule, ...] | None:
  """The rules of ``mode``; None for the float model. "+actauto" modes compress block
  ``name`` at ``block_bits[name]`` bits (blocks absent from it stay uncompressed)."""
  base, act_bits = split_mode(mode)
  rules = PTQ_MODES[base] if base in PTQ_MODES else QAT_MODES[base]
  if act_bits is None:
    return rules
  if act_bits == AUTO:
    compress = tuple(jaxq.Rule(name, weight=None, act=None, act_compress=b)
                     for name, b in sorted((block_bits or {}).items()))
  else:
    compress = (jaxq.Rule(BLOCKS, weight=None, act=None, act_compress=act_bits),)
  return compress + (rules or ())


def build_model(mode: str, config: ViTConfig,
                block_bits: Mapping[str, int] | None = None) -> nn.Module:
  """The Linen module trained in ``mode`` (PTQ modes: calibrated, then converted): the
  float ViT, or the float ViT wrapped by ``jaxq.quantize_model`` with the mode's rules
  (``block_bits``: see :func:`mode_rules`)."""
  model = ViT(config)
  rules = mode_rules(mode, block_bits)
  if rules is None:
    return model
  return jaxq.quantize_model(model, rules)


# ----------------------------------------------------------------------------------------
# Optimizer, train step, evaluation
# ----------------------------------------------------------------------------------------


#: ``--optimizer`` -> bits of the AdamW moments (None: optax.adamw's float32 moments).
OPTIMIZERS = {"adamw": None, "adamw8": 8, "adamw4": 4}


def make_optimizer(*, lr: float, weight_decay: float, warmup_steps: int,
                   total_steps: int, clip_norm: float, quant_lr_scale: float,
                   optimizer: str = "adamw") -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with linear warmup to ``lr`` and cosine decay to
  ``lr / 100``. Weight decay only on kernels and embeddings (rank >= 2); jaxq's learned
  quantizer steps (``jaxq_*`` params) in their own group (``jaxq.optim.quant_aware``):
  Adam at ``quant_lr_scale * lr``, no decay. ``optimizer`` "adamw8" / "adamw4": AdamW
  with 8-bit / 4-bit block-wise quantized moments (``jaxq.optim.adamw``)."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, min(warmup_steps, max(total_steps - 1, 0)), max(total_steps, 1), lr / 100)
  if OPTIMIZERS[optimizer] is None:
    float_tx = optax.adamw(schedule, weight_decay=weight_decay,
                           mask=jaxq_optim.decay_mask)
  else:
    float_tx = jaxq_optim.adamw(schedule, weight_decay=weight_decay,
                                mask=jaxq_optim.decay_mask,
                                state_bits=OPTIMIZERS[optimizer])
  quant_tx = optax.adam(lambda step: quant_lr_scale * schedule(step))
  return optax.chain(optax.clip_by_global_norm(clip_norm),
                     jaxq_optim.quant_aware(float_tx, quant_tx))


@struct.dataclass
class TrainState:
  params: Any
  collections: Any  # non-parameter variables, e.g. jaxq's "quant_stats"
  opt_state: Any


def init_state(model: nn.Module, tx: optax.GradientTransformation, x0: jax.Array,
               seed: int) -> TrainState:
  """Parameters (and quantizer state, initialised from the batch ``x0``) and optimizer
  state."""
  return _state(model.init(jax.random.key(seed), x0, train=False), tx)


def state_from(model: nn.Module, tx: optax.GradientTransformation, variables,
               x0: jax.Array) -> TrainState:
  """The state of ``model`` starting from trained float ``variables``: quantizer parameters
  (LSQ steps from the trained weights) and observers initialised from the batch ``x0``.
  The arrays are copies: the train step donates its state, and ``variables`` lives on."""
  variables = jax.tree.map(jnp.copy, variables)
  if isinstance(model, QuantizedModel):
    variables = init_quant_params(model, variables, x0, train=False)
  return _state(variables, tx)


def _state(variables, tx: optax.GradientTransformation) -> TrainState:
  params = variables["params"]
  collections = {k: v for k, v in variables.items() if k != "params"}
  return TrainState(params, collections, tx.init(params))


def shard_state(state: TrainState, tx: optax.GradientTransformation,
                mesh: Mesh) -> TrainState:
  """Places the state on ``mesh``: kernels split over "model" (output features), the
  optimizer moments with their parameters, other collections (observer statistics)
  replicated, so observers see the global batch (docs/scaling.md)."""
  param_sh = jaxq_sharding.param_shardings(state.params, mesh)
  return TrainState(
      jax.device_put(state.params, param_sh),
      jax.device_put(state.collections, NamedSharding(mesh, PartitionSpec())),
      jax.device_put(state.opt_state,
                     jaxq_sharding.opt_state_shardings(tx, state.params, param_sh)))


def place_batch(mesh: Mesh | None, *arrays: np.ndarray) -> tuple:
  """The arrays split over the mesh's "data" axis (as they are without a mesh)."""
  if mesh is None:
    return arrays
  return tuple(jax.device_put(a, jaxq_sharding.batch_sharding(mesh, a.ndim)) for a in arrays)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    label_smoothing: float = 0.0, state_shardings: Any = None):
  """One jitted step: cross-entropy loss (with label smoothing), gradients, optimizer
  update; non-parameter collections (observer statistics) updated as the model reports.
  ``state_shardings`` pins the new state's layout to the old one's (on a mesh)."""

  def train_step(state: TrainState, x, y, key):
    mutable = list(state.collections)
    k_drop, k_quant = jax.random.split(key)

    def loss_fn(params):
      logits, updates = model.apply({"params": params, **state.collections}, x, train=True,
                                    mutable=mutable, rngs={"dropout": k_drop, "jaxq": k_quant})
      targets = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), label_smoothing)
      loss = optax.softmax_cross_entropy(logits, targets).mean()
      return loss, (updates, jnp.mean(jnp.argmax(logits, -1) == y))

    (loss, (updates, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    deltas, opt_state = tx.update(grads, state.opt_state, state.params)
    state = TrainState(optax.apply_updates(state.params, deltas),
                       {**state.collections, **updates}, opt_state)
    return state, {"loss": loss, "accuracy": acc}

  return jax.jit(train_step, donate_argnums=0, out_shardings=(state_shardings, None))


def make_eval_step(model: nn.Module):
  """Jitted: summed loss and number of correct predictions over the examples with
  ``mask`` set (the padding of a last, partial batch is masked out)."""

  def eval_step(variables, x, y, mask):
    logits = model.apply(variables, x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(loss * mask), jnp.sum((jnp.argmax(logits, -1) == y) * mask)

  return jax.jit(eval_step)


def evaluate(eval_step, variables, x: np.ndarray, y: np.ndarray,
             batch_size: int) -> tuple[float, float]:
  """Mean loss and accuracy (percent) over the whole set; every example counts once."""
  loss, correct = 0.0, 0
  for start in range(0, len(x), batch_size):
    xb, yb = x[start:start + batch_size], y[start:start + batch_size]
    n, pad = len(xb), batch_size - len(xb)
    mask = np.arange(batch_size) < n
    if pad:  # one compiled shape for every batch
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
    l, c = eval_step(variables, xb, yb, mask.astype(np.float32))
    loss += float(l)
    correct += int(c)
  return loss / len(x), 100.0 * correct / len(x)


def memory_estimate(compiled) -> int | None:
  """Peak bytes of one compiled step as XLA plans it: arguments + outputs + temporaries,
  minus donated (aliased) buffers. None where the backend reports nothing."""
  try:
    m = compiled.memory_analysis()
  except (AttributeError, NotImplementedError):
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def calibration_batches(data: Dataset, args: argparse.Namespace) -> list[tuple]:
  """The first ``--calibration-batches`` training batches (no augmentation), 1-tuples."""
  bs = min(args.batch_size, len(data.x_train))
  n = min(args.calibration_batches, len(data.x_train) // bs)
  return [(data.x_train[i * bs:(i + 1) * bs],) for i in range(n)]


def to_serving(qmodel: QuantizedModel, variables, batches: list[tuple], *, reset: bool):
  """``jaxq.calibrate`` then ``jaxq.convert``: ``(serving_model, serving_variables)``.

  PTQ starts the observers empty (``reset=True``); a QAT model keeps its trained EMA
  ranges (``reset=False``) and calibration adds what only serving needs (FQ-ViT's PTF
  LayerNorm factors, the kernels' layouts)."""
  variables = ptq.calibrate(qmodel, variables, batches, reset=reset, train=False)
  return ptq.convert(qmodel, variables)


def serve_and_evaluate(qmodel: QuantizedModel, variables, data: Dataset,
                       args: argparse.Namespace, *, reset: bool) -> dict:
  """Converts for serving (int8 matmuls, packed int4 weights) and evaluates."""
  serving_model, serving_vars = to_serving(qmodel, variables, calibration_batches(data, args),
                                           reset=reset)
  loss, acc = evaluate(make_eval_step(serving_model), serving_vars, data.x_test,
                       data.y_test, args.eval_batch_size)
  return {"served_accuracy": acc, "served_loss": loss,
          "serving_bytes": ptq.serving_nbytes(serving_vars["params"])}


def ptq_mode(mode: str, args: argparse.Namespace, data: Dataset, config: ViTConfig,
             fp32_variables) -> tuple[dict, Any]:
  """Post-training quantization of the trained fp32 variables; returns (result row,
  calibrated variables)."""
  qmodel = build_model(mode, config)
  t0 = time.perf_counter()
  variables = ptq.calibrate(qmodel, fp32_variables, calibration_batches(data, args),
                            train=False)
  seconds = time.perf_counter() - t0
  served = serve_and_evaluate(qmodel, variables, data, args, reset=False)
  row = {"test_accuracy": served["served_accuracy"], "test_loss": served["served_loss"],
         "train_seconds": seconds, "steps": 0, "peak_memory_bytes": None, **served}
  return row, variables


# ----------------------------------------------------------------------------------------
# Training one mode
# ----------------------------------------------------------------------------------------


class BlockBits:
  """Per-block activation widths of a "+actauto" mode (ActNN's ``calc_precision``).

  Every ``--act-interval`` steps, :meth:`update` measures each encoder block's
  sensitivity as GACT does (``jaxq.act.sensitivity_from_gradients``): the mean squared
  change of the parameter gradient when only that block's activations are compressed, over
  2 rounding keys, against the uncompressed gradient of the same batch; then
  ``jaxq.act.AdaptiveBits`` spends ``--act-avg-bits`` per element where it lowers the
  gradient variance most. The blocks are identical, so each holds the same number of
  compressed elements. The measurement width is the widest choice within the average
  (2 bits at the default average): the ``C / (2^b - 1)^2`` model extrapolates poorly to
  narrower widths, because 1-bit noise compounds along the backward pass (see
  ``jaxq.act.adaptive``).
  """

  def __init__(self, mode: str, config: ViTConfig, args: argparse.Namespace):
    self.mode, self.config = mode, config
    self.names = [f"block_{i}" for i in range(config.depth)]
    self.adaptive = jaxq.act.AdaptiveBits(self.names, avg_bits=args.act_avg_bits,
                                          choices=args.act_choices,
                                          interval=args.act_interval)
    self.probe_bits = max(b for b in self.adaptive.choices if b <= args.act_avg_bits)
    self.label_smoothing = args.label_smoothing
    self.history: list[dict] = []  # {"step", "bits", "sensitivity"} per measurement
    self._grads: dict = {}  # jitted gradient per compressed block (None: uncompressed)

  @property
  def bits(self) -> dict[str, int]:
    return dict(self.adaptive.bits)

  def due(self, step: int) -> bool:
    return self.adaptive.due(step)

  def _grad_fn(self, block: str | None):
    if block not in self._grads:
      model = build_model(self.mode, self.config,
                          None if block is None else {block: self.probe_bits})

      def loss(params, collections, x, y, dropout_key, key):
        logits, _ = model.apply({"params": params, **collections}, x, train=True,
                                mutable=list(collections),
                                rngs={"dropout": dropout_key, "jaxq": key})
        targets = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]),
                                      self.label_smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean()

      grad = jax.grad(loss)
      self._grads[block] = jax.jit(jax.vmap(grad, in_axes=(None,) * 5 + (0,)))
    return self._grads[block]

  def update(self, state: TrainState, x, y, key: jax.Array, step: int) -> dict[str, int]:
    """Measures every block on the batch ``(x, y)`` at ``step``; returns the new widths.
    One dropout mask serves every measurement, so only the rounding noise differs."""
    dropout_key, key = jax.random.split(key)
    keys = jax.random.split(key, 2)
    args = (state.params, state.collections, x, y, dropout_key)
    reference = jax.tree.map(lambda g: g[0], self._grad_fn(None)(*args, keys[:1]))
    sensitivity = {name: float(jaxq.act.sensitivity_from_gradients(
        self._grad_fn(name)(*args, keys), reference, self.probe_bits))
        for name in self.names}
    bits = self.adaptive.update_sensitivity(sensitivity, dict.fromkeys(self.names, 1.0))
    self.history.append({"step": step, "bits": dict(bits), "sensitivity": sensitivity})
    return dict(bits)


def fine_tunes(mode: str, fine_tune: bool) -> bool:
  """Whether training ``mode`` starts from the trained fp32 variables: with ``fine_tune``
  (``--qat-init fp32``) every quantized training mode does; fp32 itself (with or without
  "+act") trains from scratch."""
  return fine_tune and split_mode(mode)[0] not in ("fp32", *PTQ_MODES)


def train_mode(mode: str, args: argparse.Namespace, data: Dataset, config: ViTConfig,
               mesh: Mesh | None = None, init_from: Any = None,
               step_offset: int = 0) -> tuple[dict, Any, dict]:
  """Trains ``mode`` (on ``mesh`` if given) from scratch, or, given the float variables
  ``init_from``, fine-tunes them quantized for ``--finetune-epochs`` at ``--finetune-lr``
  (their quantizer state initialised from the first batch by
  ``jaxq.flax.init_quant_params``). History steps count from ``step_offset``. Returns
  (result row, variables, history)."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  adaptive = BlockBits(mode, config, args) if split_mode(mode)[1] == AUTO else None
  model = build_model(mode, config, adaptive and adaptive.bits)
  n = len(data.x_train)
  batch_size = min(args.batch_size, n)
  steps_per_epoch = n // batch_size
  epochs, lr = (args.epochs, args.lr) if init_from is None else (args.finetune_epochs,
                                                                 args.finetune_lr)
  total_steps = args.steps or epochs * steps_per_epoch
  eval_every = args.eval_every or steps_per_epoch
  tx = make_optimizer(
      lr=lr, weight_decay=args.weight_decay,
      warmup_steps=min(args.warmup_steps, total_steps // 10),
      total_steps=total_steps, clip_norm=args.clip_norm, quant_lr_scale=args.quant_lr_scale,
      optimizer=args.optimizer)
  x0 = jnp.asarray(data.x_train[:batch_size])
  if init_from is None:
    state = init_state(model, tx, x0, args.seed)
  else:
    state = state_from(model, tx, init_from, x0)
  if mesh is not None:
    state = shard_state(state, tx, mesh)
  key, probe_key = jax.random.key(args.seed + 1), jax.random.key(args.seed + 2)
  xb0, yb0 = place_batch(mesh, data.x_train[:batch_size], data.y_train[:batch_size])
  state_shardings = None if mesh is None else jax.tree.map(lambda a: a.sharding, state)

  def compile_step(model):
    return make_train_step(model, tx, args.label_smoothing, state_shardings).lower(
        state, xb0, yb0, key).compile()

  compiled = compile_step(model)
  eval_step = make_eval_step(model)
  rng = np.random.default_rng(args.seed)
  history = {"step": [], "train_loss": [], "test_loss": [], "test_accuracy": []}
  train_seconds, running, perm = 0.0, [], None
  bar = tqdm(range(total_steps), desc=f"{mode:>8}", unit="step", dynamic_ncols=True,
             disable=args.quiet)
  for step in bar:
    t0 = time.perf_counter()
    i = step % steps_per_epoch
    if i == 0:
      perm = rng.permutation(n)
    idx = perm[i * batch_size:(i + 1) * batch_size]
    xb, yb = place_batch(mesh, augment(data.x_train[idx], rng, args.augment_shift),
                         data.y_train[idx])
    if adaptive is not None and adaptive.due(step):
      before = adaptive.bits
      if adaptive.update(state, xb, yb, jax.random.fold_in(probe_key, step), step) != before:
        compiled = compile_step(build_model(mode, config, adaptive.bits))
    state, metrics = compiled(state, xb, yb, jax.random.fold_in(key, step))
    running.append(float(metrics["loss"]))
    train_seconds += time.perf_counter() - t0
    if (step + 1) % eval_every == 0 or step + 1 == total_steps:
      variables = {"params": state.params, **state.collections}
      test_loss, test_acc = evaluate(eval_step, variables, data.x_test, data.y_test,
                                     args.eval_batch_size)
      history["step"].append(step_offset + step + 1)
      history["train_loss"].append(float(np.mean(running)))
      history["test_loss"].append(test_loss)
      history["test_accuracy"].append(test_acc)
      running = []
      bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}", test_acc=f"{test_acc:.2f}")
  bar.close()
  variables = {"params": state.params, **state.collections}
  row = {
      "test_accuracy": history["test_accuracy"][-1],
      "test_loss": history["test_loss"][-1],
      "train_seconds": train_seconds,
      "steps": total_steps,
      "peak_memory_bytes": memory_estimate(compiled),
  }
  if adaptive is not None:
    row["act_bits"] = adaptive.history
  if isinstance(model, QuantizedModel):
    row.update(serve_and_evaluate(model, variables, data, args, reset=False))
  else:
    row.update(served_accuracy=row["test_accuracy"], served_loss=row["test_loss"],
               serving_bytes=ptq.serving_nbytes(variables["params"]))
  return row, variables, history


# ----------------------------------------------------------------------------------------
# Checkpoints, results, plot
# ----------------------------------------------------------------------------------------


def save_checkpoint(path: str, variables, meta: dict) -> None:
  """``variables.msgpack`` (flax.serialization: the trained variables, for PTQ modes the
  calibrated ones) and ``meta.json`` (what rebuilds the model: mode, ViT config, dataset,
  seed)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "variables.msgpack"), "wb") as f:
    f.write(serialization.to_bytes(jax.device_get(variables)))
  with open(os.path.join(path, "meta.json"), "w") as f:
    json.dump(meta, f, indent=2)


def load_checkpoint(path: str) -> tuple[nn.Module, Any, dict]:
  """The model and variables of a checkpoint written by :func:`save_checkpoint`."""
  meta_path = os.path.join(path, "meta.json")
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(
        f"--checkpoint {path!r} is not a checkpoint of this program (no meta.json); "
        "pass a directory <out>/checkpoints/<mode>")
  with open(meta_path) as f:
    meta = json.load(f)
  model = build_model(meta["mode"], ViTConfig(**meta["config"]))
  with open(os.path.join(path, "variables.msgpack"), "rb") as f:
    variables = serialization.msgpack_restore(f.read())
  return model, variables, meta


def plot_curves(histories: dict[str, dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for mode, h in histories.items():
    ax_loss.plot(h["step"], h["train_loss"], label=f"{mode} train")
    ax_loss.plot(h["step"], h["test_loss"], "--", color=ax_loss.lines[-1].get_color(),
                 label=f"{mode} test")
    ax_acc.plot(h["step"], h["test_accuracy"], label=mode)
  ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
  ax_acc.set(xlabel="step", ylabel="test accuracy (%)", title="test accuracy")
  ax_acc.set_ylim(bottom=max(0.0, min(min(h["test_accuracy"]) for h in histories.values())))
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def format_table(results: dict[str, dict]) -> str:
  """The comparison table as Markdown."""
  ref = results.get("fp32", {}).get("test_accuracy")
  lines = ["| mode | test acc (%) | vs fp32 | served acc (%) | train (s) | "
           "train step mem (MiB) | serving (KiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
  for mode, r in results.items():
    delta = "" if ref is None or mode == "fp32" else f"{r['test_accuracy'] - ref:+.2f}"
    mem = r["peak_memory_bytes"]
    lines.append(
        f"| {mode} | {r['test_accuracy']:.2f} | {delta} | {r['served_accuracy']:.2f} | "
        f"{r['train_seconds']:.1f} | {'-' if mem is None else f'{mem / 2**20:.1f}'} | "
        f"{r['serving_bytes'] / 1024:.1f} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--modes", default="fp32,w8a8,w4a4,ptq-w8a8,ptq-w4",
                 help=f"comma-separated; training modes {', '.join(QAT_MODES)} (each "
                 "optionally +act<bits>, e.g. w8a8+act2), post-training modes "
                 f"{', '.join(PTQ_MODES)} (from the fp32 run)")
  p.add_argument("--act-bits", default=None, choices=[*map(str, ACT_BITS), AUTO],
                 help="compress the saved activations of every training mode's encoder "
                 "blocks to this many bits (ActNN; adds +act<bits> to each mode); auto: "
                 "per-block widths from measured gradient sensitivity (jaxq.act."
                 "AdaptiveBits) at an average of --act-avg-bits")
  p.add_argument("--act-avg-bits", type=float, default=3.0,
                 help="+actauto: average bits per compressed activation element")
  p.add_argument("--act-choices", default="2,4,8",
                 help="+actauto: the widths to choose from (1 bit is allowed, but its "
                 "noise compounds along the backward pass: see jaxq.act.adaptive)")
  p.add_argument("--act-interval", type=int, default=500,
                 help="+actauto: steps between sensitivity measurements")
  p.add_argument("--calibration-batches", type=int, default=8,
                 help="training batches for PTQ calibration and serving conversion")
  p.add_argument("--dataset", default="digits", choices=("digits", "cifar10"))
  p.add_argument("--data-dir", default=None,
                 help="CIFAR-10: the cifar-10-batches-py directory (or its parent)")
  p.add_argument("--out", default="runs/vit_experiments", help="output directory")
  p.add_argument("--seed", type=int, default=0)
  m = p.add_argument_group("model")
  m.add_argument("--patch", type=int, default=2)
  m.add_argument("--dim", type=int, default=48)
  m.add_argument("--depth", type=int, default=4)
  m.add_argument("--heads", type=int, default=4)
  m.add_argument("--mlp-ratio", type=float, default=4.0)
  m.add_argument("--dropout", type=float, default=0.0)
  t = p.add_argument_group("training")
  t.add_argument("--epochs", type=int, default=100)
  t.add_argument("--steps", type=int, default=None,
                 help="steps per mode (overrides --epochs and --finetune-epochs)")
  t.add_argument("--qat-init", default="fp32", choices=("fp32", "scratch"),
                 help="quantized training modes fine-tune the fp32 run (the usual QAT "
                 "recipe) or train from scratch like fp32")
  t.add_argument("--finetune-epochs", type=int, default=60)
  t.add_argument("--finetune-lr", type=float, default=1e-3)
  t.add_argument("--batch-size", type=int, default=64)
  t.add_argument("--eval-batch-size", type=int, default=256)
  t.add_argument("--eval-every", type=int, default=None, help="steps (default: one epoch)")
  t.add_argument("--lr", type=float, default=2e-3)
  t.add_argument("--weight-decay", type=float, default=0.05)
  t.add_argument("--optimizer", default="adamw", choices=tuple(OPTIMIZERS),
                 help="AdamW with float32 / 8-bit / 4-bit moments (jaxq.optim.adamw)")
  t.add_argument("--warmup-steps", type=int, default=100)
  t.add_argument("--quant-lr-scale", type=float, default=0.1,
                 help="learning rate of learned quantizer steps, relative to --lr")
  t.add_argument("--label-smoothing", type=float, default=0.0)
  t.add_argument("--clip-norm", type=float, default=1.0)
  t.add_argument("--augment-shift", type=int, default=1,
                 help="random translation in pixels (0: no augmentation)")
  p.add_argument("--eval-only", action="store_true",
                 help="evaluate --checkpoint on its dataset's test set and exit")
  p.add_argument("--checkpoint", default=None, help="a directory <out>/checkpoints/<mode>")
  p.add_argument("--mesh", default=None,
                 help="train on a device mesh data=N,model=M (N*M devices; see docs/scaling.md)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  args = p.parse_args(argv)
  if args.eval_only and not args.checkpoint:
    p.error("--eval-only needs --checkpoint PATH")
  if args.act_bits not in (None, AUTO):
    args.act_bits = int(args.act_bits)
  try:
    args.act_choices = tuple(int(b) for b in args.act_choices.split(","))
  except ValueError:
    p.error(f"--act-choices must be comma-separated widths from {ACT_BITS}, "
            f"got {args.act_choices!r}")
  if not args.act_choices or not set(args.act_choices) <= set(ACT_BITS):
    p.error(f"--act-choices must be widths from {ACT_BITS}, got {args.act_choices}")
  if args.act_avg_bits < min(args.act_choices):
    p.error(f"--act-avg-bits must be >= the narrowest of --act-choices "
            f"({min(args.act_choices)}), got {args.act_avg_bits}")
  for name in ("epochs", "finetune_epochs", "act_interval", "batch_size", "eval_batch_size",
               "calibration_batches"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.steps is not None and args.steps < 1:
    p.error("--steps must be >= 1")
  return args


def eval_only(args: argparse.Namespace) -> dict:
  """Evaluates a checkpoint as the run reported it: training modes as trained (float or
  fake-quantized), PTQ modes converted for serving."""
  model, variables, meta = load_checkpoint(args.checkpoint)
  data = load_dataset(meta["dataset"], args.data_dir or meta.get("data_dir"), meta["seed"])
  if meta["mode"] in PTQ_MODES:
    model, variables = ptq.convert(model, variables)
  loss, acc = evaluate(make_eval_step(model), variables, data.x_test, data.y_test,
                       args.eval_batch_size)
  print(f"{meta['mode']}: test accuracy {acc:.2f}% (loss {loss:.4f}) on {meta['dataset']} "
        f"from {args.checkpoint}")
  return {"mode": meta["mode"], "test_accuracy": acc, "test_loss": loss}


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the program; returns the results dict (also written to ``<out>/results.json``)."""
  args = parse_args(argv)
  if args.eval_only:
    return eval_only(args)
  fine_tune = args.qat_init == "fp32"
  modes = parse_modes(args.modes, args.act_bits, fine_tune)
  data = load_dataset(args.dataset, args.data_dir, args.seed)
  mesh = None
  if args.mesh is not None:
    mesh = jaxq_sharding.make_mesh(args.mesh)
    missing = set(mesh.axis_names) - {"data", "model"}
    if missing:
      raise ValueError(f"--mesh axes must be 'data' and/or 'model'; got {sorted(missing)}")
    if min(args.batch_size, len(data.x_train)) % mesh.shape.get("data", 1):
      raise ValueError(f"--batch-size {args.batch_size} must be divisible by the mesh's "
                       f"data axis ({mesh.shape['data']})")
  config = ViTConfig(args.patch, args.dim, args.depth, args.heads, args.mlp_ratio,
                     args.dropout, data.num_classes)
  check_config(config, data.x_train.shape[1:])
  os.makedirs(args.out, exist_ok=True)
  print(f"{data.name}: {len(data.x_train)} train / {len(data.x_test)} test images "
        f"{data.x_train.shape[1:]}; ViT {dataclasses.asdict(config)}; "
        f"{jax.device_count()} {jax.default_backend()} device(s)")
  results, histories, trained = {}, {}, {}
  for mode in modes:
    if mode in PTQ_MODES:
      row, variables = ptq_mode(mode, args, data, config, trained["fp32"])
    elif fine_tunes(mode, fine_tune):
      source = float_source(mode, modes)
      row, variables, histories[mode] = train_mode(
          mode, args, data, config, mesh, init_from=trained[source],
          step_offset=histories[source]["step"][-1])
    else:
      row, variables, histories[mode] = train_mode(mode, args, data, config, mesh)
      trained[mode] = variables
    ckpt = os.path.join(args.out, "checkpoints", mode)
    save_checkpoint(ckpt, variables, {
        "mode": mode, "config": dataclasses.asdict(config), "dataset": data.name,
        "data_dir": args.data_dir, "seed": args.seed,
        "image_shape": list(data.x_train.shape[1:]),
        "test_accuracy": row["test_accuracy"]})
    results[mode] = {**row, "checkpoint": ckpt}
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  plot_curves(histories, os.path.join(args.out, "curves.png"))
  print(format_table(results))
  print(f"wrote {args.out}/results.json, {args.out}/curves.png, {args.out}/checkpoints/")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
