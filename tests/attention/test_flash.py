"""Pallas flash attention (implementation="pallas") against the XLA reference, on CPU in interpret mode.

Values and dQ/dK/dV must match `xla_attention` for each mask feature (causal, separate q/kv segment ids,
lengths, sliding window, GQA/MQA, all combined) with odd lengths and Tq != Tk, and for each input dtype
with a stated tolerance. Blocks are deliberately small (8 or 16) so every case has several tiles and a
ragged tail. Interpret mode compiles each kernel into an XLA loop, so the grid is small and each case runs
value and gradients of both implementations in one jitted function.

The Mosaic TPU kernels run in TPU interpret mode (`pltpu.InterpretParams`, which simulates each grid
step and is slower still): one case with every mask feature and GQA at once.

Also: the causal/window block ranges skip exactly the fully hidden tiles, no O(T^2) intermediate exists
in forward or backward, the compiled GPU kernels lower through Triton and the TPU kernels through
Mosaic (lowering only: no accelerator here).
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from attention_test_utils import max_intermediate_size, qkv_inputs, segment_ids

from jaxlab.attention import dot_product_attention, flash
from jaxlab.attention.flash import flash_attention, portable
from jaxlab.attention.masks import make_mask
from jaxlab.attention.softmax import xla_attention

SCALE = 0.37  # not 1/sqrt(H), so a dropped or doubled scale shows


def _mask_arrays(kind, b, tq, tk):
  if kind is None:
    return {}
  if kind == "segments":  # separate q and kv ids (Tq != Tk), one id present on one side only
    return dict(q_segment_ids=segment_ids(b, tq, [[5], [3, 8]]),
                kv_segment_ids=segment_ids(b, tk, [[12, 20], [6, 17]]))
  if kind == "lengths":
    return dict(q_lengths=jnp.array([9, 13], jnp.int32), kv_lengths=jnp.array([17, 0], jnp.int32))
  if kind == "all":
    return dict(q_segment_ids=segment_ids(b, tq, [[4], [9]]),
                kv_segment_ids=segment_ids(b, tk, [[21], [25]]),
                q_lengths=jnp.array([13, 11], jnp.int32), kv_lengths=jnp.array([27, 29], jnp.int32))
  raise ValueError(kind)


def _both(q, k, v, ct, static_mask, arrays, block, ref_dtypes=(None,), kernel="portable",
          soft_cap=None):
  """[(out, dq, dk, dv) of pallas, then the same of xla for each of ref_dtypes (None = q's dtype)]."""
  b, tq = q.shape[:2]
  tk = k.shape[1]

  @jax.jit
  def run(q, k, v, ct, arrays):
    mask = make_mask(tq, tk, b, **static_mask, **arrays)
    pallas = lambda q, k, v: flash_attention(q, k, v, mask, scale=SCALE, block_q=block[0],
                                             block_k=block[1], interpret=True, kernel=kernel,
                                             soft_cap=soft_cap)
    xla = lambda q, k, v: xla_attention(q, k, v, mask, scale=SCALE, soft_cap=soft_cap)
    results = []
    runs = [(pallas, (q, k, v, ct))] + [
        (xla, tuple(x.astype(dtype or x.dtype) for x in (q, k, v, ct))) for dtype in ref_dtypes]
    for fn, args in runs:
      out, vjp = jax.vjp(fn, *args[:3])
      results.append((out,) + vjp(args[3]))
    return results

  return run(q, k, v, ct, arrays)


# (id, B, Tq, Tk, N, K, H, static mask, mask arrays, (block_q, block_k))
CASES = [
    ("dense_gqa", 2, 13, 29, 4, 2, 16, {}, None, (8, 16)),
    ("causal_tq_lt_tk", 1, 13, 29, 2, 2, 16, dict(causal=True), None, (8, 8)),
    ("causal_tq_gt_tk_empty_rows", 1, 29, 13, 2, 1, 16, dict(causal=True), None, (8, 8)),
    ("window_mqa", 1, 29, 29, 4, 1, 16, dict(window=(5, 2)), None, (8, 8)),
    ("window_one_sided", 1, 13, 29, 2, 2, 16, dict(window=(None, 3)), None, (8, 8)),
    ("segments_separate_q_kv", 2, 13, 29, 2, 2, 16, {}, "segments", (8, 8)),
    ("lengths_with_empty_batch_row", 2, 13, 29, 2, 1, 16, dict(causal=True), "lengths", (8, 8)),
    ("all_combined_gqa", 2, 13, 29, 4, 2, 16, dict(causal=True, window=(9, None)), "all", (8, 8)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_values_and_gradients_match_reference(case):
  name, b, tq, tk, n, kh, h, static_mask, kind, block = case
  q, k, v, ct = qkv_inputs(len(name), b, tq, tk, n, kh, h)
  (out, *grads), (ref, *ref_grads) = _both(q, k, v, ct, static_mask, _mask_arrays(kind, b, tq, tk),
                                           block)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  for gname, g, r, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype, gname
    assert np.isfinite(np.asarray(g)).all(), gname
    np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5, err_msg=gname)


@pytest.mark.parametrize("kernel", ["portable", "tpu"])
def test_logit_soft_cap_values_and_gradients_match_reference(kernel):
  """Gemma 2's soft cap c * tanh(s / c) in the forward and its derivative 1 - tanh^2 in both backward
  kernels, with GQA, causal and segments; c = 1 saturates most logits (their sd is ~1.5 here), so a
  dropped cap or a missing derivative moves every output and gradient."""
  b, tq, tk, n, kh, h = 2, 13, 21, 4, 2, 16
  q, k, v, ct = qkv_inputs(23, b, tq, tk, n, kh, h)
  arrays = dict(q_segment_ids=segment_ids(b, tq, [[4], [9]]),
                kv_segment_ids=segment_ids(b, tk, [[12], [17]]))
  for cap, qk_scale in ((1.0, 1.0), (2.0, 3.0)):  # c = 1 alone hid a derivative missing its 1 / c
    qs, ks = q * qk_scale, k * qk_scale
    (out, *grads), (ref, *ref_grads) = _both(qs, ks, v, ct, dict(causal=True), arrays, (8, 8),
                                             kernel=kernel, soft_cap=cap)
    (uncapped, *_), = _both(qs, ks, v, ct, dict(causal=True), arrays, (8, 8), ref_dtypes=())
    assert np.abs(np.asarray(uncapped - out)).max() > 1e-2  # the cap matters at these logits
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
      np.testing.assert_allclose(got, want, atol=5e-5 * qk_scale, rtol=5e-5, err_msg=name)


def test_rows_that_see_no_key_are_exact_zeros():
  """Causal with Tq > Tk: the first Tq - Tk queries precede every key; kv_length 0 empties a batch row."""
  b, tq, tk, n, kh, h = 2, 21, 9, 2, 1, 16
  q, k, v, ct = qkv_inputs(5, b, tq, tk, n, kh, h)
  arrays = dict(kv_lengths=jnp.array([9, 0], jnp.int32))
  (out, dq, dk, dv), _ = _both(q, k, v, ct, dict(causal=True), arrays, (8, 8))
  np.testing.assert_array_equal(out[0, :tq - tk], 0.0)
  np.testing.assert_array_equal(out[1], 0.0)
  np.testing.assert_array_equal(dq[0, :tq - tk], 0.0)
  for g in (dq, dk, dv):
    np.testing.assert_array_equal(g[1], 0.0)


# Per-dtype tolerance (absolute and relative) against the float32 reference on the same rounded inputs:
# bf16 has an 8-bit mantissa (~4e-3 per rounding), fp16 11 bits (~5e-4); P and dS are rounded to the
# input dtype before their matmuls, as in the reference. The kernel's error against float32 (relative
# to the largest reference entry) is bounded by a multiple of the error of the same computation by xla in
# the low dtype, plus a floor of a quarter of a rounding step: a fixed tolerance of 3e-2 for bf16 let a
# 10x loss of precision pass. out and dV match xla's error; dQ and dK take D = rowsum(dO * O) from the
# 16-bit O (as FlashAttention-2 does; `flash._flash_bwd`), which costs up to 1.5x xla's error at
# unit-variance inputs and up to ~12x on peaky attention (q, k x4: bf16 dK 4.2e-2 against 3.4e-3).
DTYPE_FLOOR = {jnp.bfloat16: 1e-3, jnp.float16: 1.2e-4}
# (q/k multiplier, {output: allowed multiple of xla's low-dtype error})
LOW_PRECISION_BOUNDS = [(1.0, {"out": 1.5, "dq": 2.0, "dk": 2.0, "dv": 1.5}),
                        (4.0, {"out": 1.5, "dq": 8.0, "dk": 16.0, "dv": 1.5})]


@pytest.mark.parametrize("qk_mult,bounds", LOW_PRECISION_BOUNDS, ids=["unit", "peaky"])
@pytest.mark.parametrize("dtype,h", [(jnp.bfloat16, 64), (jnp.float16, 128)],
                         ids=["bf16_h64", "fp16_h128"])
def test_low_precision_inputs(dtype, h, qk_mult, bounds):
  b, tq, tk, n, kh = 1, 19, 27, 4, 2
  q, k, v, ct = qkv_inputs(13, b, tq, tk, n, kh, h, dtype)
  q, k = ((x.astype(jnp.float32) * qk_mult).astype(dtype) for x in (q, k))
  static_mask = dict(causal=True, window=(11, None))
  arrays = _mask_arrays("all", 2, tq, tk)
  arrays = {key: value[:1] for key, value in arrays.items()}
  (out, *grads), ref, ref_low = _both(q, k, v, ct, static_mask, arrays, (16, 16),
                                     ref_dtypes=(jnp.float32, None))
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  f32 = lambda x: np.asarray(x, np.float32)
  for name, got, low, want in zip(("out", "dq", "dk", "dv"), [out] + grads, ref_low, ref):
    want = f32(want)
    size = np.abs(want).max()
    err, err_low = (np.abs(f32(x) - want).max() / size for x in (got, low))
    assert err_low < 20 * DTYPE_FLOOR[dtype], (name, err_low)  # the reference itself is sane
    assert err <= bounds[name] * err_low + DTYPE_FLOOR[dtype], (name, err, err_low)


@pytest.mark.parametrize("tq,tk", [(0, 5), (3, 0), (0, 0)])
def test_empty_queries_or_keys_give_zeros(tq, tk):
  """flash_attention itself (not only dot_product_attention) takes a length of 0: it raised a
  TypeError from a block slice."""
  q, k, v, _ = qkv_inputs(1, 1, tq, tk, 2, 1, 8)
  for causal in (False, True):
    out = flash_attention(q, k, v, make_mask(tq, tk, 1, causal=causal), scale=SCALE)
    assert out.shape == (1, tq, 2, 8) and out.dtype == q.dtype and not np.asarray(out).any()


def test_public_entry_point_and_dispatch():
  """`dot_product_attention(implementation="pallas")` equals xla; CPU default is unchanged; GPU default
  picks pallas only for what the kernel serves."""
  b, t, n, h = 1, 11, 2, 16
  q, k, v, _ = qkv_inputs(3, b, t, t, n, n, h)
  seg = segment_ids(b, t, [[6]], offset=1)
  kw = dict(causal=True, q_segment_ids=seg, kv_segment_ids=seg, scale=SCALE)
  both = jax.jit(lambda q, k, v: [dot_product_attention(q, k, v, implementation=impl, **kw)
                                  for impl in ("pallas", "xla")])
  np.testing.assert_allclose(*both(q, k, v), atol=2e-5)
  with pytest.raises(ValueError, match="bias"):
    dot_product_attention(q, k, v, bias=jnp.zeros((t, t)), implementation="pallas")
  capped = jax.jit(lambda q, k, v: [dot_product_attention(q, k, v, implementation=impl,
                                                          logit_soft_cap=0.5, **kw)
                                    for impl in ("pallas", "xla")])
  np.testing.assert_allclose(*capped(q, k, v), atol=2e-5)
  with pytest.raises(ValueError, match="static"):  # the kernel's cap is compiled in
    jax.jit(lambda c: flash_attention(q, k, v, make_mask(t, t, b), scale=SCALE, soft_cap=c))(0.5)
  with pytest.raises(ValueError, match="logit_soft_cap"):
    dot_product_attention(q, k, v, logit_soft_cap=5.0, implementation="cudnn")
  spec = lambda hd, dtype=jnp.bfloat16: jax.ShapeDtypeStruct((1, 8, 2, hd), dtype)
  assert flash.supports(spec(128), spec(128), spec(128), backend="gpu")[0]
  assert not flash.supports(spec(128), spec(128), spec(128), backend="cpu")[0]
  assert flash.supports(spec(128), spec(128), spec(128), backend="tpu")[0]
  assert not flash.supports(spec(80), spec(80), spec(80), backend="gpu")[0]
  assert not flash.supports(spec(64), spec(64), spec(64), bias=1.0, backend="gpu")[0]
  assert flash.supports(spec(64), spec(64), spec(64), soft_cap=5.0, backend="gpu")[0]
  seen = []
  jax.jit(lambda c: seen.append(flash.supports(spec(64), spec(64), spec(64), soft_cap=c,
                                               backend="gpu")) or c)(5.0)
  assert seen[0][0] is False and "traced" in seen[0][1]
  assert flash.supports_mosaic_gpu(spec(64), spec(64), spec(64), check_device=False)[0]
  assert not flash.supports_mosaic_gpu(spec(64), spec(64), spec(64), soft_cap=5.0,
                                       check_device=False)[0]
  if jax.default_backend() == "cpu":  # CPU default is unchanged: the traced program holds no kernel
    jaxpr = jax.make_jaxpr(lambda q, k, v: dot_product_attention(q, k, v, causal=True))(q, k, v)
    assert "pallas_call" not in str(jaxpr)


def test_bad_arguments_are_named():
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="block_q"):
    flash_attention(q, q, q, make_mask(4, 4, 1), scale=1.0, block_q=0)
  with pytest.raises(ValueError, match="mask"):
    flash_attention(q, q, q, make_mask(5, 4, 1), scale=1.0)
  with pytest.raises(ValueError, match="must have a floating dtype"):
    flash_attention(q.astype(jnp.int32), q.astype(jnp.int32), q.astype(jnp.int32),
                    make_mask(4, 4, 1), scale=1.0)
  with pytest.raises(ValueError, match="head_dim"):
    flash_attention(q, q, q, make_mask(4, 4, 1), scale=1.0, interpret=False)


@pytest.mark.parametrize("tq,tk,causal,window,bq,bk", [
    (37, 37, True, None, 8, 16), (21, 50, True, None, 16, 8), (50, 21, True, None, 8, 8),
    (40, 40, False, (7, 3), 8, 8), (33, 45, True, (10, None), 16, 8), (45, 33, False, (None, 4), 8, 16),
    (40, 40, False, (0, 0), 8, 8),
    # a block's last visible key (or a tile's first visible query) on a tile boundary: a range one
    # tile short passed every case above
    (16, 17, True, None, 8, 8), (24, 24, False, (None, 1), 8, 8), (17, 16, True, None, 8, 8),
    (24, 24, False, (1, None), 8, 8),
])
def test_block_ranges_skip_exactly_the_hidden_tiles(tq, tk, causal, window, bq, bk):
  """The loop bounds visit every tile with a visible pair (exactness) and no tile without one (skip)."""
  cfg = portable.KernelConfig(q_len=tq, kv_len=tk, causal=causal, window=window, has_segments=False,
                              scale=1.0, block_q=bq, block_k=bk, interpret=True)
  nq, nk = -(-tq // bq), -(-tk // bk)
  i_idx, j_idx = np.arange(tq)[:, None], np.arange(tk)[None, :]
  pos = i_idx + tk - tq
  visible = np.ones((tq, tk), bool)
  if causal:
    visible &= j_idx <= pos
  if window is not None:
    if window[0] is not None:
      visible &= j_idx >= pos - window[0]
    if window[1] is not None:
      visible &= j_idx <= pos + window[1]
  tile_visible = np.zeros((nq, nk), bool)
  for i in range(nq):
    for j in range(nk):
      tile_visible[i, j] = visible[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any()
  kv_visits, q_visits = np.zeros((nq, nk), bool), np.zeros((nq, nk), bool)
  for i in range(nq):
    lo, hi = portable.kv_block_range(cfg, i, nk)
    kv_visits[i, int(lo):int(hi)] = True
  for j in range(nk):
    lo, hi = portable.q_block_range(cfg, j, nq)
    q_visits[int(lo):int(hi), j] = True
  np.testing.assert_array_equal(kv_visits, tile_visible)
  np.testing.assert_array_equal(q_visits, tile_visible)
  assert not tile_visible.all()  # the case does have tiles to skip
  # The blockwise (plain XLA) path bounds its scans the same way: every visible tile, no other.
  from jaxlab.attention import blockwise
  static = blockwise._Static(make_mask(tq, tk, 1, causal=causal, window=window), 1.0, bq, bk)
  kv_range, q_range = blockwise._block_ranges(static, nq, nk)
  kv_visits[:], q_visits[:] = False, False
  for i in range(nq):
    lo, hi = kv_range(i)
    kv_visits[i, int(lo):int(hi)] = True
  for j in range(nk):
    lo, hi = q_range(j)
    q_visits[int(lo):int(hi), j] = True
  np.testing.assert_array_equal(kv_visits, tile_visible)
  np.testing.assert_array_equal(q_visits, tile_visible)


def test_no_quadratic_intermediate():
  """Forward + backward: no intermediate (inside or outside the kernels) of Tq * Tk elements or more."""
  t, h = 128, 8
  spec = jax.ShapeDtypeStruct((1, t, 1, h), jnp.float32)
  mask = make_mask(t, t, 1, causal=True)
  sizes = {}
  for name, fn in (("pallas", lambda q, k, v: flash_attention(q, k, v, mask, scale=SCALE,
                                                              block_q=16, block_k=16)),
                   ("xla", lambda q, k, v: xla_attention(q, k, v, mask, scale=SCALE))):
    grad = jax.grad(lambda q, k, v: (fn(q, k, v) ** 2).sum(), argnums=(0, 1, 2))
    jaxpr = jax.make_jaxpr(grad)(spec, spec, spec)
    if name == "pallas":
      assert "pallas_call" in str(jaxpr)
    sizes[name] = max_intermediate_size(jaxpr.jaxpr)
  assert sizes["xla"] >= t * t  # the check sees a materialised score matrix
  assert sizes["pallas"] <= t * h * 2, sizes


@pytest.mark.parametrize("h,dtype", [(64, jnp.bfloat16), (128, jnp.float16), (256, jnp.float32)])
def test_gpu_kernels_lower_through_triton(h, dtype):
  """Forward + backward with every mask feature and a logit soft cap, lowered for CUDA on this CPU
  machine: every kernel op has a Triton lowering. Not compiled or run (that needs a GPU)."""
  b, t, n, kh = 1, 300, 4, 2
  qs = jax.ShapeDtypeStruct((b, t, n, h), dtype)
  ks = jax.ShapeDtypeStruct((b, t, kh, h), dtype)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def f(q, k, v, seg):
    mask = make_mask(t, t, b, causal=True, window=(100, None), q_segment_ids=seg, kv_segment_ids=seg)
    out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, mask, scale=h ** -0.5,
                                                       interpret=False, soft_cap=30.0), q, k, v)
    return out, vjp(out)

  text = jax.jit(f).trace(qs, ks, ks, seg).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dQ, dK/dV
  mask = make_mask(t, t, b)
  for blocks in ((24, 64), (64, 8)):  # Triton's tl.dot needs power-of-two tiles of at least 16
    with pytest.raises(ValueError, match="power of two >= 16"):
      jax.jit(lambda q, k, v: flash_attention(q, k, v, mask, scale=1.0, interpret=False,
                                              block_q=blocks[0], block_k=blocks[1])
              ).trace(qs, ks, ks).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("soft_cap", [None, 0.7])
def test_gpt_runs_pallas_attention_when_configured(soft_cap):
  """The LM with attention_impl="pallas" (rope, GQA, causal, with and without a logit soft cap) runs
  the kernel and gives the xla model's logits (the kernel's gradients are tested above, with the same
  mask and GQA)."""
  from jaxlab.models.gpt import GPT, GPTConfig

  def model(impl):
    return GPT(GPTConfig(vocab_size=11, num_layers=1, width=32, num_heads=2, num_kv_heads=1,
                         max_len=16, position="rope", attention_impl=impl, logit_soft_cap=soft_cap))

  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 13)), jnp.int32)
  params = model("xla").init(jax.random.key(0), tokens)
  apply = lambda p: (model("pallas").apply(p, tokens), model("xla").apply(p, tokens))
  assert "pallas_call" in str(jax.make_jaxpr(lambda p: model("pallas").apply(p, tokens))(params))
  logits, ref = jax.jit(apply)(params)
  np.testing.assert_allclose(logits, ref, atol=2e-5, rtol=2e-5)


