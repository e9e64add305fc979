"""sparsify: rewrite an analyzed canonical graph into the edit graph over compact tensors.

Why: an edit changes a small region, so every positional value (spatial or tokens) is carried
*compact*, holding only its level's active positions (see ``execution.plan``), and each op is
replaced by the sparse form that computes exactly those positions:

* conv2d -> ``sparse_conv2d`` over active output tiles, halos read from the recorded input
  (1x1 stride-1 convs -> ``pointwise_conv2d``); stride 2 maps tiles of the lower level to input
  windows of the upper one;
* upsample_nearest -> ``upsample_gather`` (the plan guarantees the sources are active);
* group_norm -> ``sparse_group_norm`` with the config's policy, from recorded statistics;
* attention -> ``sparse_attention``: active queries; self-attention K/V by policy;
* pointwise, linear, layer_norm, cat and views -> the same op on compact tensors, with
  position dimensions remapped and global operands collapsed or gathered;
* global nodes -> unchanged (text K/V), except that values depending on the timestep alone
  (the time embedding each block adds) are read from the recording where positional nodes
  use them, since an edit step runs at the recorded timestep.

Anything else positional (an unknown op, a reshape that mixes positions with channels, a
masked attention, a value the analysis placed by its shape alone, ``analyze.META_BY_SHAPE``)
runs *dense*: its inputs are rebuilt as mixed dense tensors from the recorded values, the op
runs as captured, and the result is gathered back if positional, which restricts it to the
region. That is exact against the oracle, only slower; a warning names such nodes. The output
is always restricted: a graph whose output shows no positions is refused.

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
from .analyze import META_BY_SHAPE, TIMESTEP_INPUT, Domain
from .pattern import args_of

OUTPUT_KEY = "output"


def value_key(node: fx.Node) -> str:
    return node.name


def stats_key(node: fx.Node) -> str:
    return f"{node.name}:stats"


def sparsify(gm: fx.GraphModule, config: SparseConfig) -> fx.GraphModule:
    """The edit graph of an analyzed canonical ``gm``, which is left unchanged.

    How each canonical node runs in edits ("sparse", "dense", "global" or "input") is returned
    as ``edit.meta[SPARSE_MODES]``, keyed by canonical node name.
    """
    rewriter = _Rewriter(gm, config)
    edit = rewriter.run()
    if rewriter.dense_nodes:
        names = ", ".join(sorted(rewriter.dense_nodes)[:8])
        warnings.warn(
            f"{len(rewriter.dense_nodes)} positional node(s) run dense in edits (exact but "
            f"slower), e.g. {names}; inspect with `fisedit-compiler dump --stage sparse`",
            stacklevel=2)
    return edit


def _compact_axis(domain: Domain, axis: int) -> int:
    """Where dense ``axis`` of a positional tensor lands once its positions are one dimension."""
    first, last = domain.dims[0], domain.dims[-1]
    if axis < first:
        return axis
    if axis <= last:
        return first
    return axis - (last - first)


def _domain(node) -> Domain:
    return node.meta[ir.META_DOMAIN]


def _shape(node) -> tuple[int, ...]:
    return tuple(int(s) for s in node.meta["val"].shape)


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, config: SparseConfig):
        self.gm, self.config = gm, config
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.reads: dict[str, fx.Node] = {}
        self.levels: dict[int, fx.Node] = {}
        self.dense_nodes: list[str] = []
        self.modes: dict[str, str] = {}   # canonical node name -> how it runs in edits

    # -- helpers --------------------------------------------------------------------------
    def emit(self, target, *args, source: fx.Node | None = None) -> fx.Node:
        new = self.graph.call_function(target, tuple(args))
        if source is not None:
            new.meta[META_FROM] = source.name
        return new

    def read(self, source: fx.Node, kind: str = "value") -> fx.Node:
        key = value_key(source) if kind == "value" else stats_key(source)
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
            rule = _RULES.get(ir.op_name(node))
            result = rule(self, node) if rule else None
            if result is not None:
                self.modes.setdefault(node.name, "sparse")
                return result
        self.modes[node.name] = "dense"
        self.dense_nodes.append(node.name)
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


def is_pointwise_conv(node: fx.Node) -> bool:
    """Whether a canonical conv2d is per-position: 1x1, stride 1, unpadded."""
    conv = args_of(node)
    return (_shape(conv["weight"])[-2:] == (1, 1) and tuple(conv["stride"]) == (1, 1)
            and tuple(conv["padding"]) == (0, 0, 0, 0))


def _conv(self: _Rewriter, node: fx.Node):
    x, weight, bias, stride, padding, dilation, groups = node.args
    source, target = _domain(x), _domain(node)
    if source.kind != "spatial":
        return None
    if is_pointwise_conv(node):
        return self.emit(ops.pointwise_conv2d, self.env[x], self.env[weight],
                         self.env.get(bias), source=node)
    return self.emit(ops.sparse_conv2d, self.env[x], self.read(x), self.plan, source.level,
                     target.level, self.env[weight], self.env.get(bias), stride, padding,
                     dilation, groups, source=node)


def _upsample(self: _Rewriter, node: fx.Node):
    x = node.args[0]
    if _domain(x).kind != "spatial":
        return None
    return self.emit(ops.upsample_gather, self.env[x], self.plan, _domain(x).level,
                     _domain(node).level, source=node)


def _group_norm(self: _Rewriter, node: fx.Node):
    x, groups, weight, bias, eps = node.args
    domain = _domain(x)
    if len(_shape(x)) - len(domain.dims) + 1 != 3:
        return None   # the compact input must be [B, C, P]
    return self.emit(ops.sparse_group_norm, self.env[x], self.read(node, "group_norm_stats"),
                     self.plan, domain.level, groups, self.env.get(weight), self.env.get(bias),
                     eps, self.config.group_norm, source=node)


def _attention(self: _Rewriter, node: fx.Node):
    q, k, v, mask, scale = node.args
    if mask is not None:
        return None
    is_self = node.meta.get(ir.META_ATTN_KIND) == "self"
    if is_self and not (_domain(k).positional and _domain(v).positional):
        return None
    if not is_self and (_domain(k).positional or _domain(v).positional):
        return None
    recorded_k = recorded_v = None
    if is_self and self.config.self_attention == "full":
        recorded_k, recorded_v = self.read(k), self.read(v)
    policy = self.config.self_attention if is_self else "cross"
    return self.emit(ops.sparse_attention, self.env[q], self.env[k], self.env[v], recorded_k,
                     recorded_v, self.plan, _domain(node).level, scale, policy, source=node)


def _same_op(self: _Rewriter, node: fx.Node):
    """Pointwise ops: the same op on compact operands (global operands collapsed or gathered)."""
    args = []
    for value in node.args:
        compact = self.operand(value, node)
        if compact is None:
            return None
        args.append(compact)
    return self.emit(node.target, *args, source=node)


def _per_position(self: _Rewriter, node: fx.Node):
    """linear and layer_norm act on each position's channels: same op, compact input."""
    x, *rest = node.args
    return self.emit(node.target, self.env[x], *fx.map_arg(tuple(rest), lambda n: self.env[n]),
                     source=node)


