"""The language-modelling task: corpus, model, loss and batches for the generic trainer."""

from __future__ import annotations

import functools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import optax

from jaxlab.configs import MAX_LAYERS, MAX_SAMPLE, MAX_WIDTH, ConfigError, absolute_data_path
from jaxlab.data import pipeline, text
from jaxlab.models.gpt import GAU_FAMILIES, gpt_from_config
from jaxlab.train import sharding


def next_token_loss(logits_BTV: jax.Array, targets_BT: jax.Array,
                    weights_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy (nats) of targets under logits, and the number of scored tokens."""
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
  if weights_BT is None:
    weights_BT = jnp.ones_like(ce_BT)
  return jnp.sum(ce_BT * weights_BT), jnp.sum(weights_BT)


HEAD_PREFIXES = ("mtp_block_", "ln_mtp_", "medusa_")  # top-level parameter names of the extra heads


def heads_loss(logits_BTJV: jax.Array, targets_BT: jax.Array, decay: float) -> jax.Array:
  """sum_j decay**j * mean_t CE(head j at t, token t + 1 + j) over the extra heads j = 1..J-1
  (Gloeckle et al. 2024 eq. 2 with decay 1; Medusa's lambda_k = 0.8**k, Cai et al. 2024 sec. 2.2.1,
  with decay 0.8).
  targets_BT[:, t] is token t + 1, so head j at t is scored against targets_BT[:, t + j]."""
  t = targets_BT.shape[1]
  loss = jnp.zeros((), jnp.float32)
  for j in range(1, logits_BTJV.shape[2]):
    total, count = next_token_loss(logits_BTJV[:, :t - j, j], targets_BT[:, j:])
    loss = loss + decay ** j * total / count
  return loss


CHOICES = {
    "data.name": ("python_stdlib", "text_files", "tiny_shakespeare"),
    "data.vocab": ("char", "byte"),
    "model.position": ("learned", "sinusoidal", "rope", "xpos", "alibi", "t5", "none"),
    "model.rope_scaling": ("none", "linear", "ntk", "dynamic_ntk", "yarn"),
    "model.attention": ("softmax", "local", "linear", "performer", "block_sparse", "gau",
                        "flash"),
    "model.sparse_layout": ("window", "strided", "bigbird"),
    "model.gau_kind": ("relu2", "softmax"),
    "model.feature_map": ("elu+1", "relu", "exp"),
    "model.attention_impl": ("auto", "xla", "blockwise", "pallas", "cudnn"),
    "model.activation": ("gelu", "gelu_tanh", "relu", "silu"),
    "model.dtype": ("float32", "bfloat16", "float16"),
}
# xPos's key factor zeta_0^(-(n - c)/512) (zeta_0 = 2/7; the GPT centres c = max_len // 2) reaches
# float16's maximum 65504 at |n - c| ~ 4.5k; keys with entries of a few units overflow sooner, so
# float16 runs keep well inside that.
XPOS_FLOAT16_MAX_LEN = 2048
XPOS_MAX_LEN = 65536  # float32 / bfloat16: |n - max_len // 2| <= 32k (overflow at ~36k)
# The block-sparse options that one layout alone reads (see attention.local.causal_block_layout).
SPARSE_LAYOUT_OPTIONS = {"strided": ("sparse_stride",),
                         "bigbird": ("sparse_num_global", "sparse_num_random", "sparse_seed")}
MAX_FEATURES = 65536  # Performer's random features: the paper uses a few hundred
POSITIVE_INTS = ("data.seq_len", "model.num_layers", "model.width", "model.num_heads",
                 "model.num_features", "model.gau_qk_dim", "model.flash_chunk",
                 "model.sparse_block_size", "model.sparse_local_blocks", "model.sparse_stride")


def validate(config, require) -> None:
  """The LM's config checks (see jaxlab/train/tasks.py)."""
  from jaxlab.configs.validate import require_choice, require_defaults, require_positive_ints
  for key, choices in CHOICES.items():
    require_choice(config, key, choices)
  require_positive_ints(config, POSITIVE_INTS)
  m, d = config.model, config.data
  require(m.num_layers <= MAX_LAYERS, f"config.model.num_layers={m.num_layers} must be <= "
                                      f"{MAX_LAYERS} (tracing 100,000 blocks hung before any check)")
  require(m.width <= MAX_WIDTH, f"config.model.width={m.width} must be <= {MAX_WIDTH:,}")
  require(m.width % m.num_heads == 0,
          f"config.model.num_heads={m.num_heads} does not divide config.model.width={m.width}")
  kv = m.num_kv_heads or m.num_heads
  require(m.num_kv_heads >= 0, f"config.model.num_kv_heads={m.num_kv_heads} must be >= 0")
  require(m.num_heads % kv == 0, f"config.model.num_kv_heads={kv} must divide "
                                 f"config.model.num_heads={m.num_heads}")
  head_dim = m.width // m.num_heads
  if m.position in ("rope", "xpos"):
    require(head_dim % 2 == 0, f"config.model.position={m.position!r} needs an even head_dim; "
                               f"width/num_heads = {head_dim}")
  xpos_length = m.max_len or d.seq_len  # the positions xPos scales run to about this
  if m.position == "xpos" and m.dtype == "float16":
    require(xpos_length <= XPOS_FLOAT16_MAX_LEN,
            f"config.model.position='xpos' with config.model.dtype='float16' scales keys at position "
            f"n by zeta^(-n/512), which leaves float16's range past ~4k positions; positions up to "
            f"{xpos_length} need config.model.dtype='bfloat16' or 'float32' (float16 keeps "
            f"config.model.max_len or data.seq_len <= {XPOS_FLOAT16_MAX_LEN})")
  elif m.position == "xpos":
    require(xpos_length <= XPOS_MAX_LEN,
            f"config.model.position='xpos' scales keys at position n by zeta^(-(n - c)/512) with "
            f"c = max_len // 2, which leaves {m.dtype}'s range past |n - c| ~ 36k; config.model."
            f"max_len or data.seq_len = {xpos_length} must be <= {XPOS_MAX_LEN}")
  if m.rope_scaling != "none":
    require(m.position == "rope", f"config.model.rope_scaling={m.rope_scaling!r} needs "
                                  f"config.model.position='rope', not {m.position!r}")
    require(m.rope_scaling_factor >= 1.0, f"config.model.rope_scaling_factor="
                                          f"{m.rope_scaling_factor} must be >= 1")
  if m.attention in GAU_FAMILIES:
    require(m.position in ("rope", "learned", "sinusoidal", "none"),
            f"config.model.position={m.position!r} is not available with config.model.attention="
            f"{m.attention!r} (rope, learned, sinusoidal or none)")
    require(m.rope_scaling == "none" and not m.qk_norm and m.rotary_fraction == 1.0,
            f"config.model.attention={m.attention!r} takes no rope_scaling, qk_norm or "
            "rotary_fraction < 1")
    require(not m.logn_scaling or (m.attention, m.gau_kind) == ("gau", "softmax"),
            f"config.model.logn_scaling applies to config.model.attention='gau' with "
            f"gau_kind='softmax', not attention={m.attention!r}, gau_kind={m.gau_kind!r} ("
            + ("relu^2 weights do not normalise" if m.gau_kind == "relu2" else
               "FLASH's linear part has no per-query normaliser to scale") + ")")
  if m.attention != "softmax":
    require(m.position not in ("alibi", "t5"),
            f"config.model.position={m.position!r} adds a logit bias, which "
            f"config.model.attention={m.attention!r} does not take")
  require(m.logit_soft_cap >= 0, f"config.model.logit_soft_cap={m.logit_soft_cap} must be >= 0")
  if m.logit_soft_cap:
    require(m.attention == "softmax", f"config.model.logit_soft_cap needs config.model.attention="
                                      f"'softmax', not {m.attention!r}")
  if m.attention_impl == "pallas":
    require(m.position not in ("alibi", "t5"),
            f"config.model.attention_impl='pallas' takes no logit bias (position={m.position!r}); "
            "use 'auto', which falls back")
  if m.attention_impl == "cudnn":  # cuDNN takes causal, length and bias masks only
    require(not m.logit_soft_cap and m.attention in ("softmax", "linear", "performer", "gau",
                                                     "flash"),
            f"config.model.attention_impl='cudnn' takes no logit_soft_cap ({m.logit_soft_cap}) and "
            f"not config.model.attention={m.attention!r} (its cached decoding masks the cache by "
            "segments); use 'auto'")
  require(m.attention != "performer" or m.num_features <= MAX_FEATURES,
          f"config.model.num_features={m.num_features} must be <= {MAX_FEATURES} (Performer's "
          "random features; Choromanski et al. 2021 use a few hundred)")
  context = max(m.max_len, d.seq_len)
  require(m.attention != "block_sparse" or m.sparse_block_size <= context,
          f"config.model.sparse_block_size={m.sparse_block_size} must be <= the context "
          f"(config.model.max_len or data.seq_len = {context}): one larger block is dense attention")
  if m.attention == "local":
    require(m.attention_window >= 1,
            f"config.model.attention_window={m.attention_window} must be >= 1")
  for key in ("sparse_num_global", "sparse_num_random", "sparse_seed"):
    value = m[key]
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            f"config.model.{key}={value!r} must be an int >= 0")
  require(m.rerope_window >= 0, f"config.model.rerope_window={m.rerope_window} must be >= 0")
  if m.rerope_window:
    require(m.position == "rope" and m.rope_scaling == "none" and m.attention == "softmax"
            and not m.logit_soft_cap and m.rotary_fraction == 1.0,
            f"config.model.rerope_window={m.rerope_window} needs config.model.position='rope' with "
            "rope_scaling='none', rotary_fraction=1, attention='softmax' and no logit_soft_cap")
  require(m.rerope_leaky_k == 0 or m.rerope_leaky_k > 1,
          f"config.model.rerope_leaky_k={m.rerope_leaky_k} must be 0 (ReRoPE) or > 1 (leaky)")
  require(m.rerope_leaky_k == 0 or m.rerope_window > 0,
          f"config.model.rerope_leaky_k={m.rerope_leaky_k} needs config.model.rerope_window > 0")
  require(0.0 < m.rotary_fraction <= 1.0,
          f"config.model.rotary_fraction={m.rotary_fraction} must be in (0, 1]")
  require(m.rotary_fraction == 1.0 or m.position == "rope",
          f"config.model.rotary_fraction={m.rotary_fraction} applies to position='rope', not "
          f"{m.position!r}")
  if m.position == "rope" and m.attention not in GAU_FAMILIES:
    from jaxlab.positions.rope import rotary_dim  # the layer's own count
    try:
      rotary_dim(head_dim, m.rotary_fraction)
    except ValueError as e:
      raise ConfigError(f"config.model.rotary_fraction={m.rotary_fraction}: {e}") from None
  require(m.rope_train_len >= 0, f"config.model.rope_train_len={m.rope_train_len} must be >= 0")
  require(m.max_len == 0 or m.max_len >= d.seq_len,
          f"config.model.max_len={m.max_len} is shorter than config.data.seq_len={d.seq_len}")
  require(m.mlp_ratio > 0, f"config.model.mlp_ratio={m.mlp_ratio} must be > 0")
  if m.attention not in GAU_FAMILIES:  # GAU/FLASH blocks have no MLP (see jaxlab/models/gpt.py)
    hidden = int(m.mlp_ratio * m.width) if math.isfinite(m.mlp_ratio) else 0
    require(hidden >= 1, f"config.model.mlp_ratio={m.mlp_ratio} gives an MLP hidden size of "
                         f"int(mlp_ratio * config.model.width={m.width}) = {hidden}; it must be >= 1")
  require(isinstance(m.rope_theta, (int, float)) and math.isfinite(m.rope_theta)
          and m.rope_theta > 0, f"config.model.rope_theta={m.rope_theta!r} must be a finite "
                                "number > 0")
  if m.attention in GAU_FAMILIES and m.position == "rope":
    require(m.gau_qk_dim >= 2 and m.gau_qk_dim % 2 == 0,
            f"config.model.gau_qk_dim={m.gau_qk_dim} must be even (and >= 2) for "
            f"config.model.position='rope': {m.attention!r} rotates its shared Z in pairs")
  require(0.0 <= m.dropout < 1.0, f"config.model.dropout={m.dropout} must be in [0, 1)")
  for key in ("mtp_heads", "medusa_heads"):
    value = m[key]
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            f"config.model.{key}={value!r} must be an int >= 0")
  require(not (m.mtp_heads and m.medusa_heads),
          f"config.model.mtp_heads={m.mtp_heads} and config.model.medusa_heads={m.medusa_heads}: "
          "use one kind of extra head (set the other to 0)")
  extra = m.mtp_heads + m.medusa_heads
  require(extra < d.seq_len, f"config.model.{'mtp' if m.mtp_heads else 'medusa'}_heads={extra} "
                             f"leaves no target in a window of config.data.seq_len={d.seq_len}")
  require(isinstance(m.heads_loss_decay, (int, float)) and not isinstance(m.heads_loss_decay, bool)
          and math.isfinite(m.heads_loss_decay) and m.heads_loss_decay > 0,
          f"config.model.heads_loss_decay={m.heads_loss_decay!r} must be a finite number > 0")
  if not extra:
    require_defaults(config, {"model.heads_loss_decay": 1.0, "model.heads_stop_gradient": False},
                     "has no effect without extra heads (config.model.mtp_heads or medusa_heads "
                     "> 0)")
  require(0.0 < d.train_fraction < 1.0,
          f"config.data.train_fraction={d.train_fraction} must be in (0, 1)")
  if d.name == "python_stdlib":
    require(d.train_fraction == 0.9, f"config.data.train_fraction={d.train_fraction} has no effect "
                                     "on config.data.name='python_stdlib', which splits by file "
                                     "(crc32 of the path % 10 == 0: validation); keep 0.9")
  if d.name == "text_files":
    require(bool(d.path), "config.data.path must name the text file(s) for config.data.name="
                          "'text_files'")
  s = config.sample
  require(math.isfinite(s.temperature) and s.temperature >= 0,
          f"config.sample.temperature={s.temperature} must be a finite number >= 0 (0 = greedy)")
  require(s.top_k >= 0, f"config.sample.top_k={s.top_k} must be >= 0 (0 = off)")
  require(0 < s.top_p <= 1, f"config.sample.top_p={s.top_p} must be in (0, 1]")
  require(0 <= s.num_tokens <= MAX_SAMPLE, f"config.sample.num_tokens={s.num_tokens} must be in "
                                           f"[0, {MAX_SAMPLE}]")
  if s.speculative:
    from jaxlab.decoding.speculative import SPECULATIVE_FAMILIES
    require(extra > 0, "config.sample.speculative needs extra heads to draft with: set "
                       "config.model.mtp_heads or config.model.medusa_heads > 0")
    require(m.attention in SPECULATIVE_FAMILIES,
            f"config.sample.speculative needs an attention family whose decoding state can be "
            f"rewound {SPECULATIVE_FAMILIES}, not config.model.attention={m.attention!r}")
    from jaxlab.layers.attention import APPEND_LIMIT, BOUNDED_STATE_FAMILIES
    require(m.attention not in BOUNDED_STATE_FAMILIES or extra + 1 <= APPEND_LIMIT,
            f"config.sample.speculative with config.model.attention={m.attention!r}: a pass of "
            f"{extra} drafts + 1 token is more than its bounded decoding state takes per call "
            f"({APPEND_LIMIT} tokens)")
  if s.draft_tree:
    require(s.speculative, f"config.sample.draft_tree={s.draft_tree!r} needs "
                           "config.sample.speculative=True (it is the speculative drafts' tree)")
    from jaxlab.decoding.draft_tree import DraftTree
    try:
      tree = DraftTree.parse(s.draft_tree)
    except ValueError as e:
      require(False, f"config.sample.draft_tree: {e}")
    require(tree.depth <= extra,
            f"config.sample.draft_tree={s.draft_tree!r} is {tree.depth} deep, more than the "
            f"{extra} extra heads (config.model.mtp_heads / medusa_heads) that draft its depths")
    from jaxlab.decoding.speculative import tree_attention_supported
    require(tree.is_chain or tree_attention_supported(m.attention, m.rerope_window,
                                                      m.attention_impl),
            f"config.sample.draft_tree={s.draft_tree!r} branches, which needs tree attention: "
            "config.model.attention='softmax' without rerope_window, and an attention_impl that "
            "takes segment masks (not 'cudnn')")
  from jaxlab.decoding.speculative import ACCEPTANCE
  require(s.acceptance in ACCEPTANCE,
          f"config.sample.acceptance={s.acceptance!r} must be one of {ACCEPTANCE}")
  if s.acceptance == "typical":
    require(s.speculative, "config.sample.acceptance='typical' needs config.sample.speculative=True")
    require(s.temperature > 0, "config.sample.acceptance='typical' needs config.sample.temperature "
                               "> 0 (at 0 speculative decoding is greedy decoding, exactly)")
    for key in ("typical_epsilon", "typical_delta"):
      require(math.isfinite(s[key]) and s[key] >= 0,
              f"config.sample.{key}={s[key]!r} must be a finite number >= 0")