def test_lm_config_accepts_pallas_and_names_the_key_when_it_cannot():
  from jaxlab.configs import ConfigError, load_config
  load_config("lm_char", ["--config.model.attention_impl=pallas"])
  load_config("lm_char", ["--config.model.attention_impl=pallas", "--config.model.logit_soft_cap=30"])
  with pytest.raises(ConfigError) as e:
    load_config("lm_char", ["--config.model.attention_impl=pallas", "--config.model.position=alibi"])
  assert "config.model.attention_impl" in str(e.value) and "\n" not in str(e.value)


def test_tpu_kernels_in_tpu_interpret_mode():
  """The Mosaic TPU kernels (grid-pipelined, scratch accumulators, clamped index maps) equal xla, with
  GQA (2 query heads per kv head), odd Tq != Tk, causal + window + separate segment ids + lengths at
  once (float32)."""
  b, tq, tk, n, kh, h = 2, 13, 21, 2, 1, 16
  q, k, v, ct = qkv_inputs(17, b, tq, tk, n, kh, h)
  static_mask = dict(causal=True, window=(7, None))
  arrays = dict(q_segment_ids=segment_ids(b, tq, [[4], [9]]),
                kv_segment_ids=segment_ids(b, tk, [[12], [17]]),
                kv_lengths=jnp.array([21, 15], jnp.int32))
  (out, *grads), (ref, *ref_grads) = _both(q, k, v, ct, static_mask, arrays, (8, 8), kernel="tpu")
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5, err_msg=name)


