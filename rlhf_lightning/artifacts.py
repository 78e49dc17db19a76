"""Artifacts of each stage, written atomically and identified by a content hash.

`artifacts/<task>/<stage>` is a symbolic link to a hidden, fully written version folder; a new
version is written beside it and the link is swapped with one `os.replace`. A run killed while
saving leaves only a stray hidden folder: the previous artifact stays intact and loadable.

While it writes, a saver holds an exclusive `flock` on `.<stage>-<version>.lock` beside its folder;
the kernel drops the lock when the process dies, however it dies. After each successful save,
`remove_stale_versions` deletes the hidden folders nobody holds a lock on (strays of killed runs,
older versions orphaned by a kill between the swap and their removal), never one being written
by a concurrent run (sweep jobs share `artifacts/<task>/<stage>`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from rlhf_lightning.errors import ArtifactError

MANIFEST = "rlhf_artifact.json"


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty folder to write into; on success it becomes `target` in one atomic step."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    version = (
        target.parent / f".{target.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    )
    with _writing(version):  # locked before the folder exists, so no cleaner takes it for a stray
        version.mkdir()
        try:
            yield version
        except BaseException:
            shutil.rmtree(version, ignore_errors=True)
            raise
        _swap_in(version, target)
    remove_stale_versions(target)


def remove_stale_versions(target: Path) -> list[Path]:
    """Delete hidden version folders of `target` that are neither live nor being written."""
    target = Path(target)
    live = target.resolve() if target.is_symlink() else None
    pattern = re.compile(rf"\.{re.escape(target.name)}-(\d{{8}}-\d{{6}}-|replaced-)[0-9a-f]{{8}}")
    removed = []
    for path in sorted(target.parent.glob(f".{target.name}-*")):
        if not pattern.fullmatch(path.name) or path.is_symlink() or path.resolve() == live:
            continue
        if path.is_dir() and not _locked(_lock_path(path)):
            shutil.rmtree(path, ignore_errors=True)
            _lock_path(path).unlink(missing_ok=True)
            removed.append(path)
    for lock in target.parent.glob(f".{target.name}-*.lock"):  # a saver killed before mkdir
        folder = lock.with_name(lock.name[: -len(".lock")])
        if not folder.exists() and not _locked(lock):
            lock.unlink(missing_ok=True)
    return removed


def _lock_path(version: Path) -> Path:
    return version.with_name(version.name + ".lock")


@contextlib.contextmanager
def _writing(version: Path) -> Iterator[None]:
    """Hold an exclusive lock on `version`'s lock file while the block runs."""
    import fcntl

    lock = _lock_path(version)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


def _locked(lock: Path) -> bool:
    """Whether a live process holds `lock` (False when it does not exist)."""
    import fcntl

    try:
        handle = open(lock)  # noqa: SIM115 (closed below; a `with` would hide the early return)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        handle.close()
    return False


def _swap_in(version: Path, target: Path) -> None:
    previous = target.resolve() if target.is_symlink() else None
    if target.exists() and not target.is_symlink():  # a real folder (made by hand): move it aside
        aside = target.parent / f".{target.name}-replaced-{uuid.uuid4().hex[:8]}"
        target.rename(aside)
        previous = aside
    link = target.parent / f".{target.name}.link-{uuid.uuid4().hex[:8]}"
    link.symlink_to(version.name)
    os.replace(link, target)
    if previous is not None and previous != version.resolve():
        shutil.rmtree(previous, ignore_errors=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(directory: Path) -> str:
    """SHA-256 over the weight files of a saved model: the identity later stages record."""
    directory = Path(directory)
    weights = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not weights:
        raise ArtifactError(f"'{directory}' holds no model weights (*.safetensors)")
    digest = hashlib.sha256()
    for path in weights:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def save_model_artifact(model, tokenizer, target: Path, manifest: dict) -> str:
    """Save an HF model + tokenizer (safetensors) atomically to `target`; return its hash."""
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        digest = content_hash(tmp)
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "sha256": digest}, indent=2))
    return digest


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def require_artifact(directory: Path, what: str, command: str) -> Path:
    """Fail with one line naming the missing artifact and the command that makes it."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise ArtifactError(
            f"missing {what} artifact at '{directory}': run `{command}` first to make it"
        )
    return directory