# Options that only some attention families read (config.model's names), and what reads rope_theta.
GAU_OPTIONS = {"gau_qk_dim": GAU_FAMILIES, "gau_kind": GAU_FAMILIES,
               "gau_offset_init": GAU_FAMILIES, "flash_chunk": ("flash",)}
ROPE_THETA_POSITIONS = ("rope", "xpos")


def validate_new_run(config, require) -> None:
  """Checks for a config about to start a run, not for a saved workdir's (see configs.validate):
  an option of another attention family than config.model.attention, or rope_theta without a
  position that rotates, set away from its default would be dropped (gpt_from_config passes the
  chosen family's options only), so config.model.attention_window=2 with softmax trained full
  attention without a word. A workdir saved that way by an older jaxlab still evaluates, samples and
  resumes (its model is the one it trained)."""
  from jaxlab.configs.lm_char import get_config as lm_defaults
  from jaxlab.configs.validate import require_unread_at_default
  from jaxlab.layers.attention import FAMILY_OPTIONS
  from jaxlab.models.gpt import _gpt_option
  m, defaults = config.model, lm_defaults().model
  owners = {name: list(families) for name, families in GAU_OPTIONS.items()}  # key -> readers
  for family, names in FAMILY_OPTIONS.items():
    for name in names:
      owners.setdefault(_gpt_option(name), []).append(family)
  for key, families in owners.items():
    which = repr(families[0]) if len(families) == 1 else f"one of {tuple(families)}"
    if m.attention not in families:
      require_unread_at_default(config, f"model.{key}", defaults[key],
                                f"config.model.attention={which}", m.attention,
                                f" (or choose config.model.attention={families[0]!r})")
  if m.position not in ROPE_THETA_POSITIONS:
    require_unread_at_default(config, "model.rope_theta", defaults.rope_theta,
                              f"config.model.position in {ROPE_THETA_POSITIONS}", m.position)
  require(m.rope_scaling != "none" or m.rope_scaling_factor == defaults.rope_scaling_factor,
          f"config.model.rope_scaling_factor={m.rope_scaling_factor!r} applies to a "
          "config.model.rope_scaling other than 'none' (it would be ignored)")
  require(m.rope_scaling != "none" or m.logn_scaling
          or m.rope_train_len == defaults.rope_train_len,
          f"config.model.rope_train_len={m.rope_train_len!r} applies to config.model.rope_scaling "
          "or config.model.logn_scaling, and neither is set (it would be ignored)")
  if m.attention == "block_sparse":
    for layout, keys in SPARSE_LAYOUT_OPTIONS.items():
      for key in keys:
        if m.sparse_layout != layout:
          require_unread_at_default(config, f"model.{key}", defaults[key],
                                    f"config.model.sparse_layout={layout!r}", m.sparse_layout)
  s, sample_defaults = config.sample, lm_defaults().sample
  for key in ("typical_epsilon", "typical_delta"):
    if s.acceptance != "typical":
      require_unread_at_default(config, f"sample.{key}", sample_defaults[key],
                                "config.sample.acceptance='typical'", s.acceptance)
  for path in (absolute_data_path(config.data.path, "lm") or "").split(","):
    require(not path or "://" in path or os.path.exists(path),
            f"config.data.path={config.data.path!r}: {path} does not exist")