@pytest.fixture
def tpu_info_for_cpu(monkeypatch):
  """Mosaic lowering asks the device for its TPU generation; on CPU, answer TPU v5e (private jax API,
  so skip rather than fail if it moves)."""
  try:
    from jax._src.pallas.mosaic import tpu_info
    info = lambda: tpu_info._get_tpu_info_impl(tpu_info.ChipVersion.TPU_V5E, 1)
    monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind, info)
  except (ImportError, AttributeError) as e:
    pytest.skip(f"cannot describe a TPU to Mosaic lowering on this jax: {e}")


@pytest.mark.parametrize("h,dtype", [(64, jnp.bfloat16), (128, jnp.float32), (256, jnp.bfloat16)])
def test_tpu_kernels_lower_through_mosaic(tpu_info_for_cpu, h, dtype):
  """Forward + backward with every mask feature and a logit soft cap, lowered for TPU (Mosaic checks
  block shapes against the (8, 128) tiling at this stage): not compiled or run."""
  b, t, n, kh = 1, 300, 4, 2
  qs = jax.ShapeDtypeStruct((b, t, n, h), dtype)
  ks = jax.ShapeDtypeStruct((b, t, kh, h), dtype)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def f(q, k, v, seg):
    mask = make_mask(t, t, b, causal=True, window=(100, None), q_segment_ids=seg, kv_segment_ids=seg)
    out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, mask, scale=h ** -0.5,
                                                       interpret=False, kernel="tpu",
                                                       soft_cap=30.0), q, k, v)
    return out, vjp(out)

  text = jax.jit(f).trace(qs, ks, ks, seg).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 3  # forward, dQ, dK/dV


