"""cache: derive the minimal recorded set from the edit graph and build the record graph.

Why: an edit reads recorded values only where its sparse ops look outside the active set:
convolution halos (the conv input), self-attention K/V under the ``full`` policy, group-norm
statistics, the inputs of nodes that run dense, and the U-Net output. Pointwise intermediates
are never read. Rather than name layers, this pass reads the edit graph produced by
``sparsify``: its ``cache_read`` nodes *are* the set. The record graph is the canonical graph
with a ``cache_write`` after each recorded node (or, for what an op records besides its value,
such as group-norm statistics, after the computation its registry entry declares in
``OpSpec.records``), so one dense run stores exactly what edits will read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..config import SparseConfig
from ..execution import sparse_ops as ops
from ..graph_keys import CACHE_INPUT, LEVELS, META_CACHE_KIND, META_CACHE_SOURCE
from . import registry


@dataclass(frozen=True)
class CacheEntry:
    key: str
    kind: str      # "value", or a kind the source's op records (``OpSpec.records``)
    source: str    # the canonical node whose value (or whose input's statistics) is recorded


def derive_cache_set(edit: fx.GraphModule) -> list[CacheEntry]:
    """The entries an edit graph reads, in graph order."""
    return [CacheEntry(node.args[1], node.meta[META_CACHE_KIND], node.meta[META_CACHE_SOURCE])
            for node in edit.graph.nodes
            if node.op == "call_function" and node.target is ops.cache_read]


def cache_writes(entries: list[CacheEntry]) -> dict[str, list[str]]:
    """Per canonical node name, the cache keys the record graph writes from it, in order."""
    writes: dict[str, list[str]] = {}
    for entry in entries:
        writes.setdefault(entry.source, []).append(entry.key)
    return writes


def insert_cache_writes(gm: fx.GraphModule, entries: list[CacheEntry],
                        config: SparseConfig) -> fx.GraphModule:
    """The record graph: ``gm`` (canonical, analyzed; left unchanged) plus a ``cache_write``
    per entry. Which keys each canonical node records is ``entries`` grouped by ``source``
    (``cache_writes``).

    The record graph takes the user inputs plus ``fc_cache``, the dict that receives the step's
    recorded values, and returns the same output as ``gm``.
    """
    by_source: dict[str, list[CacheEntry]] = {}
    for entry in entries:
        by_source.setdefault(entry.source, []).append(entry)
    tiles = config.tiles_for(gm.meta[LEVELS])
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    nodes = list(gm.graph.nodes)
    placeholders = [node for node in nodes if node.op == "placeholder"]
    for node in placeholders:
        env[node] = graph.node_copy(node)
    cache = graph.placeholder(CACHE_INPUT)

    def write_entries(node: fx.Node) -> None:
        for entry in by_source.get(node.name, ()):
            if entry.kind == "value":
                value = env[node]
            else:
                value = registry.spec_of(node).records[entry.kind](graph, node, env, tiles)
            graph.call_function(ops.cache_write, (cache, entry.key, value))

    for node in placeholders:
        write_entries(node)
    for node in nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
            write_entries(node)
    record = fx.GraphModule(gm, graph)
    record.meta.update(gm.meta)
    return record
