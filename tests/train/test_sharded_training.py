"""Data-parallel, FSDP and tensor-parallel runs on 8 fake CPU devices equal the 1-device run, step for step."""

import jax
import numpy as np
import pytest

from jaxlab.train import trainer
from jaxlab.train.metrics import read_metrics


def _losses_and_params(config, workdir):
  result = trainer.train(config, workdir, progress=False)
  losses = [m["train_loss"] for m in read_metrics(workdir) if "train_loss" in m]
  return losses, jax.device_get(result["state"]["params"])


COMMON = ["--config.train.log_every=1", "--config.train.steps=4", "--config.train.eval_every=4",
          "--config.train.checkpoint_every=4"]


@pytest.fixture(scope="module")
def single_device_run(tiny_lm_config, tmp_path_factory):
  """The 1-device reference (losses, params), trained once for all the meshes below."""
  return _losses_and_params(tiny_lm_config(*COMMON, "--config.mesh.data=1"),
                            tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("mesh,microbatches",
                         [(("8", "1", "1"), 1), (("1", "8", "1"), 1), (("2", "2", "2"), 1),
                          (("1", "1", "1"), 2), (("2", "2", "1"), 2)],
                         ids=["data8", "fsdp8", "data2_fsdp2_tensor2", "one_device_2_microbatches",
                              "data2_fsdp2_2_microbatches"])
def test_sharded_equals_single_device(tiny_lm_config, single_device_run, tmp_path, mesh,
                                      microbatches):
  """...and gradient accumulation over microbatches equals the whole batch at once."""
  assert jax.device_count() == 8
  data, fsdp, tensor = mesh
  sharded = tiny_lm_config(*COMMON, f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
                           f"--config.mesh.tensor={tensor}",
                           f"--config.train.microbatches={microbatches}")
  ref_losses, ref_params = single_device_run
  losses, params = _losses_and_params(sharded, tmp_path / "sharded")
  assert len(losses) == 4
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params,
               ref_params)


