"""``s1kit bench``: decode speed of the fast path against the memory-bandwidth floor (BENCHMARKS.md)."""

from pathlib import Path
from typing import Optional

import typer

from ..errors import S1KitError
from . import options as opt
from .app import command


@command(epilog="Example: s1kit bench --arch qwen2.5-1.5b --batch 1,32,128 --new-tokens 512 --compare-hf-generate "
                "--json benchmarks/results/h100.json")
def bench(
    arch: Optional[str] = typer.Option(None, help="Random-weight architecture: smollm2-135m, qwen2.5-0.5b, "
                                                 "qwen2.5-1.5b, qwen2.5-3b, qwen2.5-7b. [default: qwen2.5-1.5b]"),
    model: Optional[str] = typer.Option(None, help="A real model instead (bundled name, dir, HF id)."),
    batch: opt.Grid = typer.Option("1,32,128", parser=opt.parse_grid, metavar="N[,N...]",
                                   help="Comma-separated batch sizes."),
    prompt_len: int = typer.Option(128, help="Prompt tokens per row."),
    new_tokens: int = typer.Option(512, help="Thinking tokens decoded per row."),
    forcing: str = typer.Option("on,off", help="Budget forcing: on, off, or on,off."),
    compare_hf_generate: bool = typer.Option(False, help="Also time model.generate (dynamic and static cache)."),
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results here."),
) -> None:
    """Decode speed of the fast path: ms/step and tokens/s against the memory-bandwidth floor."""
    from rich.console import Console
    from rich.table import Table

    from ..bench import run_bench, write_json

    if arch and model:
        raise S1KitError("give --arch or --model, not both")
    batches = [b for b in batch if b]
    if not batches or any(b < 0 for b in batches):
        raise S1KitError("--batch needs sizes >= 1")
    modes = {"on": [True], "off": [False], "on,off": [True, False], "off,on": [False, True]}.get(forcing)
    if modes is None:
        raise S1KitError(f"--forcing: expected on, off or on,off, got {forcing!r}")
    if prompt_len < 1 or new_tokens < 1:
        raise S1KitError("--prompt-len and --new-tokens must be >= 1")
    results = run_bench(arch, model, batches, prompt_len, new_tokens, modes, compare_hf_generate, device, dtype,
                        log=lambda r: typer.echo(f"batch {r.batch} forcing {'on' if r.forcing else 'off'}: "
                                                 f"{r.ms_per_step:.2f} ms/step", err=True))
    table = Table("arch", "batch", "forcing", "ms/step", "tok/s", "floor ms", "× floor", "generate dyn", "generate static",
                  title=f"decode on {results[0].device} ({results[0].dtype}), prompt {prompt_len}, {new_tokens} new")
    fmt = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    for r in results:
        table.add_row(r.arch, str(r.batch), "on" if r.forcing else "off", f"{r.ms_per_step:.2f}", f"{r.tokens_per_s:.0f}",
                      f"{r.floor_ms:.2f}", f"{r.ratio_to_floor:.2f}", fmt(r.hf_generate_dynamic_ms),
                      fmt(r.hf_generate_static_ms))
    Console().print(table)
    if json_path:
        write_json(results, str(json_path))
