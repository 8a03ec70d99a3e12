"""``s1kit serve``: an OpenAI-compatible server with per-request thinking budgets over the engine core
(continuous batching: a request joins the sequences already decoding at the next step)."""

from typing import Optional

import typer

from ..errors import S1KitError
from . import options as opt
from .app import command, require_extra
from .engine import EngineChoice


@command(epilog="Example: s1kit serve --model smollm2-135m --port 8000   then   curl "
                "http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
                "-d '{\"model\": \"smollm2-135m\", \"messages\": "
                "[{\"role\": \"user\", \"content\": \"What is 17*23?\"}], \"thinking_budget\": "
                "{\"min_tokens\": 24, \"max_tokens\": 64}}'")
def serve(
    model: opt.Model = "smollm2-135m",
    engine_kind: opt.EngineKind = "hf",
    base_url: opt.BaseUrl = None,
    tokenizer: opt.RemoteTokenizer = None,
    upstream_api_key: Optional[str] = typer.Option(None, envvar="S1KIT_UPSTREAM_API_KEY",
                                                   help="Bearer token of the --engine remote server."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; anything but loopback exposes the model."),
    port: int = typer.Option(8000, help="TCP port."),
    max_batch_size: int = typer.Option(16, help="Sequences decoded together; a request arriving when all are "
                                                "taken gets the first place that frees up."),
    max_model_len: Optional[int] = typer.Option(None, help="Longest prompt + generation the GPU fast path holds per "
                                                           "sequence (its cache length); longer requests get a 400. "
                                                           "[default: the model's context]"),
    api_key: Optional[str] = typer.Option(None, envvar="S1KIT_SERVE_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1/*."),
    served_model_name: Optional[str] = typer.Option(None, help="Model name clients send. [default: --model]"),
    format: opt.Format = opt.FORMAT,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    vllm_plugin: opt.VllmPlugin = "auto",
    default_thinking_budget: Optional[int] = typer.Option(
        None, help="Thinking cap (tokens) of requests that name no thinking budget (thinking_budget, "
                   "thinking_token_budget or reasoning_effort). [default: no cap; the context window bounds thinking]"),
    drain_timeout: float = typer.Option(30.0, help="On SIGTERM or Ctrl-C: seconds the requests in flight get to "
                                                   "finish; then each still running ends with a 503 error (in its "
                                                   "stream, as the last event). New requests are refused at once."),
) -> None:
    """Serve an OpenAI-compatible API (chat and text completions) with per-request thinking budgets."""
    import socket

    if not 1 <= port <= 65535:
        raise S1KitError(f"--port must be in 1..65535, got {port}")
    if max_batch_size < 1:
        raise S1KitError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    if max_model_len is not None and max_model_len < 64:
        raise S1KitError(f"--max-model-len must be >= 64, got {max_model_len}")
    if api_key is not None and not api_key.strip():
        raise S1KitError("--api-key must not be empty")
    if default_thinking_budget is not None and default_thinking_budget < 0:
        raise S1KitError(f"--default-thinking-budget must be >= 0, got {default_thinking_budget}")
    if not drain_timeout >= 0:
        raise S1KitError(f"--drain-timeout must be >= 0, got {drain_timeout}")
    asked = opt.format_choice(format)
    choice = EngineChoice(model, engine_kind, base_url, tokenizer, api_key=upstream_api_key, device=device,
                          dtype=dtype, batch_size=max_batch_size, plugin=opt.plugin_choice(vllm_plugin))
    choice.check_options()
    require_extra("serve", "fastapi", "uvicorn", "prometheus_client")
    try:  # fail now, not after loading the model
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise S1KitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    if engine_kind != "hf" and max_model_len is not None:
        raise S1KitError("--max-model-len is only used with --engine hf (a remote server has its own)")
    engine = choice.open(**({"max_model_len": max_model_len} if engine_kind == "hf" else {}))
    fmt = opt.model_format(asked, engine.tokenizer)
    if engine_kind == "hf":
        engine.warm_up()  # one cache length; compile and capture before the first request, not during it
    from ..serve.app import create_app, make_server

    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use the model", err=True)
    name = served_model_name or model
    opt.say_format(engine.tokenizer, fmt, asked)
    thinking = "no default thinking cap" if default_thinking_budget is None else \
        f"default thinking cap {default_thinking_budget}"
    typer.echo(f"serving {name!r} at http://{host}:{port}/v1 (max batch {max_batch_size}, {thinking})", err=True)
    app = create_app(engine, name, api_key=api_key, format=fmt, default_thinking_budget=default_thinking_budget)
    make_server(app, host, port, drain_timeout).run()