def test_hidden_tiles_are_never_read():
  """Tq = 8 queries end-aligned on Tk = 32 keys, causal with a 7-key window: key tiles 0 and 1
  (keys 0-15) are hidden from every query. Poisoned with NaN there, the outputs and every gradient stay
  finite and dK/dV are exactly 0 on those keys, in both kernels' loops and in blockwise's scans: a
  loop over all tiles (the range tests check the ranges, not that the loops use them) reads them."""
  from jaxlab.attention.blockwise import blockwise_attention
  q, k, v, ct = qkv_inputs(31, 1, 8, 32, 2, 1, 16)
  k, v = k.at[:, :16].set(jnp.nan), v.at[:, :16].set(jnp.nan)
  mask = make_mask(8, 32, 1, causal=True, window=(7, None))
  impls = {
      "portable": lambda q, k, v: flash_attention(q, k, v, mask, scale=SCALE, block_q=8, block_k=8,
                                                  interpret=True),
      "blockwise": lambda q, k, v: blockwise_attention(q, k, v, mask, scale=SCALE, block_q=8,
                                                       block_k=8),
  }
  for name, fn in impls.items():
    out, vjp = jax.vjp(fn, q, k, v)
    dq, dk, dv = vjp(ct)
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(dq)).all(), name
    for g in (dk, dv):
      assert (np.asarray(g)[:, :16] == 0).all() and np.isfinite(np.asarray(g)[:, 16:]).all(), name
