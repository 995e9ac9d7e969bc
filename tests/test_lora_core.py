"""LoRA / QLoRA below the Flax adapters: jaxq.LoRA and Rule(lora=), the adapter math of
jaxq.layer.lora on each contraction kind against float64 numpy, gradients, freeze /
merge / trainable of jaxq.lora."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jaxq
from jaxq import nf4
from jaxq.layer import lora as llora
from jaxq.layer.qat import qat_contraction
from jaxq.layer.views import Contraction, conv_contraction, dot_general_contraction
from jaxq.layer.views import einsum_axes, kernel_matrix
from jaxq.qarray import QArray, dequantize

NF4 = jaxq.QuantSpec(4, scheme="nf4", granularity="group", group_size=4)
LORA = jaxq.LoRA(rank=3, alpha=6.0)


def _normal(seed, shape, scale=1.0):
  return np.random.default_rng(seed).standard_normal(shape) * scale


# --------------------------------------------------------------------------------------
# The four contraction kinds, each with a float64 numpy reference of its compute
# --------------------------------------------------------------------------------------


def _dense(x, w):
  dn = (((x.ndim - 1,), (0,)), ((), ()))
  return dot_general_contraction(x, w, dn, lambda l, r: lax.dot_general(l, r, dn), "d")


def _dense_general(x, w):  # x (b, t, 3, 4) . w (3, 4, 2, 5) over two axes
  dn = (((2, 3), (0, 1)), ((), ()))
  return dot_general_contraction(x, w, dn, lambda l, r: lax.dot_general(l, r, dn), "g")


EINSUM = "bij,jki->bk"  # contracts i, j: the kernel lists them in the other order


def _einsum(x, w):
  lc, rc, _ = einsum_axes(EINSUM, "e", x.ndim)
  return Contraction("einsum", x, w, lc, rc, lambda l, r: jnp.einsum(EINSUM, l, r))


def _conv_fn(groups):
  return lambda l, r: lax.conv_general_dilated(
      l, r, (2, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)


def _conv(x, w):
  return conv_contraction(x, w, _conv_fn(1))


def _np_conv(x, w):
  kh, kw = w.shape[:2]
  oh, ow = (x.shape[1] - kh) // 2 + 1, x.shape[2] - kw + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[-1]))
  for i in range(oh):
    for j in range(ow):
      out[:, i, j] = np.einsum("bhwc,hwcn->bn", x[:, 2 * i:2 * i + kh, j:j + kw], w)
  return out


KINDS = {  # name: (make op, x shape, kernel shape, float64 reference of compute)
    "dense": (_dense, (2, 3, 8), (8, 6), lambda x, w: x @ w),
    "dense_general": (_dense_general, (2, 3, 3, 4), (3, 4, 2, 5),
                      lambda x, w: np.einsum("btij,ijkn->btkn", x, w)),
    "einsum": (_einsum, (2, 3, 4), (4, 5, 3), lambda x, w: np.einsum(EINSUM, x, w)),
    "conv": (_conv, (2, 7, 5, 3), (3, 2, 3, 4), _np_conv),
}


def _problem(kind, seed=0):
  make, xs, ws, ref = KINDS[kind]
  x, w = _normal(seed, xs), _normal(seed + 1, ws, 0.3)
  op = make(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  (k, r), (_, n) = llora.lora_shapes(op, LORA)
  a, b = _normal(seed + 2, (k, r), 0.5), _normal(seed + 3, (r, n), 0.5)
  return op, x, w, a, b, ref


def _hand_delta_kernel(w, a, b, rhs_contract):
  """``(alpha / r) A B`` (float64) mapped to the kernel's layout through its view."""
  _, unview = kernel_matrix(jnp.asarray(w), rhs_contract)
  perm_probe = np.asarray(unview(jnp.arange(a.shape[0] * b.shape[1], dtype=jnp.int32)
                                 .reshape(a.shape[0], b.shape[1])))
  return (LORA.scaling * (a @ b)).reshape(-1)[perm_probe]


@pytest.mark.parametrize("kind", list(KINDS))
def test_adapter_math_equals_float64_hand_computation(kind):
  op, x, w, a, b, ref = _problem(kind)
  base = op.compute(op.lhs, op.rhs)
  got = llora.lora_contraction(op, base, jnp.asarray(a, jnp.float32),
                               jnp.asarray(b, jnp.float32), LORA)
  want = ref(x, w + _hand_delta_kernel(w, a, b, op.rhs_contract))
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  # the adapter part alone: not hidden in the base's tolerance
  np.testing.assert_allclose(got - base, want - ref(x, w), rtol=1e-4, atol=1e-5)


