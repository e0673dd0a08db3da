"""Checks a config before anything is built or compiled; every failure is one line naming the key."""

from __future__ import annotations

import jax

from jaxlab.configs import ConfigError

CHOICES = {
    "task": ("lm",),
    "data.name": ("python_stdlib", "text_files", "tiny_shakespeare"),
    "data.vocab": ("char", "byte"),
    "model.position": ("learned", "sinusoidal", "rope", "xpos", "alibi", "t5", "none"),
    "model.rope_scaling": ("none", "linear", "ntk", "dynamic_ntk", "yarn"),
    "model.attention": ("softmax", "local", "linear"),
    "model.feature_map": ("elu+1", "relu", "exp"),
    "model.attention_impl": ("auto", "xla", "blockwise", "cudnn"),
    "model.activation": ("gelu", "gelu_tanh", "relu", "silu"),
    "model.dtype": ("float32", "bfloat16", "float16"),
}
POSITIVE_INTS = ("data.seq_len", "data.batch_size", "model.num_layers", "model.width",
                 "model.num_heads", "train.steps", "train.log_every", "train.eval_every",
                 "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints")


def _get(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _require(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


def validate(config, *, check_devices: bool = True) -> None:
  for key, choices in CHOICES.items():
    value = _get(config, key)
    _require(value in choices, f"config.{key}={value!r} must be one of {', '.join(choices)}")
  for key in POSITIVE_INTS:
    value = _get(config, key)
    _require(isinstance(value, int) and value > 0, f"config.{key}={value!r} must be a positive int")

  m, d, o = config.model, config.data, config.optim
  _require(m.width % m.num_heads == 0,
           f"config.model.num_heads={m.num_heads} does not divide config.model.width={m.width}")
  kv = m.num_kv_heads or m.num_heads
  _require(m.num_kv_heads >= 0, f"config.model.num_kv_heads={m.num_kv_heads} must be >= 0")
  _require(m.num_heads % kv == 0, f"config.model.num_kv_heads={kv} must divide "
                                  f"config.model.num_heads={m.num_heads}")
  head_dim = m.width // m.num_heads
  if m.position in ("rope", "xpos"):
    _require(head_dim % 2 == 0, f"config.model.position={m.position!r} needs an even head_dim; "
                                f"width/num_heads = {head_dim}")
  if m.rope_scaling != "none":
    _require(m.position == "rope", f"config.model.rope_scaling={m.rope_scaling!r} needs "
                                   f"config.model.position='rope', not {m.position!r}")
    _require(m.rope_scaling_factor >= 1.0, f"config.model.rope_scaling_factor="
                                           f"{m.rope_scaling_factor} must be >= 1")
  if m.attention != "softmax":
    _require(m.position not in ("alibi", "t5"),
             f"config.model.position={m.position!r} adds a logit bias, which "
             f"config.model.attention={m.attention!r} does not take")
  _require(m.logit_soft_cap >= 0, f"config.model.logit_soft_cap={m.logit_soft_cap} must be >= 0")
  if m.logit_soft_cap:
    _require(m.attention == "softmax", f"config.model.logit_soft_cap needs config.model.attention="
                                       f"'softmax', not {m.attention!r}")
  if m.attention == "local":
    _require(m.attention_window >= 1,
             f"config.model.attention_window={m.attention_window} must be >= 1")
  _require(0.0 < m.rotary_fraction <= 1.0,
           f"config.model.rotary_fraction={m.rotary_fraction} must be in (0, 1]")
  _require(m.rope_train_len >= 0, f"config.model.rope_train_len={m.rope_train_len} must be >= 0")
  _require(m.max_len == 0 or m.max_len >= d.seq_len,
           f"config.model.max_len={m.max_len} is shorter than config.data.seq_len={d.seq_len}")
  _require(m.mlp_ratio > 0, f"config.model.mlp_ratio={m.mlp_ratio} must be > 0")
  _require(0.0 <= m.dropout < 1.0, f"config.model.dropout={m.dropout} must be in [0, 1)")
  _require(0.0 < d.train_fraction < 1.0,
           f"config.data.train_fraction={d.train_fraction} must be in (0, 1)")
  if d.name == "text_files":
    _require(bool(d.path), "config.data.path must name the text file(s) for config.data.name="
                           "'text_files'")

  _require(o.lr > 0, f"config.optim.lr={o.lr} must be > 0")
  _require(0 <= o.min_lr <= o.lr, f"config.optim.min_lr={o.min_lr} must be in [0, optim.lr]")
  _require(0 <= o.warmup_steps < config.train.steps,
           f"config.optim.warmup_steps={o.warmup_steps} must be < config.train.steps="
           f"{config.train.steps}")
  _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "config.optim.b1 and config.optim.b2 must be in [0, 1)")
  _require(o.weight_decay >= 0, f"config.optim.weight_decay={o.weight_decay} must be >= 0")
  _require(o.grad_clip >= 0, f"config.optim.grad_clip={o.grad_clip} must be >= 0 (0 = off)")

  s = config.sample
  _require(s.temperature >= 0, f"config.sample.temperature={s.temperature} must be >= 0")
  _require(s.top_k >= 0, f"config.sample.top_k={s.top_k} must be >= 0 (0 = off)")
  _require(0 < s.top_p <= 1, f"config.sample.top_p={s.top_p} must be in (0, 1]")
  _require(s.num_tokens >= 0, f"config.sample.num_tokens={s.num_tokens} must be >= 0")

  _require(config.mesh.cpu_devices >= 0,
           f"config.mesh.cpu_devices={config.mesh.cpu_devices} must be >= 0 (0 = auto)")
  if check_devices:
    validate_mesh(config)


def validate_mesh(config) -> None:
  """The checks that need the device count (this starts JAX's backend)."""
  from jaxlab.train.sharding import mesh_shape
  sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  try:
    data, fsdp, tensor = mesh_shape(sizes, jax.device_count())
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  batch = config.data.batch_size
  _require(batch % (data * fsdp) == 0,
           f"config.data.batch_size={batch} is not divisible by the mesh's data*fsdp = "
           f"{data * fsdp} devices")
  kv_heads = config.model.num_kv_heads or config.model.num_heads
  _require(kv_heads % tensor == 0,
           f"config.model.num_kv_heads={kv_heads} is not divisible by config.mesh.tensor={tensor} "
           "(tensor parallelism shards whole kv-head groups)")
