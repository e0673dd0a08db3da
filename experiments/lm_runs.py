"""Train one LM config in a child process (clean CPU devices) and report what the experiments tabulate.

`train_lm("lm_char_cpu", ["--config.model.attention=gau", ...])` runs `jaxlab.train.trainer.train` on
`load_run_config(name, overrides)` (as `jaxlab train` does) in a temporary workdir and returns
{"val_loss", "ms_per_step" (median over all logged intervals, compilation excluded), "params"}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_CHILD = """\
import json, sys, tempfile
from jaxlab.cli import load_run_config
c = load_run_config(sys.argv[1], sys.argv[2:])
from jaxlab.train import trainer
from jaxlab.train.metrics import median_step_time_ms
with tempfile.TemporaryDirectory() as d:
  r = trainer.train(c, d, progress=False)
  import jax
  params = sum(x.size for x in jax.tree.leaves(r['state']['params']))
  ms = median_step_time_ms(d)  # over all logged intervals, not the last one's
print(json.dumps({'val_loss': r['val_loss'], 'ms_per_step': ms, 'params': int(params)}))
"""


def train_lm(config_name: str, overrides: list[str]) -> dict:
  """Trains `config_name` with `overrides` in a child process; raises RuntimeError with its stderr
  if it fails."""
  # The child picks its own CPU device count (one per core, as `jaxlab train` does), even when this
  # process runs with forced fake devices (the test suite's 8).
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  proc = subprocess.run([sys.executable, "-c", _CHILD, config_name, *overrides],
                        capture_output=True, text=True, env=env)
  if proc.returncode:
    raise RuntimeError(proc.stderr[-3000:])
  return json.loads(proc.stdout.strip().splitlines()[-1])
