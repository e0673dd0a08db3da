"""implementation="cudnn": a clear error off CUDA GPUs, and on one the same values and gradients as "xla".

The cuDNN path passes through to `jax.nn.dot_product_attention(implementation="cudnn")` (fused flash
attention in cuDNN, bf16/fp16 only). Note that tests/conftest.py defaults JAX_PLATFORMS to "cpu"; run
with JAX_PLATFORMS=cuda (or gpu) to exercise the GPU test.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jaxlab import attention


def _on_cuda() -> bool:
  if jax.default_backend() != "gpu":
    return False
  device = jax.devices()[0]
  version = str(getattr(device.client, "platform_version", "")).lower()
  return "cuda" in version or "nvidia" in device.device_kind.lower()


ON_CUDA = _on_cuda()
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="cuDNN attention needs a CUDA GPU backend "
                                f"(default backend here: {jax.default_backend()})")


def _inputs(seed, b, t, n, kh, h, dtype=jnp.bfloat16):
  rng = np.random.default_rng(seed)
  normal = lambda shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
  return normal((b, t, n, h)), normal((b, t, kh, h)), normal((b, t, kh, h)), normal((b, t, n, h))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error on a non-GPU backend")
def test_cudnn_off_gpu_raises_a_clear_error():
  q, k, v, _ = _inputs(0, 1, 8, 2, 2, 16)
  with pytest.raises(ValueError, match=f"implementation='cudnn' needs a GPU backend; got "
                                       f"{jax.default_backend()}"):
    attention.dot_product_attention(q, k, v, causal=True, implementation="cudnn")
  with pytest.raises(ValueError, match="needs a GPU backend"):  # also under jit, when traced
    jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="cudnn"))(q, k, v)


def test_cudnn_rejects_soft_cap_on_any_backend():
  q, k, v, _ = _inputs(1, 1, 8, 2, 2, 16)
  with pytest.raises(ValueError, match="implementation='cudnn' does not take logit_soft_cap"):
    attention.dot_product_attention(q, k, v, logit_soft_cap=5.0, implementation="cudnn")


def _value_and_grads(impl, q, k, v, ct, causal, kv_lengths):
  @jax.jit
  def run(q, k, v, ct, kv_lengths):
    f = lambda q, k, v: attention.dot_product_attention(q, k, v, causal=causal,
                                                        kv_lengths=kv_lengths, implementation=impl)
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)

  return run(q, k, v, ct, kv_lengths)


@needs_cuda
@pytest.mark.parametrize("causal,with_lengths", [(True, False), (False, True), (True, True)])
def test_cudnn_matches_xla_value_and_gradient_bf16(causal, with_lengths):
  """bf16 cuDNN against the bf16 "xla" reference, and both against float32 "xla" on the same
  (bf16-rounded) inputs; bound 3e-2 absolute + relative (bf16 keeps 8 mantissa bits)."""
  b, t, n, kh, h = 2, 128, 4, 4, 64
  q, k, v, ct = _inputs(2, b, t, n, kh, h)
  lengths = jnp.array([77, 128], jnp.int32) if with_lengths else None
  out, grads = _value_and_grads("cudnn", q, k, v, ct, causal, lengths)
  ref, ref_grads = _value_and_grads("xla", q, k, v, ct, causal, lengths)
  f32 = lambda x: np.asarray(x.astype(jnp.float32))
  ref32, ref32_grads = _value_and_grads("xla", *(x.astype(jnp.float32) for x in (q, k, v, ct)),
                                        causal, lengths)
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape
  for name, a, r, r32 in zip(("out", "dq", "dk", "dv"), (out,) + tuple(grads),
                             (ref,) + tuple(ref_grads), (ref32,) + tuple(ref32_grads)):
    assert a.dtype == jnp.bfloat16, name
    np.testing.assert_allclose(f32(a), f32(r), atol=3e-2, rtol=3e-2, err_msg=name)
    np.testing.assert_allclose(f32(a), f32(r32), atol=3e-2, rtol=3e-2, err_msg=name)
  if with_lengths:  # keys past the length get no gradient
    np.testing.assert_array_equal(f32(grads[1])[0, 77:], 0.0)
    np.testing.assert_array_equal(f32(grads[2])[0, 77:], 0.0)
  # The comparison can fail: dropping the mask changes the result well beyond the bound.
  other, _ = _value_and_grads("xla", q, k, v, ct, not causal, None)
  assert np.abs(f32(other) - f32(out)).max() > 0.1


@needs_cuda
@pytest.mark.parametrize("kwargs,match", [
    (dict(window=(4, 0)), "causal, kv_lengths and bias masks only"),
    (dict(q_lengths=jnp.array([3], jnp.int32)), "causal, kv_lengths and bias masks only"),
])
def test_cudnn_unsupported_masks_are_rejected(kwargs, match):
  q, k, v, _ = _inputs(3, 1, 16, 2, 2, 64)
  with pytest.raises(ValueError, match=match):
    attention.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)


@needs_cuda
def test_cudnn_rejects_causal_cross_attention():
  q, _, _, _ = _inputs(4, 1, 8, 2, 2, 64)
  _, k, v, _ = _inputs(5, 1, 16, 2, 2, 64)
  with pytest.raises(ValueError, match="Tq == Tk"):
    attention.dot_product_attention(q, k, v, causal=True, implementation="cudnn")