def test_dense_adapter_is_x_a_b_on_the_views():
  op, x, _, a, b, _ = _problem("dense_general", seed=4)
  x2 = x.reshape(6, 12)
  got = llora.lora_contraction(op, jnp.zeros(op.out_shape), jnp.asarray(a, jnp.float32),
                               jnp.asarray(b, jnp.float32), LORA)
  np.testing.assert_allclose(got, (LORA.scaling * x2 @ a @ b).reshape(2, 3, 2, 5),
                             rtol=1e-5, atol=1e-5)


def test_grouped_conv_uses_the_kernel_shaped_update():
  x, w = _normal(5, (2, 7, 5, 4)), _normal(6, (3, 2, 2, 6), 0.3)  # 2 feature groups
  op = conv_contraction(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                        _conv_fn(2))
  (k, r), (_, n) = llora.lora_shapes(op, LORA)
  a, b = _normal(7, (k, r)), _normal(8, (r, n))
  got = llora.lora_contraction(op, op.compute(op.lhs, op.rhs), jnp.asarray(a, jnp.float32),
                               jnp.asarray(b, jnp.float32), LORA)
  merged = w + _hand_delta_kernel(w, a, b, op.rhs_contract)
  want = np.concatenate([_np_conv(x[..., :2], merged[..., :3]),
                         _np_conv(x[..., 2:], merged[..., 3:])], axis=-1)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_at_init_output_equals_base(kind):
  op = _problem(kind)[0]
  (k, r), (_, n) = llora.lora_shapes(op, LORA)
  a, b = llora.init_lora(jax.random.key(0), k, n, r)
  assert a.shape == (k, r) and b.shape == (r, n) and not np.any(b)
  assert float(jnp.max(jnp.abs(a))) <= 1 / np.sqrt(k) and float(jnp.std(a)) > 0.2 / np.sqrt(k)
  base = op.compute(op.lhs, op.rhs)
  np.testing.assert_array_equal(llora.lora_contraction(op, base, a, b, LORA), base)


def _qlora_loss(kernel, a, b, x, *, aspec=None, dropout_key=None, lora=LORA):
  op = _dense(x, kernel)
  base = qat_contraction(llora.frozen_base(op, "d"), "d", llora.base_weight_spec(
      NF4, kernel), aspec, lambda s, v: {}, lambda s, v: {}, lambda: None, "off")
  y = llora.lora_contraction(op, base, a, b, lora, dropout_key)
  return jnp.sum(jnp.sin(y)), y


def test_only_adapters_get_gradients_and_they_are_right():
  x, w = jnp.asarray(_normal(9, (5, 8))), jnp.asarray(_normal(10, (8, 6)))
  a, b = jnp.asarray(_normal(11, (8, 3))), jnp.asarray(_normal(12, (3, 6)))
  (_, y), (gw, ga, gb) = jax.value_and_grad(_qlora_loss, argnums=(0, 1, 2), has_aux=True)(
      w, a, b, x)
  assert not np.any(gw)
  g = np.cos(np.asarray(y, np.float64))  # dL/dy
  x64, a64, b64 = (np.asarray(v, np.float64) for v in (x, a, b))
  np.testing.assert_allclose(ga, LORA.scaling * x64.T @ g @ b64.T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gb, LORA.scaling * (x64 @ a64).T @ g, rtol=1e-4, atol=1e-5)
  # the base is NF4 of the frozen kernel: y = x nf4(w) + s x A B
  want = x64 @ np.asarray(nf4.nf4_fake_quant(w, 4), np.float64) + LORA.scaling * x64 @ a64 @ b64
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_frozen_qarray_base_gives_the_same_output_as_the_fake_quantized_float_base():
  x, w = jnp.asarray(_normal(13, (5, 8))), jnp.asarray(_normal(14, (8, 6)))
  a, b = jnp.asarray(_normal(15, (8, 3))), jnp.asarray(_normal(16, (3, 6)))
  q = jaxq.quantize(w, NF4)
  before = _qlora_loss(w, a, b, x)[1]
  op = _dense(x, jnp.zeros(w.shape))  # the adapter gives the layer a placeholder
  base = qat_contraction(llora.frozen_base(op, "d", q), "d",
                         llora.base_weight_spec(NF4, q), None, lambda s, v: {},
                         lambda s, v: {}, lambda: None, "off")
  np.testing.assert_array_equal(llora.lora_contraction(op, base, a, b, LORA), before)
  with pytest.raises(ValueError, match="layer 'd': its frozen QArray kernel has shape"):
    llora.frozen_base(_dense(x[:, :4], jnp.zeros((4, 6))), "d", q)