def test_parameters_are_actually_sharded(tiny_lm_config, tmp_path):
  config = tiny_lm_config("--config.mesh.data=1", "--config.mesh.fsdp=8")
  run = trainer.setup(config, tmp_path)
  state = trainer.init_state(run)
  kernel = state["params"]["block_0"]["mlp"]["wi"]["kernel"]  # [embed, mlp]: embed over fsdp
  assert len(kernel.sharding.device_set) == 8
  shard_shapes = {s.data.shape for s in kernel.addressable_shards}
  assert shard_shapes == {(32 // 8, 128)}
  # Adam's moments are sharded like the parameters they belong to (replicated moments would cost
  # every device the whole optimizer state under fsdp).
  params_by_path = {jax.tree_util.keystr(path): leaf for path, leaf in
                    jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  moments = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
    key = jax.tree_util.keystr(path)
    owner = next((p for p in params_by_path if key.endswith(p)), None)
    if owner is not None and leaf.shape == params_by_path[owner].shape and leaf.ndim:
      moments += 1
      assert leaf.sharding.is_equivalent_to(params_by_path[owner].sharding, leaf.ndim), key
  assert moments >= 2 * len(params_by_path)  # mu and nu of every parameter



def test_the_tensor_axis_shards_heads_mlp_and_vocab(tiny_lm_config, tmp_path):
  """Megatron-style: the MLP's hidden units, the attention heads and the vocabulary over `tensor`
  (the equality tests cannot see a rule that stopped sharding: numbers do not change)."""
  from jaxlab.data import text
  config = tiny_lm_config("--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2")
  if text.load_corpus(config.data).vocab.size % 2:
    pytest.skip("the tiny corpus's vocabulary is odd")
  run = trainer.setup(config, tmp_path)
  specs = {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.sharding.spec)
           for path, leaf in jax.tree_util.tree_leaves_with_path(run.abstract_state["params"])}
  run.checkpointer.close()
  assert specs["block_0/mlp/wi/kernel"] == ("fsdp", "tensor")
  assert specs["block_0/mlp/wo/kernel"] == ("tensor", "fsdp")
  assert specs["block_0/attn/qkv/kernel"][:2] == ("fsdp", "tensor")
  assert specs["block_0/attn/out/kernel"][0] == "tensor"
  assert specs["embed/embedding"] == ("tensor", "fsdp")

def test_a_mesh_axis_that_does_not_divide_a_parameter_is_named_before_anything_is_written(
    tiny_lm_config, tmp_path):
  """tensor=8 over the tiny corpus's vocabulary (not a multiple of 8), fsdp=8 over width 36: one line
  naming the mesh key, the parameter and its shape; no workdir is created."""
  import pytest
  from jaxlab.train import trainer
  cases = [(("--config.mesh.data=1", "--config.mesh.tensor=8", "--config.model.num_heads=8"),
            r"config.mesh.tensor=8 does not divide dimension 0 \(size (\d+)\) of "
            r"params/embed/embedding"),
           (("--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.model.width=36",
             "--config.model.num_heads=3"),
            r"config.mesh.fsdp=8 does not divide dimension \d \(size (36)\) of params/")]
  import re
  from jaxlab.configs import ConfigError  # `jaxlab train` exits 2, as for other config errors
  for overrides, message in cases:
    with pytest.raises(ConfigError, match=message) as e:
      trainer.setup(tiny_lm_config(*overrides), tmp_path / "run")
    assert "\n" not in str(e.value) and int(re.search(message, str(e.value)).group(1)) % 8
    assert not (tmp_path / "run").exists()


def test_unknown_or_colliding_logical_axis_names_are_refused():
  """flax leaves a logical name without a rule unsharded, and of two names on one mesh axis shards
  only the first, silently: a typo ('mpl') would replicate a weight that fsdp/tensor should split."""
  import flax.linen as nn
  import jax.numpy as jnp
  from jaxlab.train import sharding
  mesh = sharding.make_mesh((2, 2, 2))
  box = lambda names: {"layer": {"kernel": nn.LogicallyPartitioned(jnp.zeros((4, 4)), names)}}
  sharding.logical_shardings(box(("embed", "mlp")), mesh)
  with pytest.raises(ValueError, match=r"layer/kernel names the logical axis 'mpl', which no rule"):
    sharding.logical_shardings(box(("embed", "mpl")), mesh)
  with pytest.raises(ValueError, match=r"layer/kernel maps both of its logical axes 'heads' and "
                                       r"'mlp' to the mesh axis 'tensor'"):
    sharding.logical_shardings(box(("heads", "mlp")), mesh)


def test_sampling_moves_replicated_parameters_to_one_device(tiny_lm_config):
  """A data-parallel run's parameters (a full copy on each device) are sampled on one device: the
  same text as there, and XLA:CPU's decoding loop over replicated copies grew ~20 KB per token.
  Sharded parameters stay where they are."""
  import flax.linen as nn
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from jaxlab.train import lm_task
  task = lm_task.LMTask(tiny_lm_config("--config.model.position=rope"))
  params = nn.unbox(task.init_params(jax.random.key(0)))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.device_put(params, NamedSharding(mesh, P()))
  moved = lm_task._on_one_device_if_replicated(replicated)
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(moved))
  embed = replicated["embed"]["embedding"]
  sharded = dict(replicated, embed={"embedding": jax.device_put(
      embed, NamedSharding(mesh, P(None, "data")))})  # width 32 over 8 devices
  assert lm_task._on_one_device_if_replicated(sharded) is sharded
  sample = lambda p: lm_task.sample_text(task, p, prompt="the ", num_tokens=40, temperature=1.0,
                                         top_k=0, top_p=1.0, seed=0)
  assert sample(replicated) == sample(params) == sample(sharded)


def test_a_state_larger_than_a_device_is_refused_before_anything_is_built(tiny_lm_config, tmp_path,
                                                                          monkeypatch):
  """Sizes of 10^8 hung in initialisation or died of an allocation error after the run started.
  The check counts each device's share of a sharded array."""
  from jaxlab.configs import ConfigError
  from jaxlab.train import sharding
  config = tiny_lm_config("--config.model.width=65536", "--config.model.num_heads=4")
  with pytest.raises(ConfigError, match=r"^the training state needs \d+\.\d GiB per device, more "
                                        r"than the .* the largest array is params/block_\d/mlp/"):
    trainer.setup(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = sharding.make_mesh((8, 1, 1))
  tree = {"params": {"w": jax.ShapeDtypeStruct((8, 1024), jnp.float32)}}  # 32 KiB
  split = {"params": {"w": NamedSharding(mesh, P("data"))}}
  whole = {"params": {"w": NamedSharding(mesh, P())}}
  monkeypatch.setattr(sharding, "device_memory_bytes", lambda device: 8 * 1024)  # 8 KiB each
  sharding.check_fits(tree, split)  # 4 KiB per device
  with pytest.raises(ConfigError, match=r"largest array is params/w \(8, 1024\)"):
    sharding.check_fits(tree, whole)
