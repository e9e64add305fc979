"""Layer 2, execution: what an edit graph calls at run time.

The mask plan (``plan``), the torch reference sparse ops (``sparse_ops``), the Triton kernels
(``kernels``) and their launchers (``triton_ops``). Imports only the core modules (``errors``,
``config``, ``ir``, ``graph_keys``); tests/test_layers.py checks the layer order.
"""
