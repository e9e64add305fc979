"""Layer 5, engine: record, edit and dense steps of compiled programs.

``engine`` (SparseEngine), ``edit_cache`` (the recorded values per step), ``cuda_graph``
(captured edit steps), ``cost_model`` (measured dense thresholds) and ``timing``. Imports the
layers below; tests/test_layers.py checks the layer order.
"""
