"""The ``app`` subcommand: serve the editor page on 127.0.0.1 (registered by cli.py)."""

from __future__ import annotations

import os
import socket

from .. import zoo
from ..checks import check_int
from ..edit_flow.commands import (DEMO_MODEL, RANDOM_DEFAULTS, RANDOM_EDIT, RANDOM_PROMPT,
                                  SHAPES_DEFAULTS, add_scheduler_option, check_saved_pipeline_class,
                                  check_saved_scheduler, load_with_scheduler, read_saved_config,
                                  torch_device)
from ..errors import FiseditError

DEFAULT_PORT = 7860
DEFAULT_BUDGET_MIB = 4096
# A saved pipeline is a real model: the usual Stable Diffusion settings.
SAVED_DEFAULTS = dict(steps=50, guidance_scale=7.5, size=None)


def add_app_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "app", help="serve an interactive editor in the browser (needs the [app] extra)",
        description="Serve a local Gradio page on http://127.0.0.1:PORT: generate an image, "
                    "edit its prompt or paint a mask, see the edit beside the original with "
                    "its time against a dense regeneration, accept it and keep editing. Each "
                    "browser tab has its own session. Offline; the shipped 'shapes' model runs "
                    "on a CPU.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=DEMO_MODEL,
                        help="'shapes' (default: the trained model shipped with the package) or "
                             "a zoo pipeline name (random weights, e.g. sd15-tiny)")
    source.add_argument("--pipeline", metavar="DIR",
                        help="a folder holding a StableDiffusion(XL)Pipeline saved with "
                             "save_pretrained")
    add_scheduler_option(parser)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port on 127.0.0.1 (default: {DEFAULT_PORT})")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--memory-budget-mib", type=int, default=DEFAULT_BUDGET_MIB,
                        help="memory for the recordings of all open tabs; beyond it the least "
                             f"recently used tab's is dropped (default: {DEFAULT_BUDGET_MIB})")
    parser.set_defaults(run=run_app)


def run_app(args) -> int:
    # The numbers first: importing gradio and loading the model take seconds. Port 0 (any
    # free port) is refused: the page's address, printed below, would then be unknown.
    check_int("--port", args.port, minimum=1, maximum=65535)
    _check_port_free(args.port)
    if args.memory_budget_mib <= 0:
        raise FiseditError(f"--memory-budget-mib must be positive, got {args.memory_budget_mib}")
    device = torch_device(args.device)
    if args.pipeline is not None:
        check_saved_pipeline_class(args.pipeline)
        check_saved_scheduler(args.pipeline, read_saved_config(args.pipeline, "scheduler",
                                                               "scheduler_config.json"),
                              args.scheduler)
    else:
        if args.scheduler is not None:
            raise FiseditError("--scheduler replaces a saved pipeline's scheduler (--pipeline); "
                               f"the {args.model!r} model runs with its own: leave --scheduler "
                               "out")
        zoo.check_pipeline_name(args.model)
    # Before gradio is imported: no analytics or version checks, which would wait on the
    # network offline.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401  (only to report a missing extra clearly)
    except ImportError:
        raise FiseditError('the app needs gradio: pip install -e ".[app]"') from None
    from .page import build_page
    from .pool import SessionPool

    if args.pipeline is not None:
        pipe = load_with_scheduler(args.pipeline, args.scheduler)
        defaults = _page_defaults(args.pipeline, None)
    else:
        pipe, defaults = zoo.pipeline(args.model), _page_defaults(args.model, args.model)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pool = SessionPool(pipe, budget_bytes=args.memory_budget_mib * 2**20)
    page = build_page(pool, defaults)
    print(f"serving the {defaults.model} editor on http://127.0.0.1:{args.port} ({device}); "
          "Ctrl-C stops it")
    page.queue(default_concurrency_limit=None)   # the pool's device lock serialises the work
    page.launch(server_name="127.0.0.1", server_port=args.port, ssr_mode=False,
                footer_links=[], quiet=True)
    return 0


def _check_port_free(port: int) -> None:
    """Refuse a port something already listens on (a second app on the default port) before
    the model loads, rather than failing in gradio's launch after it. (Another program may
    still take the port in between: gradio then reports it.)"""
    with socket.socket() as probe:
        # As the server binds (uvicorn sets it): a port left in TIME_WAIT by an app just
        # stopped is free to it, one a server listens on is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise FiseditError(
                f"--port {port} cannot be used on 127.0.0.1 ({error.strerror or error}): is "
                f"another app serving there? Stop it, or pass another --port, e.g. "
                f"--port {port + 1 if port < 65535 else port - 1}") from None


def _page_defaults(source: str, model: str | None):
    from .page import PageDefaults

    if model == DEMO_MODEL:
        from .. import shapes

        return PageDefaults(shapes.DEMO_PROMPT, shapes.DEMO_EDIT, model=model,
                            check_prompt=shapes.check_caption, **SHAPES_DEFAULTS)
    settings = RANDOM_DEFAULTS if model is not None else SAVED_DEFAULTS
    return PageDefaults(RANDOM_PROMPT, RANDOM_EDIT, model=source, **settings)