def validate_devices(config, require) -> None:
  """The LM's checks that need the backend (called by jaxlab.configs.validate.validate_mesh)."""
  impl = config.model.attention_impl
  # 'pallas' runs anywhere (Pallas interpret mode off the GPU); cuDNN exists only on a GPU.
  if impl == "cudnn":
    require(jax.default_backend() == "gpu",
            f"config.model.attention_impl='cudnn' needs a GPU backend, not "
            f"{jax.default_backend()!r}; use 'auto', 'xla' or 'blockwise'")


def tensor_units(config) -> int:
  """Tensor parallelism shards whole kv-head groups."""
  return config.model.num_kv_heads or config.model.num_heads


def build(config) -> "LMTask":
  return LMTask(config)


def build_for_sampling(config, workdir) -> "LMTask | None":
  """The task as `jaxlab sample` needs it: from WORKDIR/vocab.json when the run saved one, so that
  sampling needs neither the training text (moved, or on another machine) nor the time to read it;
  None (build it from the data) otherwise."""
  import pathlib
  from jaxlab.data.vocab import read_vocab_file
  saved = pathlib.Path(workdir) / "vocab.json"
  if not saved.is_file():
    return None
  return LMTask(config, vocab=read_vocab_file(
      saved, "delete it: `jaxlab sample` then reads the training data's vocabulary"))


