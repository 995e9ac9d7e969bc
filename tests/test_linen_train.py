"""QAT on scikit-learn digits: tiny ViT and tiny CNN (BatchNorm), jitted, few hundred steps.

Protocol (the usual QAT recipe): train in float, then fine-tune the float checkpoint
with quantization; the float reference is fine-tuned for the same number of steps.
W8A8 must end within 1 point of float, W4A4 with LSQ (first and last layer at 8 bits, as
in Esser et al. 2020) within 3 points.
"""

from __future__ import annotations

import functools

import jax
import optax
import pytest

from _models import TinyCNN, TinyViT, accuracy, load_digits_split, train
from jaxq.flax.linen import init_quant_params, quantize_model
from jaxq.optim import quant_aware
from jaxq.spec import QuantSpec, Rule

PRE, FT = 300, 150
W8A8 = (Rule(".*", weight=QuantSpec(), act=QuantSpec(granularity="tensor")),)


def _w4a4(ends: str, signed_act_inner: bool):
  lsq_w = QuantSpec(bits=4, estimator="lsq")
  lsq_a = QuantSpec(bits=4, granularity="tensor", estimator="lsq", signed=signed_act_inner)
  return (Rule(ends, weight=QuantSpec(), act=QuantSpec(granularity="tensor")),
          Rule(".*", weight=lsq_w, act=lsq_a))


CASES = {
    # ViT: inputs of inner layers follow LayerNorm/GELU (signed)
    "vit": (TinyViT, _w4a4("embed|head", True)),
    # CNN: inner layers follow ReLU (unsigned 4-bit)
    "cnn": (TinyCNN, _w4a4("Conv_0|Dense_0", False)),
}


@functools.lru_cache(maxsize=None)
def _float_run(name):
  model_fn, _ = CASES[name]
  xtr, ytr, xte, yte = load_digits_split(0)
  m = model_fn()
  v = train(m, m.init(jax.random.key(0), xtr[:2]), xtr, ytr, steps=PRE)
  ref = train(m, v, xtr, ytr, steps=FT, tx=optax.adam(1e-3), seed=1)
  return m, v, accuracy(m, ref, xte, yte)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("bits", [8, 4])
def test_qat_accuracy(name, bits):
  xtr, ytr, xte, yte = load_digits_split(0)
  m, v, acc_float = _float_run(name)
  rules = W8A8 if bits == 8 else CASES[name][1]
  q = quantize_model(m, rules)
  vq = init_quant_params(q, v, xtr[:256])
  tx = quant_aware(optax.adam(1e-3), optax.adam(1e-4))
  vq = train(q, vq, xtr, ytr, steps=FT, tx=tx, seed=1)
  acc = accuracy(q, vq, xte, yte)
  tol = 1.0 if bits == 8 else 3.0
  assert acc >= acc_float - tol, (name, bits, acc, acc_float)
