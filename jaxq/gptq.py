"""GPTQ: second-order rounding of a layer's weights (Frantar et al. 2023, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023).

On the 2-D views of a layer, ``x: (M, K)`` inputs and ``W: (K, N)`` kernel, GPTQ picks
the quantized kernel ``Q`` (one grid point per weight) that approximately minimises the
layer-output error on calibration inputs,

    ||X W - X Q||_F^2 = sum_n (w_n - q_n)^T (X^T X) (w_n - q_n),

one input row ``k`` of ``W`` (a "column" in the paper, which works on ``W^T``) at a time:
row ``k`` is rounded to its grid, ``q_k = quant(w_k)``, and its error is spread over the
rows not yet rounded through the inverse Hessian (Optimal Brain Surgeon, Hassibi & Stork
1993; OBQ, Frantar & Alistarh 2022):

    e_k = (w_k - q_k) / U_kk,        w_j <- w_j - U_kj e_k   for j > k,

with ``H = 2 X^T X / n`` (:func:`hessian_update`, :func:`hessian`), damped
``H + damping * mean(diag H) * I`` and ``U`` the upper Cholesky factor of its inverse,
``H^-1 = U^T U`` (the paper's "Cholesky reformulation": row ``k`` of ``U`` is the
``k``-th row of the inverse Hessian of the not-yet-rounded rows, scaled by ``1/sqrt``
of its diagonal, so no inverse is updated in the loop).

Choices (the paper's, unless said otherwise):

* act-order (``act_order=True``): rows in order of decreasing ``H_kk``;
* dead inputs (``H_kk = 0``, never active on the calibration data): ``H_kk := 1`` and
  ``w_k := 0`` before rounding, as in the reference implementation;
* lazy block updates: the rounding error of a block of ``block_size`` (128) rows is
  applied to the later rows with one matrix product per block (and, inside a block,
  per sub-block of 32 rows), which only reorders the same sums;
* the inverse Hessian and its Cholesky factor are computed on the host in float64
  (:func:`inverse_hessian_cholesky`); the rounding loop runs in JAX in the kernel's
  compute dtype (float32, float64 under ``jax_enable_x64`` with a float64 kernel);
* scales follow :func:`jaxq.quantizer.compute_qparams` (min-max at the spec's
  granularity), so codes are ``clip(round(w / s) + z, qmin, qmax)`` exactly as
  :func:`jaxq.quantize` computes them for the same scales. Per-tensor and per-channel
  scales come from the original kernel (as the reference). Groups (``group_size``
  consecutive input rows per output channel, jaxq's layout) without act-order: the
  scale of a group is chosen when the group starts, from the current error-compensated
  rows. With act-order a group's rows are not consecutive in the rounding order, so
  the "static groups" choice is used (scales of the contiguous groups from the kernel
  before any update, with dead rows zeroed, as AutoGPTQ's ``static_groups``); the
  reference's ``g_idx`` (groups of consecutive rows in act-order) would need a
  permutation stored with the kernel, which jaxq's QArray has no place for.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.linalg.lapack

from jaxq import numerics
from jaxq import quantizer
from jaxq.qarray import QArray, quantize_with
from jaxq.spec import QuantSpec

DEFAULT_DAMPING = 0.01
DEFAULT_BLOCK_SIZE = 128


class HessianState(NamedTuple):
  """Running sum of ``x^T x`` over calibration tokens and their number."""
  xtx: jax.Array  # f32[K, K]
  count: jax.Array  # i32[]


def hessian_init(in_features: int) -> HessianState:
  """Empty statistics for a layer with ``in_features`` inputs (K)."""
  if isinstance(in_features, bool) or not isinstance(in_features, (int, np.integer)) or (
      in_features < 1):
    raise ValueError(f"in_features must be a positive int; got {in_features!r}")
  return HessianState(jnp.zeros((in_features, in_features), jnp.float32),
                      jnp.zeros((), jnp.int32))


def hessian_update(state: HessianState, x: jax.Array) -> HessianState:
  """Adds a batch ``x: (..., K)`` (all leading axes are tokens) to ``state``.

  Pure and jit-able: ``xtx += x^T x`` (float32, full-precision matmul) and
  ``count += tokens``; a batch with no tokens leaves ``state`` unchanged.
  """
  k = state.xtx.shape[0]
  if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != k:
    raise ValueError(f"x must have shape (..., {k}) to match the Hessian; got "
                     f"{jnp.shape(x)}")
  x2 = jnp.reshape(jnp.asarray(x, jnp.float32), (-1, k))
  xtx = jnp.matmul(x2.T, x2, precision=jax.lax.Precision.HIGHEST)
  return HessianState(state.xtx + xtx, state.count + x2.shape[0])


def hessian(state: HessianState) -> jax.Array:
  """``H = 2 X^T X / n`` (zeros when no token was seen)."""
  return 2.0 * state.xtx / jnp.maximum(state.count, 1).astype(jnp.float32)


def check_gptq_spec(spec) -> QuantSpec:
  """The specs GPTQ can honour: a uniform, static, min-max weight spec whose channel
  axis is the output axis (``axis`` -1 or 1 of the ``(K, N)`` kernel)."""
  if not isinstance(spec, QuantSpec):
    raise ValueError(f"spec must be a jaxq.QuantSpec; got {type(spec).__name__}")
  if spec.scheme != "uniform":
    raise ValueError(f"GPTQ needs QuantSpec.scheme='uniform'; got {spec.scheme!r}")
  if spec.dynamic:
    raise ValueError("GPTQ rounds weights: QuantSpec.dynamic=True is an activation spec")
  if spec.rounding not in ("nearest", "gptq"):
    raise ValueError("GPTQ is itself the rounding: QuantSpec.rounding must be 'gptq' (or "
                     f"'nearest'); got {spec.rounding!r}")
  if spec.calibration not in ("minmax", "ema"):
    raise ValueError("GPTQ chooses min-max scales as it rounds: QuantSpec.calibration "
                     f"must be 'minmax' (or 'ema', min-max for a weight); got "
                     f"{spec.calibration!r}")
  if spec.granularity != "tensor" and spec.axis not in (-1, 1):
    raise ValueError("GPTQ keeps one scale per output channel: QuantSpec.axis must be "
                     f"-1 or 1 (N of the (K, N) kernel); got {spec.axis}")
  return spec


def _check_damping(damping) -> float:
  if isinstance(damping, bool) or not isinstance(damping, (int, float, np.floating)) or (
      not np.isfinite(damping) or damping <= 0):
    raise ValueError(f"damping must be a finite float > 0 (a fraction of the mean "
                     f"Hessian diagonal, e.g. 0.01); got {damping!r}")
  return float(damping)


def prepare_hessian(h, damping: float = DEFAULT_DAMPING, act_order: bool = True
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Host float64 ``(H_damped, dead, perm)``: dead inputs set to ``H_kk = 1``, the
  damping ``damping * mean(diag H)`` added to the diagonal, and the rounding order
  ``perm`` (decreasing ``H_kk`` with act-order, else identity; stable)."""
  damping = _check_damping(damping)
  h = np.array(h, np.float64)
  if h.ndim != 2 or h.shape[0] != h.shape[1]:
    raise ValueError(f"hessian must be a square (K, K) matrix; got shape {h.shape}")
  if not np.all(np.isfinite(h)):
    raise ValueError("hessian has NaN or Inf entries (non-finite calibration inputs)")
  diag = np.diag(h).copy()
  dead = diag == 0
  if dead.all():
    raise ValueError("hessian is all zero: no calibration token reached this layer")
  idx = np.flatnonzero(dead)
  h[idx, idx] = 1.0
  h[np.diag_indices_from(h)] += damping * np.mean(np.diag(h))
  perm = (np.argsort(-np.diag(h), kind="stable") if act_order
          else np.arange(h.shape[0]))
  return h, dead, perm