class LMTask:
  """Next-token prediction on a text corpus with the GPT of `config.model`.

  vocab: given (sampling from a saved run), the corpus is not read; then there are no batches.
  """

  train_stream_version = pipeline.STREAM_VERSION  # saved with the iterator state, checked on resume

  def __init__(self, config, vocab=None):
    self.config = config
    if vocab is None:
      self.corpus = text.load_corpus(config.data)
      self.vocab = self.corpus.vocab
      self._check_splits()
    else:
      self.corpus, self.vocab = None, vocab
    self.model = gpt_from_config(config.model, self.vocab.size,
                                 max_len=config.model.max_len or config.data.seq_len,
                                 train_len=config.data.seq_len)
    self.seq_len = config.data.seq_len
    self.batch_size = config.data.batch_size

  def data_fingerprint(self) -> str | None:
    """A digest of the token streams and vocabulary; None when built for sampling (no corpus)."""
    from jaxlab.train.distributed import fingerprint
    if self.corpus is None:
      return None
    return fingerprint(json.dumps(self.vocab.to_json()), self.corpus.train, self.corpus.validation)

  def _check_splits(self) -> None:
    """Both splits hold a window of config.data.seq_len + 1 tokens (and one start more, see
    pipeline.WindowSource), and the validation split at least one batch of them, or the first
    evaluation (after training) would fail."""
    seq_len, batch = self.config.data.seq_len, self.config.data.batch_size
    where = f"config.data.name={self.config.data.name!r}"
    if self.config.data.path:
      where += f", config.data.path={self.config.data.path!r}"
    for split, tokens in (("train", self.corpus.train), ("validation", self.corpus.validation)):
      if len(tokens) < seq_len + 2:
        raise ConfigError(
            f"config.data.seq_len={seq_len} needs splits of at least {seq_len + 2} tokens, but the "
            f"{split} split has {len(tokens)} ({where}); use a shorter seq_len or more text")
    windows = len(self.corpus.validation) - seq_len
    if windows < batch:
      raise ConfigError(
          f"config.data.batch_size={batch} is more than the {windows} windows of config.data.seq_len="
          f"{seq_len} in the validation split ({len(self.corpus.validation)} tokens, {where}), so "
          "evaluation would give no batches; use a smaller batch_size or seq_len, or more text")

  def check_before_training(self) -> None:
    """The sample that `jaxlab train` prints at the end must be possible (checked before training,
    not found out after it): config.sample.prompt in the vocabulary, and with config.sample.speculative
    a length the model can decode, when there is a sample."""
    s = self.config.sample
    if s.num_tokens:
      try:
        self.check_prompt(s.prompt, "config.sample.prompt")
        self.check_sample_length(s.prompt, s.num_tokens, "config.sample.num_tokens",
                                 speculative=s.speculative)
      except ValueError as e:
        raise ConfigError(str(e)) from None

  def draft_tree(self):
    """config.sample.draft_tree as a DraftTree, or None (a chain)."""
    from jaxlab.decoding.draft_tree import DraftTree
    spec = self.config.sample.draft_tree
    return DraftTree.parse(spec) if spec else None

  def check_sample_length(self, prompt: str, num_tokens: int, what: str, *,
                          speculative: bool) -> None:
    """ValueError naming `what` when the sampler cannot produce prompt + num_tokens tokens: past
    xPos's numeric range (sampling.check_decoding_length), and for speculative decoding as
    `check_speculative` says."""
    c = self.model.config
    if speculative:
      self.check_speculative(prompt, num_tokens, what)
    if c.position == "xpos":
      from jaxlab.decoding.sampling import check_decoding_length
      tree = self.draft_tree() if speculative else None
      drafts = (tree.depth if tree else c.extra_heads) if speculative else 0  # positions past the end
      try:
        check_decoding_length(c, len(self.vocab.encode(prompt or "\n")) + num_tokens,
                              drafts=drafts)
      except ValueError as e:
        raise ValueError(f"{what}={num_tokens}: {e}") from None

  def check_speculative(self, prompt: str, num_tokens: int, what: str) -> None:
    """Speculative decoding keeps every token in the KV cache (no cropping as `generate_long` does),
    so with learned positions prompt + num_tokens must fit the position table; a draft tree's widths
    must fit the vocabulary (greedy drafts the heads' top-ranked distinct tokens)."""
    c = self.model.config
    tree = self.draft_tree()
    if tree is not None and tree.max_rank >= c.vocab_size:
      raise ValueError(f"config.sample.draft_tree={self.config.sample.draft_tree!r}: a width of "
                       f"{tree.max_rank + 1} is more than the vocabulary ({c.vocab_size} tokens)")
    if c.position != "learned":
      return
    prompt_len = len(self.vocab.encode(prompt or "\n"))
    if prompt_len + num_tokens > c.max_len:
      raise ValueError(f"{what}={num_tokens}: speculative decoding with learned positions needs "
                       f"prompt ({prompt_len} tokens) + num_tokens <= config.model.max_len="
                       f"{c.max_len}; sample fewer tokens, or without speculative decoding (which "
                       "crops the context)")

  def check_prompt(self, prompt: str, what: str) -> None:
    """Raises ValueError("{what}: ...") naming the first character of `prompt` that this task's
    vocabulary cannot encode (an empty prompt is sampled from a newline, so that is checked then)."""
    chars = prompt or "\n"
    try:
      self.vocab.encode(chars)
    except UnicodeEncodeError as e:  # bytes: a str that UTF-8 cannot encode
      raise ValueError(f"{what}: character {chars[e.start]!r} is not in the vocabulary "
                       "(it has no UTF-8 encoding)") from None
    except ValueError as e:  # "character 'x' is not in the vocabulary"
      empty = " (an empty prompt starts from '\\n')" if not prompt else ""
      raise ValueError(f"{what}: {e}{empty} (the {self.vocab.size} characters of this char-level "
                       "corpus; use config.data.vocab='byte' for any text)") from None

  def clip_groups(self) -> tuple:
    """Heads on a detached trunk (model.heads_stop_gradient) learn from their own loss alone, so
    their gradients are clipped apart from the rest: then the next-token model trains exactly as it
    would without them (one global norm over both would couple the two through the clip factor)."""
    if not (self.model.config.extra_heads and self.model.config.heads_stop_gradient):
      return ()
    def is_head(params):
      return {name: jax.tree.map(lambda _: name.startswith(HEAD_PREFIXES), tree)
              for name, tree in params.items()}
    return (is_head, lambda params: jax.tree.map(lambda h: not h, is_head(params)))

  @property
  def tokens_per_batch(self) -> int:
    return self.seq_len * self.batch_size

  def train_iterator(self):
    return pipeline.train_batches(self.corpus.train, seq_len=self.seq_len,
                                  batch_size=self.batch_size, seed=self.config.seed,
                                  rows=sharding.config_process_rows(self.config.mesh,
                                                                    self.batch_size))

  def eval_iterator(self):
    return pipeline.eval_batches(self.corpus.validation, seq_len=self.seq_len,
                                 batch_size=self.batch_size,
                                 num_batches=self.config.train.eval_batches,
                                 seed=self.config.train.eval_seed,
                                 rows=sharding.config_process_rows(self.config.mesh,
                                                                   self.batch_size))

  def init_params(self, rng: jax.Array):
    """Boxed (logically partitioned) parameters."""
    tokens = jnp.zeros((1, self.seq_len), jnp.int32)
    return self.model.init({"params": rng}, tokens)["params"]

  def loss(self, params, batch: dict, rng: jax.Array, *, train: bool):
    """Mean next-token cross-entropy over the batch; (loss, (sum, count)).

    With extra heads (config.model.mtp_heads / medusa_heads) the training loss adds, for each head j,
    heads_loss_decay**j times its mean cross-entropy on the token j + 1 ahead (the last j positions of
    a window have no such target); evaluation (train=False) scores the next-token head alone.
    """
    if not (train and self.model.config.extra_heads):
      logits_BTV = self.model.apply({"params": params}, batch["inputs"], train=train,
                                    rngs={"dropout": rng})
      total, count = next_token_loss(logits_BTV, batch["targets"])
      return total / count, (total, count)
    logits_BTJV = self.model.apply({"params": params}, batch["inputs"], train=train,
                                   rngs={"dropout": rng}, all_heads=True)
    total, count = next_token_loss(logits_BTJV[:, :, 0], batch["targets"])
    objective = total / count + heads_loss(logits_BTJV, batch["targets"],
                                           self.config.model.heads_loss_decay)
    # (objective * count, count): gradient accumulation sums the first over microbatches and divides
    # by the summed counts, which is the objective because every LM microbatch has the same count.
    return objective, (objective * count, count)

  def finish(self, params) -> str | None:
    """The sample that `jaxlab train` prints at the end (config.sample), or None."""
    s = self.config.sample
    if not s.num_tokens:
      return None
    text = sample_text(self, params, prompt=s.prompt, num_tokens=s.num_tokens,
                       temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                       speculative=s.speculative)
    return "jaxlab: sample\n" + "-" * 60 + "\n" + text + "\n" + "-" * 60

  def sample_command(self, params, args) -> str:
    """`jaxlab sample WORKDIR [--prompt ...]`: command-line options override config.sample."""
    s = self.config.sample
    pick = lambda arg, default: default if arg is None else arg
    return sample_text(self, params, prompt=pick(args.prompt, s.prompt),
                       num_tokens=pick(args.num_tokens, s.num_tokens),
                       temperature=pick(args.temperature, s.temperature),
                       top_k=pick(args.top_k, s.top_k), top_p=pick(args.top_p, s.top_p),
                       seed=pick(args.seed, s.seed), speculative=s.speculative,
                       stop=getattr(args, "stop", None) or "")


