"""One digest of JSON-like data, shared by every layer that must notice an edit made in place (a
checkpoint's data state, the best-params record's meta, vocab.json, the config fingerprint)."""

import hashlib
import json


def json_sha256(value) -> str:
  """Hex sha256 of `value` as JSON with sorted keys: key order ignored, and a JSON round trip keeps
  the digest (every value is one JSON writes and reads back unchanged)."""
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