def inverse_hessian_cholesky(h: np.ndarray) -> np.ndarray:
  """Upper-triangular ``U`` with ``H^-1 = U^T U``, in float64 on the host.

  With ``J`` the order-reversing permutation and ``J H J = L L^T`` (lower ``L``),
  ``H^-1 = (J L^-1 J)^T (J L^-1 J)`` and ``J L^-1 J`` is upper triangular: one Cholesky
  and one triangular inverse, no explicit inverse of ``H``.
  """
  flipped = h[::-1, ::-1]
  try:
    lower = scipy.linalg.cholesky(flipped, lower=True, check_finite=False)
  except np.linalg.LinAlgError:
    raise ValueError("the damped Hessian is not positive definite: increase damping"
                     ) from None
  lower_inv, info = scipy.linalg.lapack.dtrtri(lower, lower=1)
  if info:
    raise ValueError("the damped Hessian is singular: increase damping")
  return np.ascontiguousarray(lower_inv[::-1, ::-1])


def _group_qparams(rows: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
  """``(1, N)`` scale and zero point of a group of rows (min-max over the rows)."""
  lo, hi = numerics.minmax(rows, (0,))
  return quantizer.qparams_from_range(lo, hi, spec)


def _lazy(w, u, s, z, chunk: int, round_chunk, on_chunk_start=None):
  """Rounds the rows of ``w: (L, N)`` ``chunk`` rows at a time (lazy batch updates).

  ``round_chunk(w_c, u_c, s_c, z_c) -> (err_c, codes_c, s_c, z_c)`` rounds one chunk
  given its diagonal block of ``U`` (and may set its qparams); its errors then update
  all later rows with one product, ``w[later] -= U[chunk, later]^T err_c``.
  ``on_chunk_start(w, s, z, i)`` may set the qparams of rows from ``i`` on (dynamic
  groups) before the chunk is rounded.
  Returns ``(err, codes, s, z)``.
  """
  rows, n = w.shape
  later = jnp.arange(rows)[None, :]

  def step(b, c):
    w, err, codes, s, z = c
    i = b * chunk
    if on_chunk_start is not None:
      s, z = on_chunk_start(w, s, z, i)
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, i, chunk, 0)
    err_c, codes_c, s_c, z_c = round_chunk(
        take(w), jax.lax.dynamic_slice(u, (i, i), (chunk, chunk)), take(s), take(z))
    u_rows = jnp.where(later >= i + chunk, take(u), 0.0)
    w = w - jnp.matmul(u_rows.T, err_c, precision=jax.lax.Precision.HIGHEST)
    put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v, i, 0)
    return w, put(err, err_c), put(codes, codes_c), put(s, s_c), put(z, z_c)

  zeros = jnp.zeros((rows, n), w.dtype)
  _, err, codes, s, z = jax.lax.fori_loop(0, rows // chunk, step, (w, zeros, zeros, s, z))
  return err, codes, s, z


def _gptq_rows(w, u, scale_rows, zp_rows, spec: QuantSpec, block: int, sub: int,
               dynamic_groups: bool):
  """The rounding loop on rows already permuted and padded to a multiple of ``block``.

  Two levels of lazy updates: blocks of ``block`` rows update the rest of the kernel,
  sub-blocks of ``sub`` rows the rest of their block, and rows the rest of their
  sub-block (the row-level rank-1 updates dominate memory traffic otherwise).
  ``scale_rows`` / ``zp_rows`` are ``(K, N)`` row-expanded qparams; with
  ``dynamic_groups`` those of each group are set when the group starts (a group
  starts on a sub-block and lies within its block). Returns ``(codes, scale_rows,
  zp_rows)``.
  """
  n = w.shape[1]
  g = spec.group_size

  def round_sub(w2, u2, s2, z2):
    def round_row(j, c):
      w2, err, codes = c
      wj, sj, zj = w2[j], s2[j], z2[j]
      q = jnp.clip(jnp.round(wj / sj) + zj, spec.qmin, spec.qmax)
      e = (wj - (q - zj) * sj) / u2[j, j]
      coeff = jnp.where(jnp.arange(sub) > j, u2[j], 0.0)
      return w2 - coeff[:, None] * e[None, :], err.at[j].set(e), codes.at[j].set(q)
    zeros = jnp.zeros_like(w2)
    _, err, codes = jax.lax.fori_loop(0, sub, round_row, (w2, zeros, zeros))
    return err, codes, s2, z2

  def group_start(w1, s1, z1, i):
    def new_group(sz):
      s, z = _group_qparams(jax.lax.dynamic_slice_in_dim(w1, i, g, 0), spec)
      put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(
          a, jnp.broadcast_to(v, (g, n)).astype(a.dtype), i, 0)
      return put(sz[0], s), put(sz[1], z)
    return jax.lax.cond(i % g == 0, new_group, lambda sz: sz, (s1, z1))

  def round_block(w1, u1, s1, z1):
    return _lazy(w1, u1, s1, z1, sub, round_sub, group_start if dynamic_groups else None)

  _, codes, scale_rows, zp_rows = _lazy(w, u, scale_rows, zp_rows, block, round_block)
  return codes, scale_rows, zp_rows


@functools.partial(jax.jit, static_argnames=("spec", "block", "sub", "dynamic_groups"))
def _gptq(w, u, scale_rows, zp_rows, perm, spec: QuantSpec, block: int, sub: int,
          dynamic_groups: bool):
  """:func:`_gptq_rows` in the original row order: permutes and pads the rows, rounds,
  and returns the float32 GPTQ kernel and its row-expanded scales (float32)."""
  k = w.shape[0]
  kp = u.shape[0]
  pad = lambda a, v: jnp.pad(a.astype(w.dtype)[perm], ((0, kp - k), (0, 0)),
                             constant_values=v)
  codes, s_rows, z_rows = _gptq_rows(pad(w, 0.0), u, pad(scale_rows, 1.0),
                                     pad(zp_rows, 0.0), spec, block, sub, dynamic_groups)
  inv = jnp.argsort(perm)
  codes, s_rows, z_rows = codes[:k][inv], s_rows[:k][inv], z_rows[:k][inv]
  # float32 dequantized kernel: rounding it to a narrower dtype could move a code.
  w_hat = ((codes - z_rows) * s_rows).astype(jnp.float32)
  return w_hat, s_rows.astype(jnp.float32), z_rows.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("spec",))
