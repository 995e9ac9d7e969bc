"""The README's quick starts (Linen and NNX) run as written and do what they say."""

import contextlib
import io
import os
import re

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxq


def _snippet(heading: str) -> str:
  """The first python block after the line ``heading``."""
  path = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
  with open(path) as f:
    text = f.read()
  section = text.split(f"\n{heading}\n", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(code: str) -> tuple[dict, str]:
  namespace: dict = {}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  return namespace, out.getvalue()


def _report_rows(out: str, kind: str) -> list[list[str]]:
  return [line.split() for line in out.splitlines() if f" {kind} " in line]


def test_quick_start_runs():
  ns, out = _run(_snippet("## Quick start"))
  params, served = ns["params"], ns["serving_vars"]["params"]
  for layer in ("layers_0", "layers_2"):  # int8 kernels, one scale per output channel
    kernel, w = served[layer]["kernel"], np.asarray(params[layer]["kernel"], np.float64)
    assert isinstance(kernel, jaxq.QArray) and kernel.values.dtype == jnp.int8
    scale = np.abs(w).max(axis=0) / 127
    np.testing.assert_allclose(jaxq.dequantize(kernel), np.round(w / scale) * scale,
                               rtol=1e-6, atol=1e-7)
  # The printed max |served - float| is that of W8A8: logits of size ~1 moved by 8-bit
  # steps of ~1/100, but not by nothing (a float fallback would print 0).
  x = ns["x"]
  served_out = ns["serving_model"].apply(ns["serving_vars"], x)
  float_out = ns["model"].apply({"params": params}, x)
  printed = float(out.strip().splitlines()[-1])
  assert printed == pytest.approx(float(jnp.abs(served_out - float_out).max()), rel=1e-4)
  assert 1e-4 < printed < 0.05
  assert _report_rows(out, "Dense") == [
      ["layers_0", "Dense", "0", "8/8", "4,096", "1,281"],
      ["layers_2", "Dense", "0", "8/8", "2,560", "681"]]


def test_nnx_quick_start_runs():
  ns, out = _run(_snippet("### Quick start, NNX"))
  model, x, y = ns["model"], ns["x"], ns["y"]
  float_loss = optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
  assert abs(float(ns["loss"]) - float(float_loss)) < 0.02  # the QAT step's loss, W8A8
  assert not jnp.array_equal(ns["qmodel"].layers[0].kernel.get_value(),
                             model.layers[0].kernel.get_value())  # one AdamW step taken
  assert _report_rows(out, "Linear") == [
      ["layers/0", "Linear", "0", "8/8", "4,096", "1,281"],
      ["layers/2", "Linear", "0", "8/8", "2,560", "681"]]
