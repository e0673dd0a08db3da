"""Default job: a small character/byte-level GPT on the Python standard library's own sources.

    jaxlab train                      # = jaxlab train lm_char

Needs no download (the corpus is the running interpreter's stdlib, ~10 MB of .py files). On 2 CPU
cores (one XLA device each) it trains 1000 steps in 2-5 minutes, evaluates, and prints a sample
of Python-looking code. Measured (Python 3.11 stdlib, experiments/results/default_jobs.md): val loss
1.447 nats/byte at step 1000, 2.3 minutes on a quiet VM (2.8 on another).
"""

import ml_collections

from jaxlab.configs import _sections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "lm"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "python_stdlib"  # python_stdlib | text_files | tiny_shakespeare
  c.data.path = ""  # text file(s), comma-separated; for python_stdlib an alternative stdlib root
  c.data.data_dir = ""  # TFDS data_dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.vocab = "byte"  # char | byte
  c.data.train_fraction = 0.9
  c.data.seq_len = 128
  c.data.batch_size = 16  # global batch

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4
  c.model.width = 128
  c.model.num_heads = 4
  c.model.num_kv_heads = 0  # 0 = num_heads (MHA); fewer for GQA/MQA
  c.model.mlp_ratio = 4.0
  c.model.dropout = 0.0
  c.model.position = "rope"  # learned | sinusoidal | rope | xpos | alibi | t5 | none
  c.model.rope_theta = 10000.0
  c.model.rope_scaling = "none"  # none | linear (PI) | ntk | dynamic_ntk | yarn
  c.model.rope_scaling_factor = 1.0
  c.model.rope_train_len = 0  # training context for scaling and log-n; 0 = the model's max_len
  c.model.rotary_fraction = 1.0  # partial rotary: fraction of head_dim rotated
  c.model.rerope_window = 0  # > 0 (position rope): (leaky) ReRoPE with this window, e.g. at eval
  c.model.rerope_leaky_k = 0.0  # leaky ReRoPE's k (> 1); 0 = plain ReRoPE
  c.model.logn_scaling = False  # scale queries by max(1, log n / log rope_train_len)
  c.model.max_len = 0  # 0 = data.seq_len
  c.model.tie_embeddings = True
  c.model.attention = "softmax"  # softmax | local | linear | performer | block_sparse | gau | flash
  c.model.attention_window = 64  # local: tokens before each query that it sees
  c.model.sparse_layout = "window"  # block_sparse (causal): window | strided | bigbird
  c.model.sparse_block_size = 16  # block_sparse: block size (tokens)
  c.model.sparse_local_blocks = 2  # block_sparse: own block + the blocks before it that it sees
  c.model.sparse_stride = 4  # block_sparse strided: every stride-th block is a summary block
  c.model.sparse_num_global = 1  # block_sparse bigbird: leading blocks that every block sees
  c.model.sparse_num_random = 1  # block_sparse bigbird: random earlier blocks per block
  c.model.sparse_seed = 0  # block_sparse bigbird: seed of the random blocks
  c.model.feature_map = "elu+1"  # linear: elu+1 | relu | exp
  c.model.num_features = 64  # performer: random features per layer
  c.model.feature_seed = 0  # performer: seed of the (fixed) features; another seed = a redraw
  # gau / flash: each block = two gated attention units (GAU, or FLASH's), e = 2 * width, no MLP
  c.model.gau_qk_dim = 64  # gau, flash: shared Z dimension s
  c.model.flash_chunk = 64  # flash: chunk size C (quadratic inside, linear across chunks)
  c.model.gau_kind = "relu2"  # gau, flash: relu2 (the paper; gau: x 1/data.seq_len) | softmax
  c.model.gau_offset_init = 0.0  # gau, flash: initial per-dim offsets beta (the paper: 0)
  c.model.qk_norm = False  # RMS-normalise q and k per head
  c.model.logit_soft_cap = 0.0  # softmax: > 0 caps logits as c * tanh(logits / c); 0 = off
  c.model.attention_impl = "auto"  # softmax: auto | xla | blockwise | pallas | cudnn
  c.model.activation = "gelu"
  c.model.use_bias = False
  # Extra heads that predict further ahead (at most one kind), for a multi-token loss and
  # self-speculative decoding (config.sample.speculative); see jaxlab/models/gpt.py.
  c.model.mtp_heads = 0  # multi-token prediction (Gloeckle et al. 2024): extra blocks for t+2, t+3..
  c.model.medusa_heads = 0  # Medusa (Cai et al. 2024): residual heads on the last hidden state
  c.model.heads_loss_decay = 1.0  # head j's loss weight is decay**j (Medusa: 0.8)
  c.model.heads_stop_gradient = False  # heads learn on a detached trunk (Medusa-1)
  c.model.dtype = "float32"  # float32 | bfloat16 | float16 (params stay float32)

  c.optim = _sections.optim(lr=2e-3, min_lr=2e-4, warmup_steps=50, b2=0.99, weight_decay=0.1,
                            grad_clip=1.0)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.eval_batches = 40
  c.train.eval_seed = 1234
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.keep_best = False  # also keep the lowest-val-loss params in WORKDIR/best (model selection)
  # gradient accumulation: each device's rows in this many sequential slices (same maths, less
  # memory; on CPU a smaller working set can also be faster). Randomness (dropout) is drawn per
  # slice, so a stochastic loss's gradient equals the whole batch's in expectation only.
  c.train.microbatches = 1
  c.train.tensorboard = True

  c.mesh = _sections.mesh()

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = "def "
  c.sample.num_tokens = 300
  c.sample.temperature = 0.8
  c.sample.top_k = 0  # 0 = off
  c.sample.top_p = 0.95  # 1.0 = off
  c.sample.seed = 0
  c.sample.speculative = False  # draft with the extra heads, verify in one pass (see decoding/)
  # speculative: "" = one candidate per extra head (a chain); "3,2,1" = a tree: 3 candidates of head 1,
  # under each 2 of head 2, under each 1 of head 3 (greedy and typical acceptance: the heads' top-ranked
  # tokens; exact sampling: independent draws); or nodes as rank paths, "paths: 0 1 0,0" (e.g. a
  # sparse tree from experiments/speculative_decoding.py); tree attention, softmax family, <= 256 nodes
  c.sample.draft_tree = ""
  # speculative: "exact" (greedy decoding / the model's distribution) or "typical" (temperature > 0:
  # Medusa-2's typical acceptance, keeps p(x) > min(epsilon, delta * exp(-entropy)); not exact)
  c.sample.acceptance = "exact"
  c.sample.typical_epsilon = 0.09
  c.sample.typical_delta = 0.3
  return c
