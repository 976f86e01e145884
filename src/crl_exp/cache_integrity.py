"""Manifests (size + SHA-256 per file) that let a cache folder prove it is complete and undamaged.

A cache entry is written to ``<name>.tmp``, its manifest written last, then renamed into place: a folder
without a valid manifest is an interrupted or corrupted write and gets rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

MANIFEST = "crl_manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, **extra: Any) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files, **extra}, indent=1))


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def verify_manifest(folder: Path) -> str | None:
    """None if ``folder`` is a complete, undamaged cache entry; else a short reason."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "not cached yet" if not folder.exists() else "incomplete (no manifest)"
    try:
        files = read_manifest(folder)["files"]
    except (ValueError, KeyError) as exc:
        return f"manifest unreadable ({exc})"
    for fname, meta in files.items():
        p = folder / fname
        if not p.is_file():
            return f"missing file {fname}"
        if p.stat().st_size != meta["size"]:
            return f"{fname} has the wrong size"
        if sha256_file(p) != meta["sha256"]:
            return f"{fname} fails its checksum"
    return None


def staging_dir(target: Path) -> Path:
    """A fresh sibling folder to build a cache entry in before ``commit``."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, target: Path, **extra: Any) -> None:
    write_manifest(tmp, **extra)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
