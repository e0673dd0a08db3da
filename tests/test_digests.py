"""The JSON digest is stored in every workdir (vocab.json, the best record's meta, the data state's
digest, the config fingerprint): a change to how it is computed would make every saved one look
damaged. Pinned to literal values."""

from jaxlab.data.vocab import Vocab
from jaxlab.digests import json_sha256
from jaxlab.train import checkpoint


def test_the_digest_of_fixed_values_is_pinned():
  value = {"b": [1, 2.5, None], "a": "\u00e9"}
  assert json_sha256(value) == "fc10ba9755cfc69ce6c336075dcaa7bec5e27a5e3b43810a5952cd761f259a45"
  assert json_sha256(dict(reversed(list(value.items())))) == json_sha256(value)  # key order
  assert checkpoint.data_digest(value) == json_sha256(value)
  assert Vocab("ab\n").to_file_json()["sha256"] == \
      "f7cd5ac8678b3991501d7c9e84f5343348aca70a3f472c7cec535bb080b7ae7c"