def _initial_qparams(w_in, w_live, spec: QuantSpec):
  """Scales and zero points before rounding, in jaxq's layout and one per row.

  Per-tensor and per-channel: from the original kernel, dead rows included (as the
  reference); groups: from the kernel with dead rows zeroed (the static groups, or the
  placeholders that dynamic groups overwrite).
  """
  k, n = w_in.shape
  if spec.granularity == "group":
    scale, zp = quantizer.compute_qparams(w_live, spec, group_axis=0)  # (K/g, 1, N)
    return (scale, zp, jnp.repeat(scale[:, 0, :], spec.group_size, axis=0),
            jnp.repeat(zp[:, 0, :], spec.group_size, axis=0))
  scale, zp = quantizer.compute_qparams(w_in, spec)
  return scale, zp, jnp.broadcast_to(scale, (k, n)), jnp.broadcast_to(zp, (k, n))


def _block_sizes(k: int, spec: QuantSpec, block_size: int, dynamic_groups: bool
                 ) -> tuple[int, int]:
  """``(block, sub)``: a block is a multiple of the group size with dynamic groups;
  a sub-block is the largest power of two <= 32 dividing the block (and the group)."""
  if dynamic_groups:
    block = spec.group_size * max(1, block_size // spec.group_size)
    unit = spec.group_size
  else:
    block = unit = min(block_size, k)
  sub = next(p for p in (32, 16, 8, 4, 2, 1) if unit % p == 0 and block % p == 0)
  return block, sub


def gptq_quantize(
    w: jax.Array,
    hessian: jax.Array,
    spec: QuantSpec,
    *,
    damping: float = DEFAULT_DAMPING,
    act_order: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> QArray:
  """GPTQ-rounds the kernel ``w: (K, N)`` given the Hessian ``H: (K, K)`` of its inputs.

  Args:
    w: float kernel, input axis first (a Dense kernel; other kernels as their 2-D view).
    hessian: ``2 X^T X / n`` of the layer's calibration inputs (:func:`hessian`).
    spec: weight spec (:func:`check_gptq_spec`): any bits, symmetric or not, signed or
      not, per-tensor, per-channel (``axis=-1``) or groups along K (``group_size``
      dividing K).
    damping: fraction of the mean diagonal added to ``H`` (> 0; the paper's 1%).
    act_order: round rows in order of decreasing ``H_kk`` (with groups: static groups).
    block_size: rows per lazy update (rounded to a multiple of ``group_size``).

  Returns:
    a :class:`jaxq.QArray` with jaxq's layout (``group_axis=0``): its codes are those
    :func:`jaxq.qarray.quantize_with` gives the returned (dequantized) kernel with the
    returned scales, so ``jaxq.dequantize`` of it is the GPTQ kernel.
  """
  spec = check_gptq_spec(spec)
  w = jnp.asarray(w)
  if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"w must be a 2-D float (K, N) kernel; got shape {w.shape}, dtype "
                     f"{w.dtype}")
  if not bool(jnp.all(jnp.isfinite(w))):
    raise ValueError("w has NaN or Inf entries: GPTQ would spread them over the kernel")
  k, n = w.shape
  if tuple(jnp.shape(hessian)) != (k, k):
    raise ValueError(f"hessian must have shape (K, K) = ({k}, {k}) for w of shape "
                     f"{w.shape}; got {tuple(jnp.shape(hessian))}")
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size must be a positive int; got {block_size!r}")
  if spec.granularity == "group" and k % spec.group_size:
    raise ValueError(f"QuantSpec.group_size={spec.group_size} must divide K={k}")
  h, dead, perm = prepare_hessian(hessian, damping, act_order)
  dtype = jnp.promote_types(w.dtype, jnp.float32)
  w_in = w.astype(dtype)
  w_live = jnp.where(jnp.asarray(dead)[:, None], 0.0, w_in)

  dynamic_groups = spec.granularity == "group" and not act_order
  scale, zp, scale_rows, zp_rows = _initial_qparams(w_in, w_live, spec)
  block, sub = _block_sizes(k, spec, block_size, dynamic_groups)
  kp = -(-k // block) * block
  u = np.eye(kp)
  u[:k, :k] = inverse_hessian_cholesky(h[np.ix_(perm, perm)])
  w_hat, s_rows, z_rows = _gptq(w_live, jnp.asarray(u, dtype), scale_rows, zp_rows,
                                 jnp.asarray(perm), spec, block, sub, dynamic_groups)
  if spec.granularity == "group":
    scale = s_rows[::spec.group_size][:, None, :]
    zp = z_rows[::spec.group_size][:, None, :]
  q = quantize_with(w_hat, spec, scale, zp, group_axis=0)
  return QArray(q.values, q.scale, q.zero_point, spec=spec, shape=(k, n), dtype=w.dtype,
                group_axis=0)
