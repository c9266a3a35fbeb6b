"""Small shared helpers: atomic writes, hashing, environment facts."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save


def warning(name: str, line: str, *args: Any) -> None:
    """Log one warning line on logger ``name``, even after a library's ``logging.config`` call
    (alembic, run by mlflow's SQL store, disables every logger that existed before it)."""
    log = logging.getLogger(name)
    log.disabled = False
    log.warning(line, *args)


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, so that no other thread sees it changed)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give a file or folder made by ``tempfile`` (0600 / 0700) the mode a plain ``open`` / ``mkdir``
    would have given it under the user's umask (0644 / 0755 under umask 022)."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~current_umask())


def honour_umask_tree(root: str | os.PathLike) -> None:
    """:func:`honour_umask` for ``root`` and everything under it (executable bits kept): libraries write
    0600 files too (safetensors 0.8's ``save_file`` does, whatever the umask)."""
    mask = current_umask()
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, (0o777 if mode & 0o111 else 0o666) & ~mask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, parents: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (readers never see half a file);
    the file gets the mode of the user's umask, as a plain ``open`` would give it. ``parents``: make
    the missing folders (else a missing folder is a FileNotFoundError)."""
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, parents: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), parents)


def atomic_write_json(path: str | os.PathLike, obj: Any, parents: bool = True) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically, as :func:`atomic_write_bytes`."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", parents)


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None
                        ) -> None:
    """A safetensors file written through :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Publish a folder written completely under ``tmp`` as ``target`` (replacing an older one), its
    folders and files with the modes of the user's umask (a ``tempfile.mkdtemp`` folder is 0700, a
    safetensors file 0600)."""
    target = Path(target)
    honour_umask_tree(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def link_dir(path: str | os.PathLike, target: str) -> str:
    """Make ``path`` name its sibling folder ``target``: a relative symlink (replacing what was at
    ``path``, atomically), or, where the filesystem refuses symlinks, a small pointer file holding the
    name (read back by :func:`follow_link`). Returns ``"symlink"`` or ``"pointer"``."""
    path = Path(path)
    if os.sep in target or target in ("", ".", ".."):
        raise ValueError(f"link_dir: {target!r} is not a sibling folder name")
    tmp = path.with_name(f".{path.name}.link-tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)  # a copied folder of an older layout
    try:
        os.symlink(target, tmp, target_is_directory=True)
    except OSError:
        if path.is_symlink():
            path.unlink()
        atomic_write_text(path, target + "\n")
        return "pointer"
    os.replace(tmp, path)
    return "symlink"


def follow_link(path: str | os.PathLike) -> Path | None:
    """The folder ``path`` stands for: the folder a symlink points to, ``path`` itself (a folder), or the
    sibling folder a pointer file of :func:`link_dir` names; None when there is none."""
    path = Path(path)
    if path.is_symlink():
        target = path.parent / os.readlink(path)
        return target if target.is_dir() else None
    if path.is_dir():
        return path
    if path.is_file() and path.stat().st_size < 256:
        name = path.read_text(encoding="utf-8", errors="replace").strip()
        target = path.parent / name
        if name and os.sep not in name and name not in (".", "..") and target.is_dir():
            return target
    return None


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def text_digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The current git commit of ``cwd`` (with ``-dirty`` if modified), or None outside git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("deltakd", "torch", "transformers", "peft", "accelerate", "datasets",
                 "sentence-transformers", "tokenizers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def cache_root() -> Path:
    """Where deltakd caches tokenised data and teacher outputs (``DELTAKD_CACHE`` overrides)."""
    env = os.environ.get("DELTAKD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "deltakd"


def cpu_only() -> bool:
    """True when no accelerator is present: the Trainer then runs (and distributes) on the CPU."""
    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available())
                or (hasattr(torch, "xpu") and torch.xpu.is_available()))


def native_bf16() -> tuple[bool, str]:
    """(does the device the Trainer will use compute bf16 natively, the device in words).

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and later). CPU: AVX512-BF16 or AMX-BF16
    (``torch.cpu.get_capabilities()``, else the ``/proc/cpuinfo`` flags); without them bf16 autocast
    is emulated and runs several times slower than fp32. Other accelerators are taken as native.
    """
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported()), f"GPU {torch.cuda.get_device_name()}"
    if not cpu_only():
        return True, "accelerator"
    caps: dict[str, Any] = {}
    try:
        caps = dict(torch.cpu.get_capabilities())
    except (AttributeError, RuntimeError):
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
            caps = {f: True for f in ("avx512_bf16", "amx_bf16") if f in flags}
        except OSError:
            pass
    name = caps.get("cpu_name") or "CPU"
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16")), f"CPU {name}"


def cached_dir(root: Path, key: str, build: Callable[[Path], None], ready: str) -> Path:
    """``root/key``, built once by ``build(tmp_dir)`` and published by an atomic rename.

    ``ready`` names a file whose presence marks a complete entry; readers of a complete entry take
    no lock. Builders of the same key take turns on ``<root's parent>/.locks/<root name>-<key>.lock``
    (``flock``, dropped by the OS if a builder dies; kept out of ``root`` so that it holds entries
    only): the first builds, the others wait and then read its entry. A folder without ``ready``
    (left by something other than this function) is replaced.
    """
    path = Path(root) / key
    if (path / ready).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    locks = path.parent.parent / ".locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{path.parent.name}-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (path / ready).is_file():  # built by the builder we waited for
            return path
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
        try:
            build(tmp)
            honour_umask_tree(tmp)
            if path.exists():
                stale = Path(tempfile.mkdtemp(dir=path.parent, prefix=".stale-"))
                os.replace(path, stale / key)
                shutil.rmtree(stale, ignore_errors=True)
            tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