def sample_text(task: LMTask, params, *, prompt: str, num_tokens: int, temperature: float,
                top_k: int, top_p: float, seed: int, speculative: bool = False,
                stop: str = "") -> str:
  """Continues `prompt` by `num_tokens` tokens with the KV-cached sampler; returns prompt + continuation.

  stop: if given, the continuation ends just before its first occurrence of `stop` (occurrences in
  the prompt do not count); decoding ends there (`generate`'s stop_ids), with the text it would have
  had without `stop` up to that point. Speculative decoding samples all num_tokens, then cuts.

  speculative: drafts with the model's extra heads (`jaxlab.decoding.speculative`; with
  config.sample.acceptance='exact' the same distribution, and greedy gives greedy decoding's text
  up to near-ties; 'typical' is not exact) and says on stderr how many tokens each pass yielded.
  """
  task.check_sample_length(prompt, num_tokens, "num_tokens", speculative=speculative)
  ids = jnp.asarray(task.vocab.encode(prompt or "\n"))[None]
  key = jax.random.PRNGKey(seed)
  params = _on_one_device_if_replicated(params)
  # A checkpoint saved between a blown-up update and the evaluation that would have shown it.
  if not bool(_logits_finite(task.model, params, ids[:, -task.model.config.max_len:])):
    raise FloatingPointError("the parameters give non-finite logits for the prompt: they are "
                             "unusable (a blown-up run's checkpoint?)")
  if speculative:
    from jaxlab.decoding.speculative import speculative_generate
    tree, s = task.draft_tree(), task.config.sample
    acceptance = s.acceptance if temperature > 0 else "exact"
    tokens, steps = speculative_generate(task.model, params, ids, key, num_tokens=num_tokens,
                                         temperature=temperature, top_k=top_k, top_p=top_p,
                                         tree=tree, acceptance=acceptance,
                                         typical_epsilon=s.typical_epsilon,
                                         typical_delta=s.typical_delta)
    if num_tokens > 1:
      drafts = (f"a tree of {tree.size} candidates" if tree and tree.size > tree.depth else
                f"a chain of {tree.size} candidate{'s' if tree.size > 1 else ''}" if tree else
                "one candidate per head")
      drafts += ", typical acceptance" if acceptance == "typical" else ""
      print(f"jaxlab: speculative decoding ({drafts}): {num_tokens} tokens in 1 + {int(steps)} "
            f"passes ({(num_tokens - 1) / max(int(steps), 1):.2f} tokens per pass after the first)",
            file=sys.stderr, flush=True)
  else:
    from jaxlab.decoding.sampling import generate_long
    tokens = generate_long(task.model, params, ids, key, num_tokens=num_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           stop_ids=_stop_ids(task, stop))
  text = task.vocab.decode(tokens[0])
  cut = text.find(stop, len(task.vocab.decode(ids[0]))) if stop else -1
  return text if cut < 0 else text[:cut]


