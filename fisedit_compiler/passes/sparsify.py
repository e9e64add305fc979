"""sparsify: rewrite an analyzed canonical graph into the edit graph over compact tensors.

Why: an edit changes a small region, so every positional value (spatial or tokens) is carried
*compact*, holding only its level's active positions (see ``execution.plan``), and each op is
replaced by the sparse form that computes exactly those positions: its registry entry's
``sparse`` rewrite (``passes.registry``; docs/design.md, "Sparse ops"). Global nodes stay
unchanged (text K/V), except that values depending on the timestep alone (the time embedding
each block adds) are read from the recording where positional nodes use them, since an edit
step runs at the recorded timestep.

Anything else positional (an unknown op, an op without a sparse rewrite, a reshape that mixes
positions with channels, a masked attention, a value the analysis placed by its shape alone,
``analyze.META_BY_SHAPE``) runs *dense*: its inputs are rebuilt as mixed dense tensors from the
recorded values, the op runs as captured, and the result is gathered back if positional, which
restricts it to the region. That is exact against the oracle, only slower; a warning names such
nodes. The output is always restricted: a graph whose output shows no positions is refused.

Recorded data enters through ``cache_read(cache, key)`` nodes; ``passes.cache`` derives the
record graph's writes from exactly those nodes. The edit graph takes the user inputs plus the
placeholders ``fc_plan`` (a MaskPlan) and ``fc_cache`` (one step's recorded values).
"""

from __future__ import annotations

import warnings

import torch.fx as fx

from .. import ir
from ..config import SparseConfig
from ..errors import FiseditError
from ..execution import sparse_ops as ops
from ..graph_keys import (CACHE_INPUT, META_CACHE_KIND, META_CACHE_SOURCE, META_FROM,
                          PLAN_INPUT, SPARSE_MODES)
from . import registry
from .analyze import META_BY_SHAPE, TIMESTEP_INPUT
from .registry.spec import Domain

def cache_key(node: fx.Node, kind: str = "value") -> str:
    """The cache key of a node's recorded value, or of what its op records as ``kind``."""
    return node.name if kind == "value" else f"{node.name}:{kind}"


def sparsify(gm: fx.GraphModule, config: SparseConfig) -> fx.GraphModule:
    """The edit graph of an analyzed canonical ``gm``, which is left unchanged.

    How each canonical node runs in edits ("sparse", "dense", "global" or "input") is returned
    as ``edit.meta[SPARSE_MODES]``, keyed by canonical node name.
    """
    rewriter = _Rewriter(gm, config)
    edit = rewriter.run()
    if rewriter.dense_nodes:
        warnings.warn(
            f"{len(rewriter.dense_nodes)} positional node(s) run dense in edits (exact but "
            f"slower), in {_by_module(rewriter.dense_nodes)}; inspect with "
            "`fisedit-compiler dump --stage sparse`", stacklevel=2)
    return edit


def _by_module(nodes: list[fx.Node], shown: int = 6) -> str:
    """The modules the nodes come from, each with its first node names: a user knows the
    U-Net's modules (an upsampler, FreeU's FFT), not the graph's node names."""
    modules: dict[str, list[str]] = {}
    for node in nodes:
        modules.setdefault(node.meta.get(ir.META_MODULE) or "the U-Net's forward", []).append(
            node.name)
    parts = [f"{module} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
             for module, names in list(modules.items())[:shown]]
    more = len(modules) - shown
    return ", ".join(parts) + (f" and {more} more module(s)" if more > 0 else "")


def _domain(node) -> Domain:
    return node.meta[ir.META_DOMAIN]


def _shape(node) -> tuple[int, ...]:
    return tuple(int(s) for s in node.meta["val"].shape)