def _cat(self: _Rewriter, node: fx.Node):
    tensors, dim = node.args
    compact = [self.operand(value, node) for value in tensors]
    if any(value is None for value in compact):
        return None
    return self.emit(ir.cat, compact, _compact_axis(_domain(node), dim), source=node)


def _template(node: fx.Node) -> tuple:
    domain, shape = _domain(node), _shape(node)
    return shape[:domain.dims[0]] + (None,) + shape[domain.dims[-1] + 1:]


def _reshape(self: _Rewriter, node: fx.Node):
    x = node.args[0]
    return self.emit(ops.compact_reshape, self.env[x], _template(node), _domain(x).dims[0],
                     source=node)


def _expand(self: _Rewriter, node: fx.Node):
    x = node.args[0]
    return self.emit(ops.compact_expand, self.env[x], _template(node), _domain(x).dims[0],
                     source=node)


def _permute(self: _Rewriter, node: fx.Node):
    x, order = node.args
    source, target = _domain(x), _domain(node)
    compact_order = tuple(_compact_axis(source, order[axis]) for axis in range(len(order))
                          if not target.dims[0] < axis <= target.dims[-1])
    return self.emit(ir.permute, self.env[x], compact_order, source=node)


def _slice(self: _Rewriter, node: fx.Node):
    x, dim, start, end, step = node.args
    return self.emit(ir.slice_dim, self.env[x], _compact_axis(_domain(x), dim), start, end,
                     step, source=node)


def _split(self: _Rewriter, node: fx.Node):
    x, sizes, dim = node.args
    return self.emit(ir.split, self.env[x], sizes, _compact_axis(_domain(x), dim), source=node)


def _getitem(self: _Rewriter, node: fx.Node):
    container, index = node.args
    return self.emit(ir.OPS["getitem"], self.env[container], index, source=node)


_RULES = {
    "conv2d": _conv,
    "upsample_nearest": _upsample,
    "group_norm": _group_norm,
    "attention": _attention,
    "linear": _per_position, "layer_norm": _per_position,
    **{name: _same_op for name, kind in ir.KIND.items() if kind == "pointwise"},
    "cat": _cat,
    "reshape": _reshape, "expand": _expand, "permute": _permute,
    "slice": _slice, "split": _split, "getitem": _getitem,
}
