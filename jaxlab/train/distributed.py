"""Multi-process (multi-host) runs through `jax.distributed`.

Every process runs the same `jaxlab train|eval|sample` command; together they see all processes' devices
as one mesh. Each process reads only its rows of every global batch (those its devices hold,
`sharding.process_batch_rows`) and `sharding.place_batch` assembles the global arrays. Files a run writes once
(config.json, metrics, TensorBoard, printed lines) are written by process 0; orbax checkpoints are
written by all processes together into the shared WORKDIR.

    # on each of N hosts (process_id = 0 .. N-1), WORKDIR on a filesystem they share:
    jaxlab train lm_char --workdir /shared/runs/x \
        --coordinator HOST0:1234 --num-processes N --process-id I
    # or where JAX detects the cluster itself (Cloud TPU pods, SLURM, Open MPI, Kubernetes):
    jaxlab train lm_char --workdir /shared/runs/x --distributed
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np


def wanted(*, coordinator: Optional[str], num_processes: Optional[int],
           process_id: Optional[int], auto: bool) -> bool:
  """Whether the command-line options ask for a multi-process run; ValueError naming the option
  when they are incomplete or contradictory."""
  explicit = {"--coordinator": coordinator, "--num-processes": num_processes,
              "--process-id": process_id}
  given = [name for name, value in explicit.items() if value is not None]
  if auto and given:
    raise ValueError(f"--distributed detects the cluster itself; drop {', '.join(given)} "
                     "(or drop --distributed and give all three)")
  if given and len(given) != len(explicit):
    missing = [name for name in explicit if name not in given]
    raise ValueError(f"{', '.join(given)} given without {', '.join(missing)}: a multi-process "
                     "run needs --coordinator HOST:PORT, --num-processes N and --process-id I")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num-processes={num_processes} must be >= 1")
  if process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process-id={process_id} must be in [0, {num_processes})")
  if coordinator is not None:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f"--coordinator={coordinator!r} must be HOST:PORT (a port in 1..65535)")
  return auto or bool(given)


def initialize(*, coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """`jax.distributed.initialize` (before anything starts JAX's backend). All None: the cluster is
  detected by JAX. Process 0 first checks that the coordinator's port is free here (a port in use
  crashes the coordination service); every process says on stderr that it is waiting for the others."""
  import sys
  if coordinator is not None:
    if process_id == 0:
      _require_free_port(int(coordinator.rpartition(":")[2]))
    print(f"jaxlab: process {process_id} of {num_processes}: joining the others at {coordinator}",
          file=sys.stderr, flush=True)
  try:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  except Exception as e:
    how = "--distributed: JAX detected no cluster here" if coordinator is None else "--coordinator"
    message = (str(e).splitlines() or [""])[0]
    raise RuntimeError(f"{how}: jax.distributed.initialize failed ({type(e).__name__}: {message}); "
                       "give --coordinator HOST:PORT --num-processes N --process-id I") from None


def _require_free_port(port: int) -> None:
  import socket
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      raise ValueError(f"--coordinator port {port} cannot be used on this host ({e.strerror}); "
                       "process 0 runs the coordinator there: choose a free port") from None


SAME_COMMAND = "run the same command (same config, overrides and --workdir) in every process"


def require_same_everywhere(text: str, what: str, advice: str = SAME_COMMAND) -> None:
  """Raises ValueError in every process unless `text` is the same in all of them (a collective)."""
  if jax.process_count() == 1:
    return
  import hashlib
  from jax.experimental import multihost_utils
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], np.uint32)
  every = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
  if not (every == every[0]).all():
    raise ValueError(f"the processes were given different {what}; {advice}")


def fingerprint(*parts: Any) -> str:
  """A sha256 hex digest of NumPy arrays (dtype, shape and bytes) and strings, in order."""
  import hashlib
  digest = hashlib.sha256()
  for part in parts:
    if isinstance(part, str):
      digest.update(b"s" + part.encode())
    else:
      a = np.ascontiguousarray(part)
      digest.update(f"a{a.dtype.str}{a.shape}".encode())
      digest.update(a.tobytes())
  return digest.hexdigest()


def local_device_counts() -> list[int]:
  """Every process's device count, in process order (from the global device list: no collective,
  since JAX's all-gathers need equal counts)."""
  counts = [0] * jax.process_count()
  for device in jax.devices():
    counts[device.process_index] += 1
  return counts


def is_primary() -> bool:
  """True in the one process that writes run files and prints (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def all_agree(ok: bool) -> bool:
  """True when `ok` holds in every process (a collective in a multi-process run: all must call it)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def exit_if_multi_process(code: int, *, wait_for_peers_s: float = 10.0) -> None:
  """Ends a process of a multi-process run at once after an error (os._exit), so that it does not wait
  at JAX's shutdown barrier for peers that may never arrive; they see it leave and stop too.

  An error that every process finds (a config error, unequal device counts) should end every process
  with its own message, not with a crash of those still talking to the coordination service that
  process 0 hosts. So each process first waits up to `wait_for_peers_s` at a key-value barrier (no
  devices involved) for the others to leave too, and process 0 leaves last."""
  if jax.distributed.is_initialized() and jax.process_count() > 1:
    import os
    import sys
    import time
    sys.stdout.flush()
    sys.stderr.flush()
    try:  # os._exit in any case, even on Ctrl-C here (JAX's atexit shutdown would wait for peers)
      from jax._src import distributed as jax_distributed  # the barrier has no public API
      jax_distributed.global_state.client.wait_at_barrier("jaxlab_exit_after_error",
                                                          int(wait_for_peers_s * 1000))
      if is_primary():
        time.sleep(1.0)  # the others' os._exit follows the barrier at once
    except Exception:  # a peer is still busy (the error was this process's alone) or already gone
      pass
    finally:
      os._exit(code)


def host_copy(tree: Any) -> Any:
  """The pytree's global arrays as numpy arrays on every process (a collective in a multi-process
  run: every process must call it), for work that runs on one host's devices (sampling, reports)."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