def test_act_spec_applies_to_the_base_path_only():
  x, w = jnp.asarray(_normal(17, (5, 8))), jnp.asarray(_normal(18, (8, 6)))
  a, b = jnp.asarray(_normal(19, (8, 3))), jnp.asarray(_normal(20, (3, 6)))
  aspec = jaxq.QuantSpec(3, granularity="tensor")
  y = _qlora_loss(w, a, b, x, aspec=aspec)[1]
  xq = jaxq.quantizer.fake_quantize(x, aspec)
  want = xq @ nf4.nf4_fake_quant(w, 4) + LORA.scaling * (x @ a) @ b
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_dropout_masks_the_adapter_input_only_when_given_a_key():
  x, w = jnp.asarray(_normal(21, (6, 8))), jnp.asarray(_normal(22, (8, 6)))
  a, b = jnp.asarray(_normal(23, (8, 3))), jnp.asarray(_normal(24, (3, 6)))
  lora = jaxq.LoRA(3, dropout=0.5)
  key = jax.random.key(1)
  y = _qlora_loss(w, a, b, x, dropout_key=key, lora=lora)[1]
  keep = jax.random.bernoulli(key, 0.5, x.shape)
  xd = np.where(keep, np.asarray(x) / 0.5, 0.0)
  base = x @ nf4.nf4_fake_quant(w, 4)
  np.testing.assert_allclose(y, base + xd @ a @ b, rtol=1e-5, atol=1e-5)
  assert 0 < int(np.sum(~np.asarray(keep))) < keep.size
  no_key = _qlora_loss(w, a, b, x, lora=lora)[1]
  np.testing.assert_allclose(no_key, base + x @ a @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense_general", "einsum", "conv"])
def test_merge_kernel_equals_dequantized_base_plus_scaled_a_b(kind):
  op, x, w, a, b, ref = _problem(kind, seed=25)
  contract = op.rhs_contract
  merged = llora.merge_kernel(jnp.asarray(w, jnp.float32), a, b, LORA, contract)
  np.testing.assert_allclose(merged, w + _hand_delta_kernel(w, a, b, contract),
                             rtol=1e-6, atol=1e-6)
  base = op.compute(op.lhs, op.rhs)
  np.testing.assert_allclose(op.compute(op.lhs, merged), llora.lora_contraction(
      op, base, a, b, LORA), rtol=1e-5, atol=1e-5)
  if kind == "dense_general":  # a frozen NF4 kernel, groups along axis 1 (length 4)
    q = jaxq.quantize(jnp.asarray(w, jnp.float32), NF4, group_axis=1)
    np.testing.assert_allclose(
        llora.merge_kernel(q, a, b, LORA, contract),
        np.asarray(dequantize(q)) + _hand_delta_kernel(w, a, b, contract), rtol=1e-6,
        atol=1e-6)


def test_bad_adapter_shapes_name_the_layer():
  op = _problem("dense")[0]
  with pytest.raises(ValueError, match=r"layer 'enc/q': lora_b has shape \(3, 5\).*\(3, 6\)"):
    llora.check_lora_params(op, "enc/q", LORA, jnp.zeros((8, 3)), jnp.zeros((3, 5)))
  llora.check_lora_params(op, "enc/q", LORA, jnp.zeros((8, 3)), jnp.zeros((3, 6)))
  with pytest.raises(ValueError, match="A @ B has shape"):
    llora.merge_kernel(jnp.zeros((8, 6)), jnp.zeros((8, 3)), jnp.zeros((3, 5)), LORA, (0,))


# --------------------------------------------------------------------------------------
# LoRA and Rule validation
# --------------------------------------------------------------------------------------


def test_lora_spec_validation():
  assert jaxq.LoRA(4) == jaxq.LoRA(4, alpha=4.0) and jaxq.LoRA(4).scaling == 1.0
  assert jaxq.LoRA(np.int64(8), alpha=16).scaling == 2.0
  assert hash(jaxq.LoRA(2, 1.0, 0.1)) == hash(jaxq.LoRA(2, 1.0, 0.1))
  for bad in (0, -1, 1.5, True, "4"):
    with pytest.raises(ValueError, match="LoRA.rank must be an int >= 1"):
      jaxq.LoRA(bad)
  for bad in (0, -1.0, float("nan"), float("inf"), "1", True):
    with pytest.raises(ValueError, match="LoRA.alpha must be a finite number > 0"):
      jaxq.LoRA(4, alpha=bad)
  for bad in (1.0, -0.1, float("nan"), None):
    with pytest.raises(ValueError, match=r"LoRA.dropout must be a number in \[0, 1\)"):
      jaxq.LoRA(4, dropout=bad)
  with pytest.raises(ValueError, match="Rule.lora must be a jaxq.LoRA"):
    jaxq.Rule(lora=4)
  assert jaxq.Rule("q", weight=NF4, lora=jaxq.LoRA(8)).lora.rank == 8


def test_nf4_spec_validation():
  base = dict(bits=4, scheme="nf4", granularity="group", group_size=64)
  jaxq.QuantSpec(**base)
  bad = [({"bits": 8}, r"QuantSpec.bits must be 4"),
         ({"granularity": "channel", "group_size": None}, "granularity must be 'group'"),
         ({"symmetric": False}, "symmetric must be True"),
         ({"signed": False}, "signed must be True"),
         ({"estimator": "lsq"}, "estimator must be 'ste'"),
         ({"rounding": "stochastic"}, "rounding must be 'nearest'"),
         ({"calibration": "mse"}, "calibration must be 'minmax'"),
         ({"pow2_scale": True}, "pow2_scale must be False")]
  for change, msg in bad:
    with pytest.raises(ValueError, match=msg):
      jaxq.QuantSpec(**{**base, **change})
  with pytest.raises(ValueError, match="group_size must be a positive int"):
    jaxq.QuantSpec(4, scheme="nf4", granularity="group")
  with pytest.raises(ValueError, match="Rule.act: QuantSpec.scheme='nf4' is a weight-only"):
    jaxq.Rule(act=jaxq.QuantSpec(**base))
  with pytest.raises(ValueError, match="'uniform' or 'nf4' for weights"):
    jaxq.Rule(weight=jaxq.QuantSpec(scheme="log2", signed=False))


# --------------------------------------------------------------------------------------
# Tree level: trainable, freeze, merge
# --------------------------------------------------------------------------------------

RULES = (jaxq.Rule("attn/q", weight=NF4, lora=LORA),
         jaxq.Rule("attn/o", weight=jaxq.QuantSpec(8), lora=jaxq.LoRA(2)),
         jaxq.Rule("blocks", weight=NF4, lora=jaxq.LoRA(2)),
         jaxq.Rule("plain", weight=None, lora=jaxq.LoRA(2)),
         jaxq.Rule(".*", weight=None))


class _QModel:  # what freeze / merge read of a quantized model
  rules = RULES


def _params(seed=30):
  f = lambda i, *shape: jnp.asarray(_normal(seed + i, shape), jnp.float32)
  return {
      # DenseGeneral(features=(2, 8)) over 16 inputs: kernel (16, 2, 8), bias (2, 8)
      "attn": {"q": {"kernel": f(0, 16, 2, 8), "bias": f(1, 2, 8),
                     "lora_a": f(2, 16, 3), "lora_b": f(3, 3, 16)},
               "o": {"kernel": f(4, 16, 12), "lora_a": f(5, 16, 2), "lora_b": f(6, 2, 12)}},
      # nn.scan stack of 2 Dense(8) layers over 8 inputs
      "blocks": {"kernel": f(7, 2, 8, 8), "bias": f(8, 2, 8), "lora_a": f(9, 2, 8, 2),
                 "lora_b": f(10, 2, 2, 8)},
      "plain": {"kernel": f(11, 8, 4), "lora_a": f(12, 8, 2), "lora_b": f(13, 2, 4)},
      "head": {"kernel": f(14, 8, 3), "bias": f(15, 3)},
  }


@pytest.fixture(scope="module")
def frozen_params():
  params = _params()
  return params, jaxq.lora.freeze(_QModel, {"params": params, "batch_stats": {"x": 1}})


def test_trainable_mask_selects_exactly_the_adapters(frozen_params):
  frozen = frozen_params[1]["params"]
  for tree in (_params(), frozen):
    mask = jaxq.lora.trainable(tree)
    flat = {"/".join(str(k.key) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert {k for k, v in flat.items() if v} == {
        f"{l}/{n}" for l in ("attn/q", "attn/o", "blocks", "plain")
        for n in ("lora_a", "lora_b")}
  # optax: adapters move, everything else (the QArray base included) stays
  tx = optax.multi_transform({True: optax.adamw(1e-2), False: optax.set_to_zero()},
                             jaxq.lora.trainable(frozen))
  grads = jax.tree.map(jnp.ones_like, frozen)
  updates, _ = jax.jit(tx.update)(grads, tx.init(frozen), frozen)
  new = optax.apply_updates(frozen, updates)
  assert not np.array_equal(new["attn"]["q"]["lora_b"], frozen["attn"]["q"]["lora_b"])
  for path in (("attn", "q", "kernel"), ("head", "kernel"), ("blocks", "bias")):
    old_leaf, new_leaf = frozen, new
    for k in path:
      old_leaf, new_leaf = old_leaf[k], new_leaf[k]
    for o, n_ in zip(jax.tree.leaves(old_leaf), jax.tree.leaves(new_leaf)):
      np.testing.assert_array_equal(o, n_)


def test_freeze_packs_the_base_and_leaves_outputs_unchanged(frozen_params):
  params, frozen = frozen_params
  assert frozen["batch_stats"] == {"x": 1}
  p = frozen["params"]
  q = p["attn"]["q"]["kernel"]
  assert isinstance(q, QArray) and q.spec == NF4 and q.group_axis == 0
  k, n, g = 16, 16, NF4.group_size
  assert q.nbytes == k * n // 2 + 4 * (k // g) * n + 1  # codes + float32 absmax + zero
  # the frozen base is what QAT fake-quantizes on the (K, N) view: outputs unchanged
  w = params["attn"]["q"]["kernel"]
  np.testing.assert_array_equal(dequantize(q),
                                nf4.nf4_fake_quant(w.reshape(16, 16), g).reshape(w.shape))
  o = p["attn"]["o"]["kernel"]
  assert isinstance(o, QArray) and o.bits == 8 and o.values.dtype == jnp.int8
  stack = p["blocks"]["kernel"]
  assert stack.shape == (8, 8) and stack.values.shape == (2, 8, 4)
  for i in range(2):
    np.testing.assert_array_equal(jax.tree.map(lambda v: v[i], stack).dequantize(),
                                  nf4.nf4_fake_quant(params["blocks"]["kernel"][i], g))
  assert p["plain"]["kernel"] is params["plain"]["kernel"]  # no weight spec: float
  assert p["head"]["kernel"] is params["head"]["kernel"]
  assert not isinstance(params["attn"]["q"]["kernel"], QArray)  # the input is not mutated
  again = jaxq.lora.freeze(RULES, p)  # idempotent; rules given directly
  assert again["attn"]["q"]["kernel"] is q


def test_freeze_compact_scales_double_quantizes_nf4():
  w = jnp.asarray(_normal(40, (1024, 8)), jnp.float32)
  params = {"attn": {"q": {"kernel": w, "lora_a": jnp.zeros((1024, 3)),
                           "lora_b": jnp.zeros((3, 8))}}}
  plain = jaxq.lora.freeze(RULES, params)["attn"]["q"]["kernel"]
  small = jaxq.lora.freeze(RULES, params, compact_scales=True)["attn"]["q"]["kernel"]
  groups = 1024 // 4 * 8
  assert isinstance(small.scale, nf4.DoubleQuantAbsmax)
  assert small.nbytes == 1024 * 8 // 2 + groups + 4 * (groups // 256) + 4 + 1
  assert plain.nbytes - small.nbytes == 3 * groups - 4 * (groups // 256) - 4
  err = np.abs(np.asarray(dequantize(small)) - np.asarray(dequantize(plain)))
  assert 0 < err.max() <= 0.01 * float(jnp.max(jnp.abs(w)))


def test_merge_equals_dequantized_base_plus_scaled_adapter(frozen_params):
  params, frozen = frozen_params
  for variables in ({"params": params}, frozen):
    merged = jaxq.lora.merge(_QModel, variables)["params"]
    src = variables["params"]
    for path, lora in (("attn/q", LORA), ("attn/o", jaxq.LoRA(2)), ("plain", jaxq.LoRA(2))):
      node = functools.reduce(lambda t, k: t[k], path.split("/"), src)
      out = functools.reduce(lambda t, k: t[k], path.split("/"), merged)
      assert set(out) == set(node) - {"lora_a", "lora_b"}
      kernel = node["kernel"]
      w = np.asarray(dequantize(kernel) if isinstance(kernel, QArray) else kernel)
      ab = lora.scaling * np.asarray(node["lora_a"], np.float64) @ np.asarray(node["lora_b"])
      np.testing.assert_allclose(out["kernel"], w + ab.reshape(w.shape), rtol=1e-6,
                                 atol=1e-6)
    blocks = src["blocks"]
    for i in range(2):
      k_i = blocks["kernel"]
      w = np.asarray(jax.tree.map(lambda v: v[i], k_i).dequantize()
                     if isinstance(k_i, QArray) else k_i[i])
      ab = 1.0 * np.asarray(blocks["lora_a"][i], np.float64) @ np.asarray(blocks["lora_b"][i])
      np.testing.assert_allclose(merged["blocks"]["kernel"][i], w + ab, rtol=1e-6,
                                 atol=1e-6)


def test_tree_level_bad_input_names_the_layer():
  params = _params()
  with pytest.raises(ValueError, match="layer 'head' holds a LoRA adapter but no rule"):
    jaxq.lora.freeze(RULES, {**params, "head": {**params["head"], "lora_a": jnp.zeros(
        (8, 2)), "lora_b": jnp.zeros((2, 3))}})
  with pytest.raises(ValueError, match=r"layer 'attn/o'.*\(K, 2\) and \(2, N\)"):
    jaxq.lora.merge(RULES, {"attn": {"o": {**params["attn"]["o"],
                                           "lora_a": jnp.zeros((16, 3))}}})
  # an einsum kernel contracting its last axis needs contract=
  eins = {"plain": {"kernel": jnp.asarray(_normal(50, (4, 6))), "lora_a": jnp.ones((6, 2)),
                    "lora_b": jnp.ones((2, 4))}}
  with pytest.raises(ValueError, match="layer 'plain': cannot tell"):
    jaxq.lora.merge(RULES, eins)
  out = jaxq.lora.merge(RULES, eins, contract={"plain": (1,)})
  np.testing.assert_allclose(out["plain"]["kernel"], eins["plain"]["kernel"] + 2.0,
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r"layer 'plain': contract=\(0,\)"):
    jaxq.lora.merge(RULES, eins, contract={"plain": (0,)})
  with pytest.raises(ValueError, match="layer 'attn/q'.*group_size=4 must divide"):
    jaxq.lora.freeze(RULES, {"attn": {"q": {"kernel": jnp.zeros((6, 8)),
                                            "lora_a": jnp.zeros((6, 3)),
                                            "lora_b": jnp.zeros((3, 8))}}})


def test_training_the_adapters_of_a_frozen_base_changes_nothing_else(frozen_params):
  frozen = frozen_params[1]["params"]
  adapters, rest = jaxq.lora.split(frozen)
  assert jaxq.lora.combine(adapters, rest).keys() == frozen.keys()
  assert set(adapters) == {"attn", "blocks", "plain"} and set(adapters["blocks"]) == {
      "lora_a", "lora_b"} and "lora_a" not in rest["blocks"]
  q = rest["attn"]["q"]
  x = jnp.asarray(_normal(60, (4, 16)), jnp.float32)
  target = jnp.asarray(_normal(61, (4, 2, 8)), jnp.float32)

  def loss(ad):
    p = jaxq.lora.combine(ad, rest)["attn"]["q"]
    op = _dense(x, jnp.zeros((16, 2, 8)))  # the layer's placeholder; base from the QArray
    base = llora.frozen_base(op, "attn/q", p["kernel"])
    y = llora.lora_contraction(op, base.compute(base.lhs, base.rhs) + p["bias"],
                               p["lora_a"], p["lora_b"], LORA)
    return jnp.mean((y - target) ** 2)

  tx = optax.adamw(1e-2)

  @jax.jit
  def step(ad, st):
    updates, st = tx.update(jax.grad(loss)(ad), st, ad)
    return optax.apply_updates(ad, updates), st

  ad, st = adapters, tx.init(adapters)
  first = float(loss(ad))
  for _ in range(5):
    ad, st = step(ad, st)
  assert float(loss(ad)) < first
  assert not np.array_equal(ad["attn"]["q"]["lora_b"], adapters["attn"]["q"]["lora_b"])
  after = jaxq.lora.combine(ad, rest)
  for a, b in zip(jax.tree.leaves(after["attn"]["q"]["kernel"]), jax.tree.leaves(q["kernel"])):
    assert a is b  # the frozen base is untouched (bit-identical, not even copied)