def _stop_ids(task: LMTask, stop: str) -> tuple:
  """The token ids of `stop` for decoding to end on (char or byte vocabulary: one id per character or
  byte, so the ids occur exactly where the text does); () when there is no stop, when it holds a
  character outside the vocabulary (it can never be sampled) or, for a learned position table, is
  longer than the context that decoding past the table keeps."""
  if not stop:
    return ()
  try:
    ids = tuple(int(i) for i in task.vocab.encode(stop))
  except ValueError:
    return ()
  config = task.model.config
  return ids if config.position != "learned" or len(ids) <= config.max_len else ()


@functools.partial(jax.jit, static_argnames="model")
def _logits_finite(model, params, ids_BT) -> jax.Array:
  """Whether every logit of one forward pass is finite (compiled: the eager pass took 2 s on CPU)."""
  return jnp.isfinite(model.apply({"params": params}, ids_BT)).all()


def _on_one_device_if_replicated(params):
  """params on one local device when every array is a full copy on each of several devices of this
  process (a data-parallel run): one sample row replicated over them computes the same tokens on
  every device, no faster, and XLA:CPU's decoding loop then grew by ~20 KB per token (1.1 GB for
  32k tokens; one device: constant, and 20% faster). Sharded parameters (fsdp, tensor) stay put."""
  leaves = jax.tree.leaves(params)
  if not all(isinstance(x, jax.Array) and x.is_fully_addressable and x.sharding.is_fully_replicated
             for x in leaves) or all(len(x.sharding.device_set) == 1 for x in leaves):
    return params
  return jax.device_put(params, jax.local_devices()[0])
