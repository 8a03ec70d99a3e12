"""The engine a command's options ask for: checked cheaply before anything is written, opened only when needed."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import typer

from ..engines.base import Engine


def check_device(device: str | None) -> None:
    """``S1KitError`` unless ``device`` (``--device``) is one this torch can run on here: ``cpu``, or a GPU it sees."""
    if device is None:
        return
    import torch

    from ..errors import S1KitError

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise S1KitError(f"--device {device}: not a device (use cpu, cuda or cuda:N)") from None
    if d.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise S1KitError(f"--device {device}: no CUDA GPU is visible to torch {torch.__version__} ({build}); "
                             "use --device cpu")
        if d.index is not None and d.index >= count:
            raise S1KitError(f"--device {device}: no CUDA GPU {d.index} here (torch sees {count}: cuda:0 to "
                             f"cuda:{count - 1})")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise S1KitError(f"--device {device}: no Apple GPU (MPS) is visible to torch; use --device cpu")
    elif d.type != "cpu":
        raise S1KitError(f"--device {device}: not a device s1kit runs on (use cpu, cuda or cuda:N)")


def auto_engine(model: str, device: str | None, dtype: str | None) -> tuple[str, str]:
    """``--engine auto`` (chat): llama.cpp for a GGUF model (a bundled name or a .gguf file) on the CPU with no
    ``--dtype`` when llama-cpp-python is installed (one chat is batch 1: 5x the hf engine here), else hf; with why."""
    import importlib.util

    from ..models import BUNDLED

    gguf = model.endswith(".gguf") or model in BUNDLED
    if not gguf:
        return "hf", "not a GGUF model"
    if dtype is not None or device not in (None, "cpu"):
        return "hf", "--dtype or --device asks for transformers"
    if device is None:
        import torch

        if torch.cuda.is_available():
            return "hf", "a GPU is visible"
    if importlib.util.find_spec("llama_cpp") is None:
        return "hf", "llama-cpp-python is not installed (pip install 's1kit[cpu]')"
    return "llamacpp", "a GGUF model on the CPU"


@dataclass(frozen=True)
class EngineChoice:
    """``--engine hf`` or ``llamacpp`` (in this process) or ``--engine remote --base-url URL``, with the options of
    each."""

    model: str
    kind: str = "hf"
    base_url: str | None = None
    tokenizer: str | None = None
    concurrency: int = 8
    api_key: str | None = None
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 16
    plugin: bool | None = None  # remote: s1kit's vLLM processor required (True), never used (False), or probed

    def check(self) -> None:
        """Fail now on options that do not go together, or a model or precision that cannot load (nothing is
        loaded, converted or connected to)."""
        self.check_options()
        self.check_model()

    def check_options(self) -> None:
        """Fail now on options that do not go together, or a precision that is not one."""
        from ..api import check_engine
        from ..models import torch_dtype

        check_engine(self.kind, self.base_url, **({} if self.tokenizer is None else {"tokenizer": self.tokenizer}))
        if self.kind != "remote" and self.plugin is not None:
            raise ValueError("--vllm-plugin is only used with --engine remote")
        if self.kind == "llamacpp" and self.device not in (None, "cpu"):
            raise ValueError(f"--engine llamacpp runs on the CPU: --device {self.device} is not for it")
        if self.kind == "llamacpp" and self.dtype is not None:
            raise ValueError("--dtype is only used with --engine hf (llama.cpp computes in the GGUF's own types)")
        if self.kind == "hf":
            check_device(self.device)
        if self.kind == "hf" and self.dtype is not None:
            torch_dtype(self.dtype)

    def check_model(self) -> None:
        """Fail now on a model reference that cannot load (an in-process engine's; a server knows its own)."""
        from ..models import check_reference

        if self.kind == "hf" and self.model:
            check_reference(self.model)
        if self.kind == "llamacpp" and self.model:
            from ..models import check_gguf

            check_gguf(self.model)

    def precision(self) -> str | None:
        """The dtype the model computes in (what a run records): the one asked for, else the device's default."""
        from ..models import default_dtype

        return None if self.kind != "hf" else self.dtype or default_dtype(self.device)

    def open(self, **overrides: Any) -> Engine:
        """Load or connect; a remote server's warnings (e.g. text-only prompts) become ``warning:`` lines."""
        from ..api import make_engine

        self.check_options()
        extra = {} if self.tokenizer is None else {"tokenizer": self.tokenizer}  # refused by an in-process engine
        if self.kind != "remote":
            options = {"device": self.device, "dtype": self.dtype, "batch_size": self.batch_size, **overrides}
            return make_engine(self.model, self.kind, self.base_url, **options, **extra)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = make_engine(self.model, "remote", self.base_url, concurrency=self.concurrency,
                                 api_key=self.api_key, plugin=self.plugin, **{**extra, **overrides})
        for w in caught:
            typer.echo(f"warning: {w.message}", err=True)
        return engine
