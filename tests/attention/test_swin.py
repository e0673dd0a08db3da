"""Swin (shifted) window attention against explicit per-window loops, and its building blocks."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jaxlab.attention import swin

B, H, W, WIN, SHIFT, N, HD = 2, 8, 8, 4, 2, 2, 4


def rand(key, shape):
  return jax.random.normal(key, shape, jnp.float32)


def paper_region_labels(h, w, window, shift):
  """Region labels of the rolled map, written as in the paper's code (img_mask with 3x3 slices)."""
  img = np.zeros((h, w), np.int64)
  if shift == 0:
    return img
  cnt = 0
  for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
    for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
      img[hs, ws] = cnt
      cnt += 1
  return img


def explicit_window_attention(xp, q, k, v, table, window, shift, use_regions=True):
  """Loops over windows (batch and heads vectorised); tokens of a window are read straight from the rolled map.

  xp is np (float64 reference) or jnp (differentiable). q, k, v: [B, H, W, N, Hd]; table: [(2w-1)^2, N].
  """
  b, h, w, n, hd = q.shape
  labels = paper_region_labels(h, w, window, shift if use_regions else 0)
  if shift:
    q, k, v = (xp.roll(x, (-shift, -shift), axis=(1, 2)) for x in (q, k, v))
  t = window * window
  bias_index = np.zeros((t, t), np.int64)
  for i in range(t):
    for j in range(t):
      dy = i // window - j // window
      dx = i % window - j % window
      bias_index[i, j] = (dy + window - 1) * (2 * window - 1) + (dx + window - 1)
  bias = xp.transpose(table[bias_index], (2, 0, 1)) if table is not None else 0.0  # [N, T, T]
  row_blocks = []
  for wy in range(h // window):
    col_blocks = []
    for wx in range(w // window):
      sl = (slice(None), slice(wy * window, (wy + 1) * window),
            slice(wx * window, (wx + 1) * window))
      qw, kw, vw = (x[sl].reshape(b, t, n, hd) for x in (q, k, v))
      lab = labels[sl[1:]].reshape(t)
      allowed = lab[:, None] == lab[None, :]
      logits = xp.einsum("binh,bjnh->bnij", qw, kw) / np.sqrt(hd) + bias
      logits = xp.where(allowed, logits, -1e30)
      p = xp.exp(logits - logits.max(axis=-1, keepdims=True))
      p = p / p.sum(axis=-1, keepdims=True)
      o = xp.einsum("bnij,bjnh->binh", p, vw).reshape(b, window, window, n, hd)
      col_blocks.append(o)
    row_blocks.append(xp.concatenate(col_blocks, axis=2))
  out = xp.concatenate(row_blocks, axis=1)
  if shift:
    out = xp.roll(out, (shift, shift), axis=(1, 2))
  return out


def make_qkv_table(seed=0, n=N):
  kq, kk, kv, kt = jax.random.split(jax.random.key(seed), 4)
  shape = (B, H, W, n, HD)
  table = rand(kt, ((2 * WIN - 1) ** 2, n))
  return rand(kq, shape), rand(kk, shape), rand(kv, shape), table


def test_partition_reverse_round_trip_and_order():
  x = rand(jax.random.key(0), (B, H, W, 3))
  win = swin.window_partition(x, WIN)
  assert win.shape == (B * (H // WIN) * (W // WIN), WIN * WIN, 3)
  # Window index = (b, window row, window col) row-major; tokens row-major inside the window.
  np.testing.assert_array_equal(win[4 + 1], np.asarray(x[1, 0:4, 4:8]).reshape(16, 3))
  np.testing.assert_array_equal(win[2], np.asarray(x[0, 4:8, 0:4]).reshape(16, 3))
  np.testing.assert_array_equal(swin.window_reverse(win, WIN, H, W), x)
  # Several trailing axes (heads, head_dim) too.
  y = rand(jax.random.key(1), (B, H, W, N, HD))
  np.testing.assert_array_equal(swin.window_reverse(swin.window_partition(y, WIN), WIN, H, W), y)


@pytest.mark.parametrize("use_table", [True, False])
def test_no_shift_matches_numpy_loop(use_table):
  q, k, v, table = make_qkv_table(0)
  table = table if use_table else None
  out = swin.window_attention(q, k, v, window=WIN, rel_bias_table=table)
  assert out.shape == q.shape and out.dtype == jnp.float32
  args = [np.asarray(a, np.float64) for a in (q, k, v)]
  ref = explicit_window_attention(np, *args, None if table is None else np.asarray(table, np.float64),
                                  WIN, 0)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_shift_matches_numpy_loop_with_paper_regions():
  q, k, v, table = make_qkv_table(1)
  out = swin.window_attention(q, k, v, window=WIN, shift=SHIFT, rel_bias_table=table)
  args = [np.asarray(a, np.float64) for a in (q, k, v, table)]
  ref = explicit_window_attention(np, *args, WIN, SHIFT)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  # The boundary mask and the roll both matter: neither unshifted nor unmasked agrees.
  unshifted = explicit_window_attention(np, *args, WIN, 0)
  assert np.abs(np.asarray(out) - unshifted).max() > 1e-2
  unmasked = explicit_window_attention(np, *args, WIN, SHIFT, use_regions=False)
  assert np.abs(np.asarray(out) - unmasked).max() > 1e-2


def test_non_square_map_and_shift_one():
  kq, kk, kv, kt = jax.random.split(jax.random.key(13), 4)
  shape = (1, 8, 12, N, HD)
  q, k, v = rand(kq, shape), rand(kk, shape), rand(kv, shape)
  table = rand(kt, ((2 * WIN - 1) ** 2, N))
  out = swin.window_attention(q, k, v, window=WIN, shift=1, rel_bias_table=table, scale=0.3)
  args = [np.asarray(a, np.float64) for a in (q * 0.3 * np.sqrt(HD), k, v, table)]
  np.testing.assert_allclose(out, explicit_window_attention(np, *args, WIN, 1), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("shift", [0, SHIFT])
def test_gradients_match_jnp_loop(shift):
  q, k, v, table = make_qkv_table(2)
  w_out = rand(jax.random.key(9), q.shape)

  def loss_impl(q, k, v, table):
    return (swin.window_attention(q, k, v, window=WIN, shift=shift, rel_bias_table=table)
            * w_out).sum()

  def loss_ref(q, k, v, table):
    return (explicit_window_attention(jnp, q, k, v, table, WIN, shift) * w_out).sum()

  np.testing.assert_allclose(loss_impl(q, k, v, table), loss_ref(q, k, v, table), rtol=1e-5)
  g_impl = jax.jit(jax.grad(loss_impl, argnums=(0, 1, 2, 3)))(q, k, v, table)
  g_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2, 3)))(q, k, v, table)
  for name, a, r in zip("qkvt", g_impl, g_ref):
    assert np.abs(np.asarray(r)).max() > 1e-3, name
    np.testing.assert_allclose(a, r, atol=2e-5, rtol=2e-5, err_msg=name)


def test_gqa_heads():
  """k/v with fewer heads than q (N % K == 0) equals repeating them."""
  q, k, v, table = make_qkv_table(3, n=4)
  k, v = k[..., :2, :], v[..., :2, :]
  attend = jax.jit(lambda q, k, v: swin.window_attention(q, k, v, window=WIN, shift=SHIFT,
                                                         rel_bias_table=table))
  rep = lambda x: jnp.repeat(x, 2, axis=3)
  out, ref = attend(q, k, v), attend(q, rep(k), rep(v))
  np.testing.assert_allclose(out, ref, atol=1e-6)


def test_mask_structure():
  t = WIN * WIN
  m0 = swin.shifted_window_mask(H, W, WIN, 0)
  assert m0.shape == (4, t, t) and m0.dtype == bool and m0.all()
  m = swin.shifted_window_mask(H, W, WIN, SHIFT)
  assert m.shape == (4, t, t)
  assert m[0].all()  # top-left window lies inside one region
  # Every token attends to itself; the mask is symmetric.
  assert all(m[w].diagonal().all() for w in range(4))
  np.testing.assert_array_equal(m, np.swapaxes(m, 1, 2))
  # Tokens of window (r, c) in row-major order at (y, x); regions split at offset WIN - SHIFT.
  ys, xs = np.divmod(np.arange(t), WIN)
  top, left = ys < WIN - SHIFT, xs < WIN - SHIFT
  same = lambda a: a[:, None] == a[None, :]
  np.testing.assert_array_equal(m[1], same(left))                    # top-right: left | right
  np.testing.assert_array_equal(m[2], same(top))                     # bottom-left: top / bottom
  np.testing.assert_array_equal(m[3], same(top) & same(left))        # bottom-right: 4 blocks
  assert m[3].sum() == 4 * (t // 4) ** 2
  # Agrees with the paper-code labelling written in this file.
  lab = paper_region_labels(H, W, WIN, SHIFT)
  lw = lab.reshape(H // WIN, WIN, W // WIN, WIN).transpose(0, 2, 1, 3).reshape(4, t)
  np.testing.assert_array_equal(m, lw[:, :, None] == lw[:, None, :])


@pytest.mark.parametrize("window", [1, 2, 4])
def test_relative_position_index(window):
  idx = swin.relative_position_index(window)
  t = window * window
  assert idx.shape == (t, t) and np.issubdtype(idx.dtype, np.integer)
  # Decode with an independently built table of offsets: entry e <-> (dy, dx) enumerated row-major.
  offsets = [(dy, dx) for dy in range(-(window - 1), window) for dx in range(-(window - 1), window)]
  pos = [(i // window, i % window) for i in range(t)]
  for i in range(t):
    for j in range(t):
      assert offsets[idx[i, j]] == (pos[i][0] - pos[j][0], pos[i][1] - pos[j][1])
  # (dy, dx) and (-dy, -dx) sit mirrored around the centre entry; the diagonal is the centre.
  centre = ((2 * window - 1) ** 2) // 2
  np.testing.assert_array_equal(idx + idx.T, 2 * centre)
  np.testing.assert_array_equal(np.diag(idx), centre)
  assert set(np.unique(idx)) == set(range((2 * window - 1) ** 2))


def test_swin_attention_module_matches_explicit_composition():
  c = 8
  x = rand(jax.random.key(4), (B, H, W, c))
  params = jax.jit(swin.SwinAttention(num_heads=N, window=WIN).init)(jax.random.key(5), x)["params"]
  p = jax.tree.map(lambda a: getattr(a, "value", a), params, is_leaf=lambda a: hasattr(a, "value"))
  table = p["relative_position_bias_table"]
  assert table.shape == ((2 * WIN - 1) ** 2, N)
  assert p["qkv"]["kernel"].shape == (c, 3, N, c // N) and p["out"]["kernel"].shape == (N, c // N, c)
  assert np.abs(np.asarray(table)).max() <= 2 * 0.02 + 1e-7 and 0.005 < np.std(table) < 0.03
  # Randomise the table and biases so a bug in any of them shows.
  p["relative_position_bias_table"] = rand(jax.random.key(6), table.shape)
  p["qkv"]["bias"] = rand(jax.random.key(11), p["qkv"]["bias"].shape)
  p["out"]["bias"] = rand(jax.random.key(12), p["out"]["bias"].shape)
  for shift in (0, SHIFT):
    mod = swin.SwinAttention(num_heads=N, window=WIN, shift=shift)
    y = jax.jit(mod.apply)({"params": p}, x)
    assert y.shape == x.shape

    @jax.jit
    def reference(p, x):
      qkv = jnp.einsum("bhwc,csnd->bhwsnd", x, p["qkv"]["kernel"]) + p["qkv"]["bias"]
      a = explicit_window_attention(jnp, qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :],
                                    p["relative_position_bias_table"], WIN, shift)
      return jnp.einsum("bhwnd,ndc->bhwc", a, p["out"]["kernel"]) + p["out"]["bias"]

    ref = reference(p, x)
    np.testing.assert_allclose(y, ref, atol=2e-5, rtol=2e-5)


def test_patch_merging_matches_explicit():
  c = 3
  x = rand(jax.random.key(7), (B, H, W, c))
  mod = swin.PatchMerging()
  params = jax.jit(mod.init)(jax.random.key(8), x)["params"]
  p = jax.tree.map(lambda a: getattr(a, "value", a), params, is_leaf=lambda a: hasattr(a, "value"))
  kg, kb = jax.random.split(jax.random.key(10))
  p["norm"]["scale"] = 1.0 + rand(kg, (4 * c,))
  p["norm"]["bias"] = rand(kb, (4 * c,))
  y = jax.jit(mod.apply)({"params": p}, x)
  assert y.shape == (B, H // 2, W // 2, 2 * c)
  xn = np.asarray(x, np.float64)
  cat = np.zeros((B, H // 2, W // 2, 4 * c))
  for i in range(H // 2):
    for j in range(W // 2):
      cat[:, i, j] = np.concatenate([xn[:, 2 * i, 2 * j], xn[:, 2 * i + 1, 2 * j],
                                     xn[:, 2 * i, 2 * j + 1], xn[:, 2 * i + 1, 2 * j + 1]], -1)
  mu, var = cat.mean(-1, keepdims=True), cat.var(-1, keepdims=True)
  normed = (cat - mu) / np.sqrt(var + 1e-5) * np.asarray(p["norm"]["scale"]) + np.asarray(
      p["norm"]["bias"])
  ref = normed @ np.asarray(p["reduction"]["kernel"], np.float64)
  np.testing.assert_allclose(y, ref, atol=2e-5, rtol=2e-5)


def test_bad_shapes_name_the_argument():
  q = jnp.zeros((1, 6, 8, 2, 4))
  with pytest.raises(ValueError, match="q: height H=6"):
    swin.window_attention(q, q, q, window=4)
  q = jnp.zeros((1, 8, 8, 2, 4))
  with pytest.raises(ValueError, match="shift"):
    swin.window_attention(q, q, q, window=4, shift=4)
  with pytest.raises(ValueError, match="window"):
    swin.window_attention(q, q, q, window=0)
  with pytest.raises(ValueError, match="window must be a positive int, got True"):  # a bool: was 1
    swin.window_attention(q, q, q, window=True)
  with pytest.raises(ValueError, match="shift must be an int .* got False"):
    swin.window_attention(q, q, q, window=4, shift=False)
  with pytest.raises(ValueError, match="rel_bias_table"):
    swin.window_attention(q, q, q, window=4, rel_bias_table=jnp.zeros((49, 3)))
  with pytest.raises(ValueError, match="rel_bias_table"):
    swin.window_attention(q, q, q, window=4, rel_bias_table=jnp.zeros((48, 2)))
  with pytest.raises(ValueError, match="q must be"):
    swin.window_attention(q[..., 0], q, q, window=4)
  with pytest.raises(ValueError, match="k and v"):
    swin.window_attention(q, q, q[:, :, :, :1], window=4)
  with pytest.raises(ValueError, match="x: height"):
    swin.window_partition(jnp.zeros((1, 8, 6, 3)), 4)
  with pytest.raises(ValueError, match="windows must be"):
    swin.window_reverse(jnp.zeros((3, 16, 3)), 4, 8, 8)
  with pytest.raises(ValueError, match="even"):
    swin.PatchMerging().init(jax.random.key(0), jnp.zeros((1, 5, 4, 3)))
  with pytest.raises(ValueError, match="num_heads"):
    swin.SwinAttention(num_heads=3, window=4).init(jax.random.key(0), jnp.zeros((1, 8, 8, 8)))
  with pytest.raises(ValueError, match="x: height"):
    swin.SwinAttention(num_heads=2, window=4).init(jax.random.key(0), jnp.zeros((1, 8, 6, 8)))


def test_bias_table_enters_in_param_dtype_under_bfloat16_compute():
  """With dtype=bfloat16 the relative-position bias is added to the float32 logits at its own precision:
  a table near 64 (bfloat16 spacing 0.5 there) with offsets of up to 0.4 would lose them if it were
  cast to the compute dtype. q = 0 makes the logits the bias alone; x, v and the projections are small
  integers, exact in bfloat16, so only the output's rounding separates the two dtypes."""
  c = 8
  x = jnp.asarray(np.random.default_rng(0).integers(-4, 5, (B, H, W, c)), jnp.float32)
  mod = lambda dtype: swin.SwinAttention(num_heads=N, window=WIN, dtype=dtype)
  params = jax.jit(mod(jnp.float32).init)(jax.random.key(5), x)["params"]
  p = jax.tree.map(lambda a: getattr(a, "value", a), params, is_leaf=lambda a: hasattr(a, "value"))
  kernel = np.zeros(p["qkv"]["kernel"].shape, np.float32)  # [c, 3, N, c//N]: q = k = 0, v = x
  kernel[:, 2] = np.eye(c, dtype=np.float32).reshape(c, N, c // N)
  p["qkv"]["kernel"], p["qkv"]["bias"] = jnp.asarray(kernel), jnp.zeros_like(p["qkv"]["bias"])
  p["out"]["kernel"] = jnp.asarray(np.eye(c, dtype=np.float32).reshape(N, c // N, c))
  p["out"]["bias"] = jnp.zeros_like(p["out"]["bias"])
  table = p["relative_position_bias_table"]
  p["relative_position_bias_table"] = 64.0 + jax.random.uniform(jax.random.key(7), table.shape) * 0.4
  y32 = jax.jit(mod(jnp.float32).apply)({"params": p}, x)
  y16 = jax.jit(mod(jnp.bfloat16).apply)({"params": p}, x)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=3e-2, rtol=1e-2)
  # The same check fails with the table rounded to bfloat16 (the offsets then vanish).
  p16 = dict(p, relative_position_bias_table=p["relative_position_bias_table"].astype(jnp.bfloat16))
  y_rounded = jax.jit(mod(jnp.float32).apply)({"params": p16}, x)
  assert np.abs(np.asarray(y_rounded) - np.asarray(y32)).max() > 0.1
