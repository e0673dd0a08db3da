"""Every test sees 8 fake CPU devices, so mesh and sharding tests run anywhere."""

import atexit
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

# Compilation dominates the suite (its programs are small and mostly compiled once), so the tests trade
# run-time speed for compile speed: LLVM's optimisation level 0 (about 30% faster on 2 cores, measured
# 2026-12-02) and XLA CPU's older elemental emitters instead of its fusion emitters (another ~35% on
# tests/models/test_gpt.py + tests/layers/test_cache_append.py: 132 s against 203 s, 2026-12-03; the
# fusion emitters run the lm_char_cpu step faster, 65 against 74 ms, so `jaxlab train` keeps them).
# Numerical comparisons are unaffected: both sides of every comparison run under the same flags. Set
# either flag yourself (e.g. --xla_backend_optimization_level=2) to test the optimised code paths.
_FUSION_FLAG = "--xla_cpu_use_fusion_emitters"


def _xla_accepts(flag: str) -> bool:
  """XLA aborts a process on a flag it does not know (the flag may leave a later jaxlib): ask a child."""
  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                        capture_output=True).returncode == 0


_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
if _FUSION_FLAG not in _flags and _xla_accepts(f"{_FUSION_FLAG}=false"):
  _flags += f" {_FUSION_FLAG}=false"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")
# One persistent compilation cache per test session, shared by the xdist workers and the processes
# the tests start (they inherit it from the controller, which loads this file first and removes the
# folder at the end): many tests compile the same programs (tests/models/test_gpt.py + tests/layers:
# 110 s without it, 92 s with it, 2 cores, 2026-12-05). A cache entry read while another process
# writes it is a warning and a recompile in JAX, not an error.
# A cache folder of the user's own is used as it is (with JAX's thresholds, not every tiny program).
_OWN_JIT_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_JIT_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlab-tests-jit-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  # also when the session ends without pytest_unconfigure (an interrupted run)
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
# Each pytest process (an xdist worker) and its children prepare TFDS data in a folder of their own:
# two workers building one dataset into the shared ~/tensorflow_datasets at once collided.
_TFDS_DATA_DIR = tempfile.mkdtemp(prefix="jaxlab-tests-tfds-")
os.environ["TFDS_DATA_DIR"] = _TFDS_DATA_DIR
atexit.register(shutil.rmtree, _TFDS_DATA_DIR, True)

import jax  # noqa: E402  (after XLA_FLAGS)


def pytest_unconfigure(config):
  """Removes this process's TFDS folder: pytest-xdist workers leave without running atexit hooks
  (each run left a few MiB in the temporary directory); the controller removes the session's
  compilation cache (tens of MiB), after its workers have stopped."""
  shutil.rmtree(_TFDS_DATA_DIR, ignore_errors=True)
  if _OWN_JIT_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
  """A 24k-character text file with some structure (words drawn from a small Zipf-like vocabulary)."""
  rng = np.random.default_rng(0)
  words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "him", "her",
           "ROMEO:", "JULIET:", "love", "night", "day", "\n"]
  p = 1.0 / np.arange(1, len(words) + 1)
  text = " ".join(rng.choice(words, size=5000, p=p / p.sum()))
  path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
  path.write_text(text)
  return path


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def tiny_cli_overrides(tiny_corpus, tfds_dir):
  """`jaxlab train lm_char` overrides for a 4-step one-layer char LM on the tiny corpus."""
  return ["--config.data.name=text_files", f"--config.data.path={tiny_corpus}",
          f"--config.data.data_dir={tfds_dir}", "--config.data.vocab=char",
          "--config.data.seq_len=16", "--config.data.batch_size=8",
          "--config.model.num_layers=1", "--config.model.width=32",
          "--config.optim.warmup_steps=1", "--config.train.steps=4", "--config.train.eval_every=4",
          "--config.train.eval_batches=2", "--config.train.checkpoint_every=4",
          "--config.train.tensorboard=False", "--config.mesh.data=1",
          "--config.sample.num_tokens=20", "--config.sample.prompt=the "]


@pytest.fixture(scope="session")
def tiny_lm_config(tiny_cli_overrides):
  """Factory: a validated tiny LM config on the tiny corpus (tiny_cli_overrides with two layers and
  six steps); overrides as '--config.a.b=v' strings."""
  from jaxlab.configs import load_config

  def make(*overrides):
    base = tiny_cli_overrides + [  # later overrides win
        "--config.model.num_layers=2", "--config.model.num_heads=4", "--config.optim.warmup_steps=2",
        "--config.train.steps=6", "--config.train.log_every=2", "--config.train.eval_every=3",
        "--config.train.checkpoint_every=3", "--config.sample.num_tokens=8"]
    return load_config("lm_char", base + list(overrides))

  return make


@pytest.fixture
def as_saved_before_configs_were_recorded():
  """f(workdir): rewrites each checkpoint's data item without the run's config (trainer.CONFIG_KEY),
  as a jaxlab before it recorded them saved it (its digest recomputed); those checkpoints are checked
  against WORKDIR/config.json, so tests of older workdirs edit that file."""
  import json
  from jaxlab.train import checkpoint, trainer

  def rewrite(workdir: pathlib.Path) -> None:
    steps = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    rewritten = 0
    for f in (workdir / "checkpoints").rglob("*"):
      if f.is_file() and checkpoint.DATA_DIGEST_KEY in f.read_text(errors="replace"):
        data = json.loads(f.read_text())
        del data[trainer.CONFIG_KEY]
        rest = {k: v for k, v in data.items()
                if k not in (checkpoint.DATA_DIGEST_KEY, checkpoint.CHECKSUMS_KEY)}
        data[checkpoint.DATA_DIGEST_KEY] = checkpoint.data_digest(rest)
        f.write_text(json.dumps(data))
        rewritten += 1
    assert rewritten == len(steps) > 0

  return rewrite


def load_experiment(name: str):
  """experiments/<name>.py as a fresh module (registered in sys.modules: dataclasses look it up)."""
  import importlib.util
  import sys
  path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def experiment():
  """Loads a script of experiments/ as a module: `experiment("attention_zoo").main([...])`."""
  return load_experiment


@pytest.fixture
def assert_sharded_training_matches(tmp_path):
  """Factory: trains config `name` with `overrides` for 3 steps on 1 device and on a data 4 x
  fsdp 2 mesh, and asserts the same train loss at each step and the same final parameters."""
  def check(name: str, overrides: list):
    import jax
    import numpy as np
    from jaxlab.configs import load_config
    from jaxlab.train import trainer
    from jaxlab.train.metrics import read_metrics
    common = overrides + ["--config.train.steps=3", "--config.train.log_every=1",
                          "--config.train.eval_every=3", "--config.train.checkpoint_every=3",
                          "--config.optim.warmup_steps=1", "--config.optim.lr=1e-2"]
    runs = {}
    for run, (data, fsdp) in (("single", (1, 1)), ("sharded", (4, 2))):
      config = load_config(name, common + [f"--config.mesh.data={data}",
                                           f"--config.mesh.fsdp={fsdp}"])
      result = trainer.train(config, tmp_path / run, progress=False)
      losses = [m["train_loss"] for m in read_metrics(tmp_path / run) if "train_loss" in m]
      runs[run] = (losses, jax.device_get(result["state"]["params"]))
    (ref_losses, ref_params), (losses, params) = runs["single"], runs["sharded"]
    assert len(losses) == 3 and losses[-1] != losses[0]
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), params,
                 ref_params)
  return check
