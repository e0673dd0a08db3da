"""Static trees of draft candidates for speculative decoding with extra heads (Medusa's tree attention,
Cai et al. 2024, sec. 2.1.2; SpecInfer, Miao et al. 2024, for sampling from a tree).

A node is named by the ranks along its path from the root: (r_1, ..., r_d) is the r_d-th candidate
of the depth-d head under the node (r_1, ..., r_{d-1}). The root is the next token y (already chosen),
at block index 0; the nodes follow in order of depth, then of ranks, at block indices 1..M, so one
verification pass runs the T = 1 + M tokens [y, nodes...] with the tree's ancestor mask. What a rank
means depends on the sampler (see `jaxlab.decoding.speculative`): greedy, the head's (r+1)-th most
likely token; sampling, the (r+1)-th independent draw from the head's distribution.

A chain (one candidate per depth) is the tree ((0,), (0, 0), ...): verification then needs no mask
beyond the causal one and no reordering of the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
from typing import Sequence

import numpy as np

MAX_NODES = 256  # DraftTree.parse's limit (Medusa's published trees have up to about 64 nodes)


@dataclasses.dataclass(frozen=True)
class DraftTree:
  """Nodes as rank paths (module docstring); hashable, so a static argument of `jax.jit`.

  Derived (numpy, block indices: 0 = root, 1..M = nodes): depth_T, parent_T (root: 0), rank_T,
  ancestors_TT (bool, ancestors-or-self: the append mask of the verification pass), children_TC
  (block indices by rank, -1 padding).
  """

  paths: tuple[tuple[int, ...], ...]

  def __post_init__(self):
    paths = tuple(tuple(p) for p in self.paths)
    if not paths:
      raise ValueError("a draft tree needs at least one node")
    for p in paths:
      if not p or any(isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0
                      for r in p):
        raise ValueError(f"draft tree node {p!r}: a node is a non-empty tuple of ranks (ints >= 0)")
    unique = set(paths)
    if len(unique) != len(paths):
      raise ValueError("draft tree nodes must be distinct")
    for p in paths:
      if len(p) > 1 and p[:-1] not in unique:
        raise ValueError(f"draft tree node {p!r} has no parent {p[:-1]!r} in the tree")
    ordered = tuple(sorted((tuple(int(r) for r in p) for p in paths), key=lambda p: (len(p), p)))
    object.__setattr__(self, "paths", ordered)

  @classmethod
  def chain(cls, depth: int) -> "DraftTree":
    """One candidate per depth: ((0,), (0, 0), ..., (0,) * depth)."""
    if depth < 1:
      raise ValueError(f"a chain needs depth >= 1, got {depth}")
    return cls(tuple((0,) * d for d in range(1, depth + 1)))

  @classmethod
  def product(cls, widths: Sequence[int]) -> "DraftTree":
    """Every combination of the top widths[d] candidates of each depth d (k_1 + k_1 k_2 + ... nodes)."""
    widths = tuple(widths)
    if not widths or any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1
                         for w in widths):
      raise ValueError(f"draft tree widths must be ints >= 1, one per depth; got {widths!r}")
    return cls(tuple(p for d in range(1, len(widths) + 1)
                     for p in itertools.product(*(range(w) for w in widths[:d]))))

  @classmethod
  def parse(cls, spec: str, max_nodes: int = MAX_NODES) -> "DraftTree":
    """The forms of config.sample.draft_tree: widths per depth, "3,2,1" -> product((3, 2, 1)), or
    nodes, "paths: 0 1 0,0 0,1" -> DraftTree(((0,), (1,), (0, 0), (0, 1))) (`spec` of a tree, e.g.
    a sparse tree from `from_accuracies`). More than max_nodes nodes is refused before any is built
    (each node is a token of every verification pass)."""
    if spec.strip().startswith("paths:"):
      try:
        paths = tuple(tuple(int(r) for r in node.split(","))
                      for node in spec.strip()[len("paths:"):].split())
      except ValueError:
        raise ValueError(f"a draft tree given by paths is 'paths: 0 1 0,0 ...' (ranks joined by "
                         f"commas, nodes by spaces), got {spec!r}") from None
      nodes, build = len(paths), lambda: cls(paths)
    else:
      try:
        widths = tuple(int(w) for w in spec.split(","))
      except ValueError:
        raise ValueError(f"a draft tree is widths per depth like '3,2,1', got {spec!r}") from None
      nodes = (sum(int(np.prod(widths[:d], dtype=object)) for d in range(1, len(widths) + 1))
               if all(w >= 1 for w in widths) else 0)  # (product() refuses widths < 1)
      build = lambda: cls.product(widths)
    if nodes > max_nodes:
      raise ValueError(f"the draft tree {spec!r} has {nodes} nodes, more than {max_nodes} "
                       "(each is a token of every verification pass)")
    return build()

  @classmethod
  def from_accuracies(cls, accuracy_DR, num_nodes: int) -> "DraftTree":
    """The num_nodes nodes of largest estimated acceptance probability (Medusa's sparse tree, Cai et
    al. 2024 sec. 2.1.2 / app. C): accuracy_DR[d][r] = how often head d+1's rank-r token is the
    right one (on held-out text); a node's probability is the product along its path, and the sum
    over the tree is its expected number of accepted drafts per verification pass with greedy
    acceptance (if the heads erred independently). A child is never likelier than its parent, so
    best-first search gives a prefix-closed tree."""
    acc = np.asarray(accuracy_DR, np.float64)
    if acc.ndim != 2 or acc.size == 0 or not np.all((acc >= 0) & (acc <= 1)):  # NaN fails too
      raise ValueError(f"accuracy_DR must be [depths, ranks] probabilities in [0, 1], got shape "
                       f"{acc.shape}" + (" with NaN" if np.isnan(acc).any() else ""))
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, (int, np.integer)) or num_nodes < 1:
      raise ValueError(f"num_nodes must be an int >= 1, got {num_nodes!r}")
    depth, ranks = acc.shape
    chosen, frontier = [], [(-acc[0, r], (r,)) for r in range(ranks)]
    heapq.heapify(frontier)
    while frontier and len(chosen) < num_nodes:
      neg_p, path = heapq.heappop(frontier)
      chosen.append(path)
      if len(path) < depth:
        for r in range(ranks):
          heapq.heappush(frontier, (neg_p * acc[len(path), r], path + (r,)))
    return cls(tuple(chosen))

  @classmethod
  def from_rank_paths(cls, ranks_ND, num_nodes: int, max_rank: int = 16) -> "DraftTree":
    """The num_nodes nodes most often right on data, with the heads' errors as they co-occur (unlike
    `from_accuracies`, which multiplies per-head rates): ranks_ND[i, d] = the rank of the right token
    in head d+1's logits at position i (0 = its most likely token). A node (r_1, .., r_d) is right at
    i when ranks_ND[i, :d] == (r_1, .., r_d); the nodes right most often are kept (a parent is right
    whenever its child is, and comes first among equals, so the tree is prefix-closed), and
    `frequency_sum` of the tree is then its mean number of accepted drafts per greedy pass on that
    data. Ranks >= max_rank are never drafted. Fewer than num_nodes nodes if fewer are ever right."""
    ranks = np.asarray(ranks_ND)
    if ranks.ndim != 2 or ranks.shape[0] == 0 or ranks.shape[1] == 0 or not np.issubdtype(
        ranks.dtype, np.integer) or np.any(ranks < 0):
      raise ValueError(f"ranks_ND must be [positions, heads] ints >= 0, got shape {ranks.shape} "
                       f"and dtype {ranks.dtype}")
    if num_nodes < 1:
      raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    counts: dict = {}
    for row in ranks.tolist():
      for d in range(1, len(row) + 1):
        if row[d - 1] >= max_rank:
          break
        counts[tuple(row[:d])] = counts.get(tuple(row[:d]), 0) + 1
    best = sorted(counts, key=lambda p: (-counts[p], len(p), p))[:num_nodes]
    if not best:
      raise ValueError(f"no head's right token ranks below max_rank={max_rank} anywhere in ranks_ND")
    return cls(tuple(best))

  def frequency_sum(self, ranks_ND) -> float:
    """Mean over the positions of ranks_ND (see from_rank_paths) of how many nodes are right."""
    ranks = np.asarray(ranks_ND)
    return float(sum(np.mean(np.all(ranks[:, :len(p)] == np.asarray(p), axis=1))
                     for p in self.paths if len(p) <= ranks.shape[1]))

  @property
  def spec(self) -> str:
    """The "paths: ..." form that `parse` reads back."""
    return "paths: " + " ".join(",".join(map(str, p)) for p in self.paths)

  @property
  def size(self) -> int:
    """M, the number of nodes (the verification pass runs 1 + M tokens)."""
    return len(self.paths)

  @property
  def depth(self) -> int:
    return max(len(p) for p in self.paths)

  @property
  def is_chain(self) -> bool:
    return self.paths == tuple((0,) * d for d in range(1, self.depth + 1))

  @property
  def max_rank(self) -> int:
    return max(p[-1] for p in self.paths)

  @functools.cached_property
  def _index(self) -> dict:
    return {(): 0, **{p: i + 1 for i, p in enumerate(self.paths)}}

  @property
  def depth_T(self) -> np.ndarray:
    return np.asarray([0] + [len(p) for p in self.paths], np.int32)

  @property
  def parent_T(self) -> np.ndarray:
    return np.asarray([0] + [self._index[p[:-1]] for p in self.paths], np.int32)

  @property
  def rank_T(self) -> np.ndarray:
    return np.asarray([0] + [p[-1] for p in self.paths], np.int32)

  @property
  def ancestors_TT(self) -> np.ndarray:
    t = self.size + 1
    mask = np.eye(t, dtype=bool)
    mask[:, 0] = True
    for i, p in enumerate(self.paths, start=1):
      for d in range(1, len(p)):
        mask[i, self._index[p[:d]]] = True
    return mask

  @property
  def children_TC(self) -> np.ndarray:
    kids = [[] for _ in range(self.size + 1)]
    for i, p in enumerate(self.paths, start=1):  # in rank order within each parent
      kids[self._index[p[:-1]]].append(i)
    table = np.full((self.size + 1, max(len(k) for k in kids)), -1, np.int32)
    for i, k in enumerate(kids):
      table[i, :len(k)] = k
    return table

  def expected_accepted(self, accuracy_DR) -> float:
    """Sum over nodes of the product of accuracy_DR[d][r] along the path (from_accuracies)."""
    acc = np.asarray(accuracy_DR, np.float64)
    return float(sum(np.prod([acc[d, r] for d, r in enumerate(p)]) for p in self.paths))
