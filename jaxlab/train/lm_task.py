"""The language-modelling task: corpus, model, loss and batches for the generic trainer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxlab.data import pipeline, text
from jaxlab.models.gpt import gpt_from_config


def next_token_loss(logits_BTV: jax.Array, targets_BT: jax.Array,
                    weights_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy (nats) of targets under logits, and the number of scored tokens."""
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
  if weights_BT is None:
    weights_BT = jnp.ones_like(ce_BT)
  return jnp.sum(ce_BT * weights_BT), jnp.sum(weights_BT)


class LMTask:
  """Next-token prediction on a text corpus with the GPT of `config.model`."""

  def __init__(self, config):
    self.config = config
    self.corpus = text.load_corpus(config.data)
    self.vocab = self.corpus.vocab
    self.model = gpt_from_config(config.model, self.vocab.size,
                                 max_len=config.model.max_len or config.data.seq_len)
    self.seq_len = config.data.seq_len
    self.batch_size = config.data.batch_size

  @property
  def tokens_per_batch(self) -> int:
    return self.seq_len * self.batch_size

  def train_iterator(self):
    return pipeline.train_batches(self.corpus.train, seq_len=self.seq_len,
                                  batch_size=self.batch_size, seed=self.config.seed)

  def eval_iterator(self):
    return pipeline.eval_batches(self.corpus.validation, seq_len=self.seq_len,
                                 batch_size=self.batch_size,
                                 num_batches=self.config.train.eval_batches,
                                 seed=self.config.train.eval_seed)

  def init_params(self, rng: jax.Array):
    """Boxed (logically partitioned) parameters."""
    tokens = jnp.zeros((1, self.seq_len), jnp.int32)
    return self.model.init({"params": rng}, tokens)["params"]

  def loss(self, params, batch: dict, rng: jax.Array, *, train: bool):
    """Mean next-token cross-entropy over the batch; (loss, (sum, count))."""
    logits = self.model.apply({"params": params}, batch["inputs"], train=train,
                              rngs={"dropout": rng})
    total, count = next_token_loss(logits, batch["targets"])
    return total / count, (total, count)


def sample_text(task: LMTask, params, *, prompt: str, num_tokens: int, temperature: float,
                top_k: int, top_p: float, seed: int) -> str:
  """Continues `prompt` by `num_tokens` tokens with the KV-cached sampler; returns prompt + continuation."""
  from jaxlab.decoding.sampling import generate_long
  ids = task.vocab.encode(prompt or "\n")
  tokens = generate_long(task.model, params, jnp.asarray(ids)[None], jax.random.PRNGKey(seed),
                         num_tokens=num_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
  return task.vocab.decode(tokens[0])
