"""Multi-token-prediction and Medusa heads on `lm_char_cpu`, and self-speculative decoding with them.

    python experiments/speculative_decoding.py --data ../shared/data/tinyshakespeare/input.txt \
        [--steps 2000] [--variants baseline medusa1 medusa_joint mtp] [--out speculative_decoding]

Each variant trains `lm_char_cpu` (char-level tiny shakespeare, 4 x 128, context 64, learned positions)
with its heads, in a child process of its own, then reports:
  * the next-token validation loss (the config's 200 batches), so the heads' effect on the model shows;
  * each extra head's top-1 accuracy on the validation batches (head j predicts the token j + 1 ahead);
  * how often the right token is each extra head's rank-r candidate (r < 8), from which Medusa's
    sparse tree of TREE_NODES candidates is built (`DraftTree.from_accuracies`: per-head rates
    multiplied, as if the heads erred independently), and a second tree of TREE_NODES from how often
    each rank path is right as a whole (`DraftTree.from_rank_paths`: the heads' errors as they
    co-occur), both on the validation batches;
  * decoding, batch 1, prompts of 8 characters from the validation text, 52 new tokens: tokens per
    forward pass of speculative decoding with one candidate per head (a chain) and with those trees
    (greedy and temperature 0.8), and ms per token of ordinary cached decoding and of both
    speculative decoders, timed in the same process (median over the prompts, compilation
    excluded). Greedy speculative output is checked to equal greedy decoding's.
Variants: baseline (no heads); medusa1 (3 Medusa heads on a detached trunk, head j weighted 0.8**j:
the next-token model is exactly the baseline's); medusa_joint (the same heads trained with the trunk
from scratch, in the spirit of Medusa-2 but without its separate head learning rate and warm-up);
mtp (2 multi-token-prediction blocks beside the last block, trained with the trunk, equal weights).
Writes experiments/results/<out>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROMPT_CHARS, NEW_TOKENS, PROMPTS = 8, 52, 24
RANKS, TREE_NODES = 8, 16
TREE_LABELS = {"tree": "rates", "tree_joint": "joint"}  # how each sparse tree was chosen

VARIANTS = {
    "baseline": [],
    "medusa1": ["--config.model.medusa_heads=3", "--config.model.heads_stop_gradient=True",
                "--config.model.heads_loss_decay=0.8"],
    "medusa_joint": ["--config.model.medusa_heads=3", "--config.model.heads_loss_decay=0.8"],
    "mtp": ["--config.model.mtp_heads=2"],
}


def run_variant(name: str, args) -> dict:
  """One variant in a child process (each run gets the cores to itself)."""
  proc = subprocess.run([sys.executable, __file__, "--data", args.data, "--steps", str(args.steps),
                         "--prompts", str(args.prompts), "--child", name]
                        + [f"--override={o}" for o in args.override], capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"variant {name} failed:\n" + proc.stderr[-3000:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_here(name: str, args) -> dict:
  """One variant in this process (tests: JAX's devices are already set up)."""
  from jaxlab.configs import load_config
  return _train_and_measure(name, load_config("lm_char_cpu", _overrides(name, args)), args.prompts)


def _overrides(name: str, args) -> list[str]:
  steps = args.steps
  return [f"--config.data.path={args.data}", f"--config.train.steps={steps}",
          "--config.train.tensorboard=False", f"--config.optim.warmup_steps={min(100, steps // 2)}",
          f"--config.train.eval_every={min(250, steps)}",
          f"--config.train.checkpoint_every={min(1000, steps)}",
          "--config.sample.num_tokens=0"] + VARIANTS[name] + list(args.override)


def _child(name: str, args) -> dict:
  from jaxlab.cli import load_run_config  # as `jaxlab train` does: one CPU device per core
  return _train_and_measure(name, load_run_config("lm_char_cpu", _overrides(name, args)),
                            args.prompts)


def _train_and_measure(name: str, config, prompts: int) -> dict:
  from jaxlab import cli
  from jaxlab.train import trainer
  from jaxlab.train.metrics import read_metrics
  with tempfile.TemporaryDirectory() as workdir:
    start = time.time()
    result = trainer.train(config, workdir, progress=False)
    train_s = time.time() - start
    records = read_metrics(workdir)
    run = trainer.setup(config, workdir)
    params = cli._restore_params(run).params
  step_ms = sorted(r["step_time_ms"] for r in records if "step_time_ms" in r)
  out = {"variant": name, "overrides": VARIANTS[name], "steps": config.train.steps,
         "val_loss": result["val_loss"], "ms_per_step": step_ms[len(step_ms) // 2],
         "train_s": train_s, "setup": setup_of(config)}
  out["head_accuracy"], out["rank_accuracy"], ranks_ND = _head_accuracy(run.task, params)
  if run.task.model.config.extra_heads:
    from jaxlab.decoding.draft_tree import DraftTree
    trees = {"tree": DraftTree.from_accuracies(out["rank_accuracy"], TREE_NODES),
             "tree_joint": DraftTree.from_rank_paths(ranks_ND, TREE_NODES, max_rank=RANKS)}
    out["trees"] = {name: {"paths": [list(p) for p in tree.paths],
                           "right_per_position": tree.frequency_sum(ranks_ND)}
                    for name, tree in trees.items()}
    out["trees"]["tree"]["independent_estimate"] = trees["tree"].expected_accepted(
        out["rank_accuracy"])
    out.update(_decoding(run.task, params, prompts, trees))
  return out


def setup_of(config) -> dict:
  """The settings of `config` that the table's header names."""
  return {"num_layers": config.model.num_layers, "width": config.model.width,
          "seq_len": config.data.seq_len, "position": config.model.position, "seed": config.seed,
          "eval_batches": config.train.eval_batches}


def _head_accuracy(task, params):
  """Top-1 accuracy of head j (j = 0: next token) on the validation batches, for each extra head how
  often the right token is its rank-r candidate (r < RANKS): [extra heads][RANKS], and the ranks of
  the right tokens, ranks_ND [positions, extra heads] (positions where every head has a target)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  @jax.jit
  def logits_fn(inputs):
    return task.model.apply({"params": params}, inputs, all_heads=True)

  heads = 1 + task.model.config.extra_heads
  hits, counts = np.zeros((heads, RANKS)), np.zeros(heads)
  rank_rows = []
  for batch in task.eval_iterator():
    logits = np.asarray(logits_fn(jnp.asarray(batch["inputs"])))
    targets = np.asarray(batch["targets"])
    t = targets.shape[1]
    for j in range(heads):
      head = logits[:, :t - j, j]
      target_logit = np.take_along_axis(head, targets[:, j:, None], axis=-1)
      rank = (head > target_logit).sum(-1)  # 0: the head's most likely token
      hits[j] += np.bincount(rank.ravel(), minlength=head.shape[-1])[:RANKS]
      counts[j] += targets[:, j:].size
      if j:
        rank_rows.append(rank[:, :t - heads + 1].reshape(-1))
  accuracy = hits / counts[:, None]
  ranks_ND = (np.stack([np.concatenate(rank_rows[j::heads - 1]) for j in range(heads - 1)], axis=1)
              if heads > 1 else np.zeros((0, 0), np.int64))
  return [float(a) for a in accuracy[:, 0]], accuracy[1:].tolist(), ranks_ND


def _decoding(task, params, prompts: int, trees: dict) -> dict:
  """Tokens per pass and ms per token, ordinary vs speculative decoding (a chain, and each of
  `trees`; at T=0.8 also with typical acceptance), batch 1; at T=0.8 the mean log-probability per new
  token of each decoder's text under the model's T=0.8 distribution (typical acceptance is not
  exact: it shows)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jaxlab.decoding.sampling import generate
  from jaxlab.decoding.speculative import speculative_generate

  text = np.asarray(task.corpus.validation)
  starts = np.linspace(0, len(text) - PROMPT_CHARS - 1, prompts).astype(int)
  model = task.model

  def timed(fn, prompt, key):
    start = time.perf_counter()
    result = jax.block_until_ready(fn(prompt, key))
    return result, (time.perf_counter() - start) * 1e3 / NEW_TOKENS

  @jax.jit
  def mean_logp(tokens_BL, temperature):
    logits = model.apply({"params": params}, tokens_BL[:, :-1])[:, PROMPT_CHARS - 1:]
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    return jnp.take_along_axis(logp, tokens_BL[:, PROMPT_CHARS:, None], axis=-1).mean()

  def plain(t):
    return lambda p, k: (generate(model, params, p, k, num_tokens=NEW_TOKENS, temperature=t), None)

  def spec(t, tree, acceptance="exact"):
    return lambda p, k: speculative_generate(model, params, p, k, num_tokens=NEW_TOKENS,
                                             temperature=t, tree=tree, acceptance=acceptance)

  out = {}
  for label, temperature in (("greedy", 0.0), ("t0.8", 0.8)):
    drafts = {"chain": None, **trees}
    fns = {"plain": plain(temperature),
           **{name: spec(temperature, tree) for name, tree in drafts.items()}}
    if temperature > 0:
      fns.update({f"{name}_typical": spec(temperature, tree, "typical")
                  for name, tree in drafts.items()})
    first = jnp.asarray(text[starts[0]:starts[0] + PROMPT_CHARS])[None]
    for fn in fns.values():  # compile
      jax.block_until_ready(fn(first, jax.random.key(0)))
    ms = {name: [] for name in fns}
    passes = {name: [] for name in fns if name != "plain"}
    logps = {name: [] for name in fns}
    identical = {name: True for name in drafts}
    for i, s in enumerate(starts):
      prompt, key = jnp.asarray(text[s:s + PROMPT_CHARS])[None], jax.random.key(i)
      (want, _), t_plain = timed(fns["plain"], prompt, key)
      ms["plain"].append(t_plain)
      if temperature > 0:
        logps["plain"].append(float(mean_logp(want, temperature)))
      for name in passes:
        (got, steps), t_spec = timed(fns[name], prompt, key)
        ms[name].append(t_spec)
        passes[name].append(1 + int(steps))
        if temperature == 0.0:
          identical[name] &= bool((np.asarray(got) == np.asarray(want)).all())
        else:
          logps[name].append(float(mean_logp(got, temperature)))
    out[label] = {"ms_per_token_plain": float(np.median(ms["plain"]))}
    if temperature > 0:
      out[label]["logp_plain"] = float(np.mean(logps["plain"]))
    for name in passes:
      out[label][name] = {"tokens_per_pass": NEW_TOKENS * len(starts) / sum(passes[name]),
                          "ms_per_token": float(np.median(ms[name]))}
      if temperature == 0.0:
        out[label][name]["identical_to_greedy"] = identical[name]
      else:
        out[label][name]["logp"] = float(np.mean(logps[name]))
  return out


def _table(results: list[dict], device: str, date: str, command: str, steps: int, prompts: int,
           in_process: bool = False) -> str:
  """The .md. The model, seed and validation batches are the first variant's (setup_of); the variants
  differ only in their heads."""
  setup = results[0]["setup"]
  lines = [
      "# Multi-token prediction and Medusa heads on lm_char_cpu; self-speculative decoding",
      "",
      f"Device: {device}. Date: {date}. Command: `{command}`. Each variant trains lm_char_cpu "
      f"({setup['num_layers']} x {setup['width']}, context {setup['seq_len']}, {setup['position']} "
      f"positions, {steps} steps, seed {setup['seed']}) "
      + ("in this process." if in_process else "in its own process."),
      f"Val loss: the next-token head on {setup['eval_batches']} validation batches. Head accuracy: "
      "top-1 on those batches, head j predicting the token j + 1 ahead.",
      "",
      "| variant | val loss | ms/step (train) | head accuracy (next, +1, +2, ...) |",
      "| --- | --- | --- | --- |",
  ]
  for r in results:
    acc = ", ".join(f"{a:.3f}" for a in r["head_accuracy"])
    lines.append(f"| {r['variant']} | {r['val_loss']:.4f} | {r['ms_per_step']:.1f} | {acc} |")
  lines += [
      "",
      f"Decoding: batch 1, {prompts} prompts of {PROMPT_CHARS} validation characters, {NEW_TOKENS} "
      "new tokens. Drafts: one candidate per head (chain), or a sparse tree of "
      f"{TREE_NODES} candidates chosen on the validation batches either from each head's rank "
      "accuracies multiplied (Medusa's way, `from_accuracies`: 'rates') or from how often each rank "
      "path is right as a whole (`from_rank_paths`: 'joint'); in brackets the tree's nodes right "
      "per validation position (greedy drafts accepted per pass, if the model's choices were the "
      "text's), and for 'rates' first the estimate that assumes independent heads. With exact "
      "sampling rank r is the (r+1)-th independent draw, so the trees fit greedy drafting best. "
      "Acceptance at T=0.8: exact (speculative sampling, the model's distribution) or typical "
      "(Medusa-2, epsilon 0.09, delta 0.3: not exact). Tokens per pass count the prompt's prefill "
      "as a pass; ms/token is the median over the prompts, compilation excluded, all decoders timed "
      "in turn on each prompt in one process; speed-up = ordinary / speculative. log p: the mean "
      "log-probability per new token of the sampled text under the model at T=0.8 (ordinary "
      "sampling's expectation is minus the entropy; a decoder that favours likely tokens scores "
      "higher).",
      "",
      "| variant | drafts | greedy: tokens/pass | greedy: ms/token (speed-up) | T=0.8 exact: "
      "tokens/pass | T=0.8 exact: ms/token (speed-up) | T=0.8 exact: log p | T=0.8 typical: "
      "tokens/pass | T=0.8 typical: ms/token (speed-up) | T=0.8 typical: log p |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  names = ("chain", *TREE_LABELS)
  for r in results:
    if "greedy" not in r:
      continue
    g, t = r["greedy"], r["t0.8"]
    lines.append(f"| {r['variant']} | none (ordinary decoding) | 1 | {g['ms_per_token_plain']:.2f} "
                 f"| 1 | {t['ms_per_token_plain']:.2f} | {t['logp_plain']:.3f} | - | - | - |")
    for name in names:
      if name == "chain":
        drafts = f"chain of {len(r['head_accuracy']) - 1}"
      else:
        tree = r["trees"][name]
        right = f"{tree['right_per_position']:.2f}"
        if "independent_estimate" in tree:
          right = f"{tree['independent_estimate']:.2f} / {right}"
        drafts = f"tree of {len(tree['paths'])}, {TREE_LABELS[name]} ({right})"
      cells = [r["variant"], drafts]
      for label, key in (("greedy", name), ("t0.8", name), ("t0.8", f"{name}_typical")):
        d = r[label][key]
        ratio = r[label]["ms_per_token_plain"] / d["ms_per_token"]
        cells += [f"{d['tokens_per_pass']:.2f}", f"{d['ms_per_token']:.2f} ({ratio:.2f}x)"]
        if "logp" in d:
          cells.append(f"{d['logp']:.3f}")
      lines.append("| " + " | ".join(cells) + " |")
  same = [f"{r['variant']} ({name})" for r in results for name in names
          if r.get("greedy", {}).get(name, {}).get("identical_to_greedy")]
  lines += ["", "Greedy speculative output identical to greedy decoding for every prompt: "
            + (", ".join(same) if same else "none") + "."]
  with_trees = [r for r in results if "trees" in r]
  if with_trees:
    lines += ["", "Trees (`--draft-tree` / config.sample.draft_tree takes them as they stand):"]
    for r in with_trees:
      for name, tree in r["trees"].items():
        lines.append(f"- {r['variant']}, {TREE_LABELS[name]}: `paths: "
                     + " ".join(",".join(map(str, p)) for p in tree["paths"]) + "`")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", required=True, help="tiny shakespeare input.txt")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--prompts", type=int, default=PROMPTS)
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--out", default="speculative_decoding")
  parser.add_argument("--results", default=str(RESULTS), help="folder for the .md and .json")
  parser.add_argument("--override", action="append", default=[],
                      help="a config override for every variant, e.g. "
                      "--override=--config.model.num_layers=1")
  parser.add_argument("--in-process", action="store_true",
                      help="train the variants in this process (tests), not one child each")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(_child(args.child, args)))
    return
  from jaxlab.train.host_devices import cpu_model
  device, date = f"{cpu_model()}, {os.cpu_count()} cores (jax on CPU)", time.strftime("%Y-%m-%d")
  command = shlex.join(["python", "experiments/speculative_decoding.py", *argv])
  results = []
  for name in args.variants:
    results.append((run_here if args.in_process else run_variant)(name, args))
    print(json.dumps(results[-1]), flush=True)
  table = _table(results, device, date, command, args.steps, args.prompts, args.in_process)
  from jaxlab import experiment_results
  experiment_results.write(args.results, args.out, table,
                           {"device": device, "date": date, "command": command, "results": results})
  print(table)


if __name__ == "__main__":
  main()