class _Rewriter:
    """Builds the edit graph; the ops' sparse rewrites receive it as ``edit`` and use its
    ``emit``, ``read``, ``operand``, ``env``, ``plan`` and ``config``."""

    def __init__(self, gm: fx.GraphModule, config: SparseConfig):
        self.gm, self.config = gm, config
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.reads: dict[str, fx.Node] = {}
        self.levels: dict[int, fx.Node] = {}
        self.dense_nodes: list[fx.Node] = []
        self.modes: dict[str, str] = {}   # canonical node name -> how it runs in edits

    # -- helpers --------------------------------------------------------------------------
    def emit(self, target, *args, source: fx.Node | None = None) -> fx.Node:
        new = self.graph.call_function(target, tuple(args))
        if source is not None:
            new.meta[META_FROM] = source.name
        return new

    def read(self, source: fx.Node, kind: str = "value") -> fx.Node:
        key = cache_key(source, kind)
        if key not in self.reads:
            node = self.emit(ops.cache_read, self.cache, key)
            node.meta[META_CACHE_KIND] = kind
            node.meta[META_CACHE_SOURCE] = source.name
            self.reads[key] = node
        return self.reads[key]

    def full(self, value):
        """A dense (mixed) version of a canonical argument."""
        if isinstance(value, fx.Node):
            domain = _domain(value)
            if domain.positional:
                return self.emit(ops.scatter_full, self.env[value], self.read(value),
                                 self.level(domain), domain.dims)
            return self.env[value]
        return value

    def level(self, domain: Domain) -> fx.Node:
        if domain.level not in self.levels:
            self.levels[domain.level] = self.emit(_level_of, self.plan, domain.level)
        return self.levels[domain.level]

    # -- main loop ------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        nodes = list(self.gm.graph.nodes)
        for node in nodes:
            if node.op == "placeholder":
                self.env[node] = self.graph.placeholder(node.name)
        self.plan = self.graph.placeholder(PLAN_INPUT)
        self.cache = self.graph.placeholder(CACHE_INPUT)
        for node in nodes:
            if node.op == "placeholder":
                domain = _domain(node)
                if domain.positional:
                    self.env[node] = self.emit(ops.gather_positions, self.env[node],
                                               self.level(domain), domain.dims, source=node)
                self.modes[node.name] = "input"
            elif node.op == "get_attr":
                self.env[node] = self.graph.get_attr(node.target)
            elif node.op == "output":
                self.graph.output(self.output(node.args[0]))
            else:
                self.env[node] = self.rewrite(node)
        self.graph.eliminate_dead_code()    # global chains whose values are now read
        edit = fx.GraphModule(self.gm, self.graph)
        edit.meta.update(self.gm.meta)
        edit.meta[SPARSE_MODES] = self.modes
        return edit

    def output(self, value: fx.Node) -> fx.Node:
        domain = _domain(value)
        if not domain.positional:
            # Restricting the output to the region is what keeps the background the
            # recording's whatever the analysis could not follow; without positions, refuse.
            raise FiseditError(
                f"the U-Net output {list(_shape(value))} does not show its positions (expected "
                "[batch, channels, H, W] at a size of the sample's), so an edit could not keep "
                "the background; run this model densely")
        return self.emit(ops.scatter_full, self.env[value], self.read(value), self.level(domain),
                         domain.dims)

    def rewrite(self, node: fx.Node) -> fx.Node:
        domain = _domain(node)
        if domain.kind == "global":
            self.modes[node.name] = "global"
            if _timestep_only(node) and any(_domain(user).kind != "global"
                                            for user in node.users):
                # An edit step runs at the recorded timestep (the engine checks it), so this
                # value is the recorded one: read it rather than recompute the time
                # embedding chain in every sparse step (~50 kernels per SD1.5 step).
                return self.read(node)
            return self.graph.node_copy(node, lambda n: self.env[n])
        if domain.positional and not node.meta.get(META_BY_SHAPE):
            spec = registry.spec_of(node)
            result = spec.sparse(self, node) if spec and spec.sparse else None
            if result is not None:
                self.modes.setdefault(node.name, "sparse")
                return result
        self.modes[node.name] = "dense"
        self.dense_nodes.append(node)
        return self.dense(node)

    def dense(self, node: fx.Node) -> fx.Node:
        """Run ``node`` on mixed dense inputs; gather the result back if it is positional."""
        args = fx.map_arg(node.args, self.full)
        kwargs = fx.map_arg(node.kwargs, self.full)
        new = self.graph.call_function(node.target, args, kwargs)
        new.meta[META_FROM] = node.name
        domain = _domain(node)
        if domain.positional:
            return self.emit(ops.gather_positions, new, self.level(domain), domain.dims)
        return new

    def operand(self, value, out_node: fx.Node):
        """A pointwise/cat operand in compact form (``None`` when that is not possible)."""
        if not isinstance(value, fx.Node):
            return value
        domain = _domain(value)
        if domain.positional:
            return self.env[value]
        out = _domain(out_node)
        shape, out_rank = _shape(value), len(_shape(out_node))
        offset = out_rank - len(shape)
        aligned = [d - offset for d in out.dims]
        if aligned[-1] < 0:
            return self.env[value]                  # broadcasts over trailing dims only
        if aligned[0] < 0:
            return None
        block = tuple(shape[d] for d in aligned)
        if all(size == 1 for size in block):
            collapsed = shape[:aligned[0]] + (1,) + shape[aligned[-1] + 1:]
            return self.emit(ir.reshape, self.env[value], collapsed)
        positions = out.size if len(block) == 2 else (out.size[0] * out.size[1],)
        if block == tuple(positions):
            return self.emit(ops.gather_positions, self.env[value], self.level(out),
                             tuple(aligned))
        return None


def _timestep_only(node: fx.Node) -> bool:
    return node.meta.get(ir.META_DEPENDS) == frozenset({TIMESTEP_INPUT})


def _level_of(plan, level: int):
    return plan[level]
