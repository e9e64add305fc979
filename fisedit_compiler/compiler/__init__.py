"""Layer 4, compiler: capture a U-Net and run the passes, producing a Program.

``capture`` (frontends: a diffusers U-Net to an ATen fx graph), ``pipeline`` (the front
passes, then the sparse passes: ``Program`` and ``build_program``) and ``oracle`` (the
reference semantics of an edit, computed densely on a program's canonical graph). Imports the
core modules, ``execution`` and ``passes``; tests/test_layers.py checks the layer order.
"""
