"""Names shared by the layers that build edit graphs and the layers that run them.

An edit graph takes the U-Net's inputs plus two extra placeholders: the mask plan and one
step's recorded values. ``passes.sparsify`` creates those placeholders, later passes read
them, and the engine passes them in by name (``engine.engine``, ``engine.cuda_graph``), so
their names live here, in the lowest layer, rather than in any one pass.
"""

PLAN_INPUT = "fc_plan"     # the edit graph's MaskPlan placeholder
CACHE_INPUT = "fc_cache"   # the edit graph's placeholder for one step's recorded values
