"""Cost of the fake-quant ops and of quantize/dequantize relative to plain elementwise ops.

Run: ``python benchmarks/bench_quantizers.py [--n 4194304] [--channels 1024] [--repeats 30]``

Every function is jitted and timed with ``block_until_ready`` (median of ``--repeats``
runs after one warm-up/compile run). Reported:

* forward and forward+backward (one VJP) time of ``fake_quant`` (STE), ``lsq_fake_quant``
  and ``pact_fake_quant``, per-tensor and per-channel, as a ratio to the identity
  ``lambda x: x`` (a buffer copy: a jitted output cannot alias an undonated input) and
  to the elementwise ``x * 2`` (same shapes, same VJP structure);
* ``jaxq.qarray.quantize`` (int8 and packed int4, per-channel, min-max qparams included)
  and ``dequantize`` throughput in GB/s (bytes read + written by the op's inputs and
  outputs) next to ``x * 2``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxq import estimators as E


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def _fwd_bwd(f):
  """jit of ``x, g -> (f(x), vjp(g))``: one forward and one backward pass."""

  def run(x, g):
    y, vjp = jax.vjp(f, x)
    return y, vjp(g)

  return jax.jit(run)


def _nbytes(tree) -> int:
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=4 * 1024 * 1024, help="number of elements")
  ap.add_argument("--channels", type=int, default=1024)
  ap.add_argument("--repeats", type=int, default=30)
  args = ap.parse_args()
  c = args.channels
  shape = (args.n // c, c)
  kx, kg = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, shape, jnp.float32)
  g = jax.random.normal(kg, shape, jnp.float32)
  s_t = jnp.float32(4.0 / 127)
  s_c = jnp.max(jnp.abs(x), axis=0, keepdims=True) / 127
  z_c = jnp.zeros_like(s_c)
  alpha = jnp.float32(2.0)
  key = jax.random.key(1)
  r = args.repeats
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"x: f32{list(shape)} = {x.size / 2**20:.0f}M elements, median of {r}")

  # ------------------------------------------------------------------ fake quant
  baselines = {
      "identity": lambda x: x,
      "x * 2": lambda x: x * 2,
  }
  ops = {
      "fake_quant per-tensor": lambda x: E.fake_quant(x, s_t, 0, -128, 127),
      "fake_quant per-channel": lambda x: E.fake_quant(x, s_c, z_c, -128, 127),
      "fake_quant per-tensor stochastic": lambda x: E.fake_quant(x, s_t, 0, -128, 127,
                                                                 key=key),
      "lsq_fake_quant per-tensor": lambda x: E.lsq_fake_quant(x, s_t, 0, -128, 127),
      "lsq_fake_quant per-channel": lambda x: E.lsq_fake_quant(x, s_c, z_c, -128, 127),
      "pact_fake_quant 8-bit": lambda x: E.pact_fake_quant(x, alpha, 8),
  }
  # LSQ's interesting backward includes the parameter gradients: time those too.
  lsq_params = {
      "lsq per-tensor (dx, ds, dz)": (
          lambda x, s, z: E.lsq_fake_quant(x, s, z, -128, 127), s_t, jnp.float32(0)),
      "lsq per-channel (dx, ds, dz)": (
          lambda x, s, z: E.lsq_fake_quant(x, s, z, -128, 127), s_c, z_c),
  }
  fwd_t = {k: _time(jax.jit(f), x, repeats=r) for k, f in {**baselines, **ops}.items()}
  fb_t = {k: _time(_fwd_bwd(f), x, g, repeats=r) for k, f in {**baselines, **ops}.items()}
  for k, (f, s, z) in lsq_params.items():
    def run(x, s, z, g, f=f):
      y, vjp = jax.vjp(f, x, s, z)
      return y, vjp(g)
    fb_t[k] = _time(jax.jit(run), x, s, z, g, repeats=r)

  ident, mul = fwd_t["identity"], fwd_t["x * 2"]
  fb_ident, fb_mul = fb_t["identity"], fb_t["x * 2"]
  print("\nforward                               ms    / identity   / x*2")
  for k, t in fwd_t.items():
    print(f"  {k:34s} {t * 1e3:7.3f}  {t / ident:9.1f}  {t / mul:6.2f}")
  print("\nforward + backward (VJP)              ms    / identity   / x*2")
  for k, t in fb_t.items():
    print(f"  {k:34s} {t * 1e3:7.3f}  {t / fb_ident:9.1f}  {t / fb_mul:6.2f}")

  # ------------------------------------------------------------------ quantize/dequantize
  try:
    from jaxq.qarray import dequantize, quantize
    from jaxq.spec import QuantSpec
  except ImportError as e:  # pragma: no cover - the qarray module is optional here
    print(f"\nquantize/dequantize skipped: {e}")
    return
  mul_bytes = 2 * x.size * 4
  print("\nthroughput (bytes of inputs + outputs)   ms      GB/s   / x*2 GB/s")
  print(f"  {'x * 2':36s} {mul * 1e3:7.3f}  {mul_bytes / mul / 1e9:7.2f}")
  for bits in (8, 4):
    spec = QuantSpec(bits=bits, granularity="channel", axis=-1)
    qf = jax.jit(lambda x, spec=spec: quantize(x, spec))
    q = qf(x)
    dq = jax.jit(dequantize)
    tq = _time(qf, x, repeats=r)
    td = _time(dq, q, repeats=r)
    for name, t, nb in ((f"quantize int{bits} per-channel", tq, x.nbytes + _nbytes(q)),
                        (f"dequantize int{bits} per-channel", td, _nbytes(q) + x.nbytes)):
      print(f"  {name:36s} {t * 1e3:7.3f}  {nb / t / 1e9:7.2f}  "
            f"{(nb / t) / (mul_bytes / mul):6.2f}")


if __name__ == "__main__":
  main()
