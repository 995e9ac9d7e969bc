"""NF4 (jaxq.nf4) vs uniform int4 on Gaussian weights: relative L2 error and bytes.

  python benchmarks/bench_nf4.py [--k 2048] [--n 1024] [--seeds 3]

For each group size (32, 64, 128, 256) along the contraction axis of a ``(K, N)``
kernel with i.i.d. N(0, 1) entries (QLoRA's model of pretrained weights), prints the
relative error ``||w_hat - w|| / ||w||`` (mean over seeds) and the storage in bytes and
bits per weight of:

* NF4 with float32 absmax (``nf4_quantize``);
* NF4 with double-quantized absmax (``double_quant=True``: int8 codes in blocks of 256,
  float32 block scales and mean), and its error added over float32 absmax;
* uniform int4 from ``jaxq.quantize`` with ``QuantSpec(bits=4, granularity="group",
  group_size=g, axis=-1)`` (symmetric absmax; ``QArray.nbytes``, which also counts the
  int8 zero point QArray stores for every group) and its asymmetric (min-max) variant.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from jaxq import nf4
from jaxq.qarray import dequantize, quantize
from jaxq.spec import QuantSpec

GROUPS = (32, 64, 128, 256)


def rel_err(w_hat, w) -> float:
  return float(jnp.linalg.norm(w_hat - w) / jnp.linalg.norm(w))


def measure(w, g):
  """``{method: (relative error, bytes)}`` for one weight matrix and group size."""
  shape = w.shape
  packed, absmax = nf4.nf4_quantize(w, g)
  _, dq = nf4.nf4_quantize(w, g, double_quant=True)
  out = {
      "nf4": (rel_err(nf4.nf4_dequantize(packed, absmax, shape, g), w),
              nf4.nf4_nbytes(packed, absmax)),
      "nf4 + double quant": (rel_err(nf4.nf4_dequantize(packed, dq, shape, g), w),
                             nf4.nf4_nbytes(packed, dq)),
  }
  for name, symmetric in (("int4 symmetric", True), ("int4 asymmetric", False)):
    q = quantize(w, QuantSpec(4, granularity="group", group_size=g, axis=-1,
                              symmetric=symmetric))
    out[name] = (rel_err(dequantize(q), w), q.nbytes)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--k", type=int, default=2048)
  parser.add_argument("--n", type=int, default=1024)
  parser.add_argument("--seeds", type=int, default=3)
  args = parser.parse_args()
  k, n = args.k, args.n
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; w: ({k}, {n}) N(0, 1) "
        f"float32 ({4 * k * n} bytes), {args.seeds} seeds")
  print(f"{'group':>5}  {'method':<20} {'rel L2 err':>10} {'bytes':>10} {'bits/w':>7}")
  for g in GROUPS:
    runs = [measure(jax.random.normal(jax.random.key(s), (k, n), jnp.float32), g)
            for s in range(args.seeds)]
    for name in runs[0]:
      err = sum(r[name][0] for r in runs) / len(runs)
      nbytes = runs[0][name][1]
      print(f"{g:>5}  {name:<20} {err:>10.5f} {nbytes:>10d} {8 * nbytes / (k * n):>7.3f}")
    added = sum(r["nf4 + double quant"][0] - r["nf4"][0] for r in runs) / len(runs)
    saved = runs[0]["nf4"][1] - runs[0]["nf4 + double quant"][1]
    print(f"{g:>5}  double quant: saves {saved} bytes "
          f"({8 * saved / (k * n):.3f} bits/w), adds {added:+.2e} rel L2 err")


if __name__ == "__main__":
  main()
