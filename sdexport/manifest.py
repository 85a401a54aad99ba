"""Hashing, atomic writes and the export manifest.

Every artifact is written under a temporary name in its final directory and
renamed into place, so a crash or Ctrl-C never leaves a half-written file under
the final name, and the previous artifact stays intact until the new one is whole.
``OUT/manifest.json`` lists every artifact with its sha256 and provenance.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import IntegrityError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: list[Path], root: Path) -> str:
    """One digest over several files: their paths relative to ``root`` and contents."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` on success.

    On any exception the temporary file is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; swap it in on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact, for provenance."""
    from importlib import metadata

    from . import __version__

    found = {"sdexport": __version__, "python": platform.python_version()}
    for dist in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu",
                 "nvidia-modelopt", "polygraphy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[dist] = metadata.version(dist)
    return found


class Manifest:
    """``OUT/manifest.json``: one entry per artifact, keyed by a stable name."""

    def __init__(self, root: str | os.PathLike, data: dict[str, Any] | None = None):
        self.root = Path(root)
        self.data = data or {"manifest_version": MANIFEST_VERSION, "components": {}, "engines": {}}

    @classmethod
    def load(cls, root: str | os.PathLike) -> "Manifest":
        root = Path(root)
        path = root / MANIFEST_NAME
        if not path.is_file():
            raise IntegrityError(f"{root}: no {MANIFEST_NAME}; run 'sdexport export MODEL -o {root}' first")
        try:
            data = read_json(path)
        except json.JSONDecodeError as exc:
            raise IntegrityError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls(root, data)

    @classmethod
    def load_or_new(cls, root: str | os.PathLike) -> "Manifest":
        path = Path(root) / MANIFEST_NAME
        return cls.load(root) if path.is_file() else cls(root)

    def save(self) -> None:
        write_json(self.root / MANIFEST_NAME, self.data)

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        return self.data.setdefault("components", {})

    @property
    def engines(self) -> dict[str, dict[str, Any]]:
        return self.data.setdefault("engines", {})

    def component(self, name: str) -> dict[str, Any]:
        if name not in self.components:
            have = ", ".join(sorted(self.components)) or "none"
            raise IntegrityError(f"{self.root}: component '{name}' was not exported (have: {have})")
        return self.components[name]

    def verified_path(self, entry: dict[str, Any], remedy: str = "re-export it") -> Path:
        """The artifact's path, after checking that its bytes match the recorded sha256.

        ``remedy`` ends the error message: what the user runs to get a good file again.
        """
        path = self.root / entry["file"]
        if not path.is_file():
            raise IntegrityError(f"{path}: listed in {MANIFEST_NAME} but missing; {remedy}")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise IntegrityError(
                f"{path}: sha256 {actual[:12]}… does not match the manifest ({entry['sha256'][:12]}…): "
                f"changed, truncated or corrupt; {remedy}")
        for extra in entry.get("external_data", []):
            data_path = self.root / extra["file"]
            if not data_path.is_file() or sha256_file(data_path) != extra["sha256"]:
                raise IntegrityError(f"{data_path}: external data missing or does not match the manifest; {remedy}")
        return path

    def intact(self, entry: dict[str, Any]) -> bool:
        """Whether the artifact of ``entry`` is present and matches its recorded sha256 (for up-to-date skips)."""
        try:
            self.verified_path(entry)
            return True
        except IntegrityError:
            return False
