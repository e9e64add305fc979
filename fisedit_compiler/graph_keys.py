"""Names shared by the layers that build graphs and the layers that read them.

Every string key that one layer writes into a graph and another reads back lives here, in the
lowest layer, rather than in any one pass (docs/design.md, "Stages"). Node-level keys of the
canonical graph (op, domain, MACs, ...) are in ``ir``; this module holds the rest.

An edit graph takes the U-Net's inputs plus two extra placeholders: the mask plan and one
step's recorded values (and a third, the values computed once per edit pass, when it has any). ``passes.sparsify`` creates those placeholders, later passes read
them, and the engine passes them in by name (``engine.engine``, ``engine.cuda_graph``).

Passes never tag their *input* graph: what a pass finds is part of the graph it returns (its
``meta``, or the meta of the nodes it created), so one analyzed canonical graph can serve
several configs without a copy.
"""

# -- placeholders of the edit and record graphs ---------------------------------------------
PLAN_INPUT = "fc_plan"     # the edit graph's MaskPlan placeholder
CACHE_INPUT = "fc_cache"   # the edit/record graph's placeholder for one step's recorded values
PASS_VALUES_INPUT = "fc_pass_values"  # the edit graph's placeholder for its pass constants'
                                      # values (passes.hoist_pass_constants), when it has any

# -- graph-level keys (``gm.meta``) ---------------------------------------------------------
INPUTS = "fc_inputs"                    # capture: the user input names, in placeholder order
INPUT_POSITIONS = "fc_input_positions"  # capture: each tensor input's position in the call
UNKNOWN_OPS = "fc_unknown_ops"          # canonicalize: {ATen op name: count} outside ``ir``
LEVELS = "fc_levels"                    # analyze: (H, W) of each spatial level, largest first
SPARSE_MODES = "fc_sparse_modes"        # sparsify, on the edit graph: {canonical node name:
                                        # "sparse" | "dense" | "global" | "input"}
CHANNELS_LAST_KEYS = "fc_channels_last_cache_keys"  # lower_kernels: cache keys stored
                                                    # channels-last for the conv kernel
IN_PLACE_KEYS = "fc_in_place_cache_keys"  # lower_kernels: cache keys read only by kernels
                                          # that take a recorded shift (kernels.recorded_shift)
SHIFTED_KEYS = "fc_shifted_cache_keys"    # lower_kernels: cache keys some kernel reads at the
                                          # recorded shift (also read otherwise: not in place)

# -- attributes of the edit graph module -----------------------------------------------------
DERIVED_WEIGHTS = "fc_derived_weights"  # the program's execution.derived_weights.DerivedWeights
                                        # (passes.pattern.derived_weights)
PASS_CONSTANTS = "fc_pass_constants"    # the graph computing the edit graph's pass constants
                                        # (passes.hoist_pass_constants), when it has any

# -- node-level keys of the edit graph, set on the nodes a pass creates ---------------------
META_FROM = "fc_from"                   # the canonical node an edit node was made from
META_CACHE_KIND = "fc_cache_kind"       # on cache_read nodes: "value" or an OpSpec.records kind
META_CACHE_SOURCE = "fc_cache_source"   # on cache_read nodes: the canonical node recorded
