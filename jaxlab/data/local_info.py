"""DatasetInfo for jaxlab's builders, whose data is always local, and where the local data lives."""

import pathlib

import tensorflow_datasets as tfds

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# The datasets beside a checkout (../shared/data): the default of configs whose data.path is "".
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """A `tfds.core.DatasetInfo` that never looks for pre-computed metadata in TFDS's GCS bucket.

  TFDS's builder asks for it whenever the dataset is not prepared yet; with GCS access off (TFDS's
  default) the lookup finds nothing but leaves an empty `/tmp/tmp*tfds` directory behind, one per
  builder constructed. jaxlab's datasets are built from local files, so there is nothing to look up.
  """

  def initialize_from_bucket(self) -> None:
    return None
