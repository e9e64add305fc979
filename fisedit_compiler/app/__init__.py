"""The browser editor: ``fisedit-compiler app`` (needs the ``[app]`` extra, i.e. gradio).

``pool`` holds the per-tab editing state over EditSession (no gradio), ``page`` the gradio
page over the pool, ``command`` the CLI subcommand. Importing this package imports no gradio.
"""
