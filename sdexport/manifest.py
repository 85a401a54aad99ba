"""Hashing, atomic writes and the export manifest.

Every artifact is written under a temporary name in its final directory and
renamed into place, so a crash or Ctrl-C never leaves a half-written file under
the final name, and the previous artifact stays intact until the new one is whole.
``OUT/manifest.json`` lists every artifact with its sha256 and provenance.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import platform
import re
import secrets
import shutil
import stat
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from . import interrupts
from .errors import IntegrityError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def check_regular(path: str | os.PathLike, error: type = IntegrityError) -> None:
    """Refuse what is not a regular file (after following links): reading a FIFO blocks forever, and a
    link to /dev/zero or a device never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: missing{' (a dangling symbolic link)' if os.path.islink(path) else ''}") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else
                "not a regular file")
        raise error(f"{path}: is {kind}, not a regular file; refusing to read it")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22, error: type = IntegrityError) -> str:
    check_regular(path, error)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: list[Path], root: Path, error: type = IntegrityError) -> str:
    """One digest over several files: their paths relative to ``root`` and contents."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(sha256_file(path, error=error).encode())
    return digest.hexdigest()


def _temp_name(final: Path, suffix: str = "") -> Path:
    """``.NAME.PID-RANDOM.tmpSUFFIX`` beside ``final``: the PID lets a later run sweep what a killed one left."""
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TEMP_RE = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp")


def sweep_temp_files(folder: Path) -> list[Path]:
    """Remove temporary files and folders in ``folder`` left by sdexport processes that are gone
    (names written by ``atomic_path``/``atomic_dir``). Returns what was removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMP_RE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            path = folder / name
            _remove(path)
            removed.append(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` on success.

    On any exception (an interrupt included) the temporary file is removed and ``final`` is
    untouched; after SIGKILL, the next sdexport run in that folder sweeps it (its name holds the PID).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _temp_name(final, suffix)
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    try:
        yield tmp_path
        interrupts.check()
        os.replace(tmp_path, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``final`` (which must not exist or be empty); move it into
    place on success. Directories inside an export are written through ``Transaction`` instead."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    tmp.mkdir(mode=0o777)
    try:
        yield tmp
        interrupts.check()
        if final.exists():
            final.rmdir()  # only an empty directory is replaced; anything else is the caller's to refuse
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def finite_json(data: Any) -> Any:
    """``data`` with every non-finite float as null: JSON has no NaN or Infinity (an infinite error
    metric, a PSNR of identical images), and strict readers refuse them."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Strict JSON (``allow_nan=False``; non-finite numbers become null), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(finite_json(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


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


JOURNAL_NAME = ".sdexport-journal.json"
LOCK_NAME = ".sdexport.lock"
# Folders a transaction stages into and retires into, inside the export: ``.txn-<pid>-<hex>``.
_TXN_PREFIXES = (".txn-", ".trash-")
# Names older sdexport versions left behind when killed (swept under the export lock).
_LEGACY_TEMP_RE = re.compile(r"^\.(.+\.old-\d+|int8-work-.*|.+\.[A-Za-z0-9_]{8}\.tmp.*)$")


class Manifest:
    """``OUT/manifest.json``: one entry per artifact, keyed by a stable name.

    Every file an entry names is checked to stay inside the export (``path``) and against its sha256
    (``verify``): the main file, external data and any further ``files`` (e.g. the component's config).
    """

    def __init__(self, root: str | os.PathLike, data: dict[str, Any] | None = None):
        self.root = Path(root)
        self.data = data or {"manifest_version": MANIFEST_VERSION, "components": {}, "engines": {}}

    @classmethod
    def load(cls, root: str | os.PathLike) -> "Manifest":
        root = Path(root)
        path = root / MANIFEST_NAME
        if not path.is_file():
            if (root / "model_index.json").is_file():  # a diffusers model, not an export of one
                raise IntegrityError(f"{root} is a diffusers model directory, not an export; export it into "
                                     f"another directory first: sdexport export {root} -o {root}-onnx")
            raise IntegrityError(f"{root}: no {MANIFEST_NAME}; run 'sdexport export MODEL -o {root}' first")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise IntegrityError(f"{path}: not UTF-8 text; re-export") from None
        except json.JSONDecodeError as exc:
            raise IntegrityError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); re-export") from None
        except OSError as exc:
            raise IntegrityError(f"{path}: cannot be read ({exc.strerror})") from None
        manifest = cls(root, data)
        manifest.check_shape()
        from .schema import check_manifest

        check_manifest(manifest.data, path)
        return manifest

    def check_shape(self) -> None:
        """The manifest's own structure (what every reader relies on), before anything indexes into it."""
        where = self.root / MANIFEST_NAME
        data = self.data
        if not isinstance(data, dict):
            raise IntegrityError(f"{where}: not an sdexport manifest (a JSON {type(data).__name__}); re-export")
        for section in ("components", "engines"):
            value = data.setdefault(section, {})
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise IntegrityError(f"{where}: '{section}' is malformed; re-export")
            for name, entry in value.items():
                if not isinstance(entry.get("file"), str) or not isinstance(entry.get("sha256"), str):
                    raise IntegrityError(f"{where}: {section}.{name} has no file/sha256; re-export")
                extras = [entry.get("external_data", []), entry.get("files", [])]
                if not all(isinstance(e, list) for e in extras):
                    raise IntegrityError(f"{where}: {section}.{name} lists its files malformed; re-export")
                for extra in extras[0] + extras[1]:
                    if not isinstance(extra, dict) or not isinstance(extra.get("file"), str) \
                            or not isinstance(extra.get("sha256"), str):
                        raise IntegrityError(f"{where}: {section}.{name} lists a malformed file; re-export")
        files = data.get("files", {})
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise IntegrityError(f"{where}: 'files' is malformed; re-export")

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

    @property
    def files(self) -> dict[str, str]:
        """Files of the export that the runtime reads besides the artifacts (scheduler, tokenizers, index): path -> sha256."""
        return self.data.setdefault("files", {})

    def component(self, name: str) -> dict[str, Any]:
        if name not in self.components:
            have = ", ".join(sorted(self.components)) or "none"
            raise IntegrityError(f"{self.root}: component '{name}' was not exported (have: {have})")
        return self.components[name]

    def path(self, rel: str) -> Path:
        """``rel`` inside the export; a manifest may never point outside it (absolute, ``..``, or a link out)."""
        pure = Path(rel)
        if pure.is_absolute() or ".." in pure.parts or not rel or rel.startswith("~"):
            raise IntegrityError(f"{self.root}/{MANIFEST_NAME}: '{rel}' points outside the export; a manifest lists "
                                 "files inside its own directory only (re-export)")
        path = self.root / pure
        from .paths import resolved as resolve, symlink_loop

        if symlink_loop(path):
            raise IntegrityError(f"{path}: a symbolic link loop (it never reaches a file), listed in "
                                 f"{MANIFEST_NAME}; re-export")
        root = resolve(self.root)
        resolved = resolve(path)
        if resolved != root and root not in resolved.parents:
            raise IntegrityError(f"{path}: a link that leaves the export ({resolved}); re-export")
        return path

    @staticmethod
    def entry_files(entry: dict[str, Any]) -> list[tuple[str, str]]:
        """(relative path, sha256) of every file of one manifest entry, main file first."""
        out = [(entry["file"], entry["sha256"])]
        out += [(e["file"], e["sha256"]) for e in entry.get("external_data", [])]
        out += [(e["file"], e["sha256"]) for e in entry.get("files", [])]
        return out

    def check_file(self, rel: str, sha256: str, remedy: str) -> Path:
        path = self.path(rel)
        if not path.is_file():
            raise IntegrityError(f"{path}: listed in {MANIFEST_NAME} but missing; {remedy}")
        actual = sha256_file(path)
        if actual != sha256:
            raise IntegrityError(
                f"{path}: sha256 {actual[:12]}… does not match the manifest ({sha256[:12]}…): "
                f"changed, truncated or corrupt; {remedy}")
        return path

    def verified_path(self, entry: dict[str, Any], remedy: str = "re-export it") -> Path:
        """The artifact's path, after checking that every file of the entry matches its recorded sha256.

        ``remedy`` ends the error message: what the user runs to get a good file again.
        """
        paths = [self.check_file(rel, sha, remedy) for rel, sha in self.entry_files(entry)]
        return paths[0]

    def verify_files(self, remedy: str) -> None:
        for rel, sha in self.files.items():
            self.check_file(rel, sha, remedy)

    def intact(self, entry: dict[str, Any]) -> bool:
        """Whether every file of ``entry`` is present and matches its sha256 (for up-to-date skips)."""
        try:
            self.verified_path(entry)
            return True
        except IntegrityError:
            return False


# --- one writer per export ----------------------------------------------------------------------

class ExportLock:
    """An advisory lock on an export directory (``flock`` on ``OUT/.sdexport.lock``).

    Writers hold it exclusively for the whole command; readers hold it shared while they read, so
    they never see files being replaced. A writer that finds it held waits, saying once for whom.
    A directory where the lock file cannot be created (read-only) has no writer to fear: readers
    then go on without it.
    """

    def __init__(self, root: Path, exclusive: bool, what: str, say: Callable[[str], None] | None = None):
        self.root, self.exclusive, self.what = Path(root), exclusive, what
        self.say = say or (lambda msg: print(msg, file=sys.stderr))
        self.fd: int | None = None

    def __enter__(self) -> "ExportLock":
        import fcntl

        path = self.root / LOCK_NAME
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            if self.exclusive:
                raise
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return self  # nobody can write here either
            raise
        mode = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            self.say(f"waiting for another sdexport {'using' if self.exclusive else 'writing'} {self.root}"
                     f"{f' ({holder})' if holder else ''} to finish...")
            try:
                fcntl.flock(self.fd, mode)
            except BaseException:
                self._close()
                raise
        if self.exclusive:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"pid {os.getpid()}: sdexport {self.what}\n".encode(), 0)
        return self

    def _holder(self) -> str:
        try:
            return os.pread(self.fd, 200, 0).decode(errors="replace").strip()
        except OSError:
            return ""

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None

    def __del__(self) -> None:
        self._close()

    def __exit__(self, *exc) -> None:
        self._close()


def _journal_apply(root: Path, journal: dict[str, Any]) -> None:
    """Carry out a committed transaction; idempotent, so a run killed half-way is finished by the next one."""
    txn = journal["id"]
    staging, trash = root / f".txn-{txn}", root / f".trash-{txn}"
    with interrupts.deferred():
        for rel in journal["moves"]:
            src, dst = staging / rel, root / rel
            if src.exists() or src.is_symlink():
                if dst.exists() or dst.is_symlink():
                    (trash / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(dst, trash / rel)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
        for rel in journal["removals"]:
            dst = root / rel
            if dst.exists() or dst.is_symlink():
                (trash / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(dst, trash / rel)
        for rel in journal["removals"]:  # a folder the removals emptied goes too (ort_cuda/unet/, ort_cuda/)
            folder = (root / rel).parent
            while folder != root and root in folder.parents:
                try:
                    folder.rmdir()
                except OSError:  # not empty (or already gone): it and its parents stay
                    break
                folder = folder.parent
        write_json(root / MANIFEST_NAME, journal["manifest"])
        (root / JOURNAL_NAME).unlink()
    for folder in (staging, trash):
        shutil.rmtree(folder, ignore_errors=True)


def recover(root: Path, say: Callable[[str], None]) -> None:
    """Under the exclusive lock: finish a transaction that was committed but not applied, and sweep what
    killed commands left (staging folders, retired files, temporary files)."""
    journal_path = root / JOURNAL_NAME
    if journal_path.is_file():
        try:
            journal = json.loads(journal_path.read_text())
            if not isinstance(journal, dict) or not {"id", "moves", "removals", "manifest"} <= set(journal):
                raise ValueError
        except (ValueError, OSError):
            raise IntegrityError(f"{journal_path}: unreadable transaction journal; remove it and re-export") from None
        say(f"{root}: completing the interrupted '{journal.get('command', '?')}' (committed before it stopped)")
        _journal_apply(root, journal)
    swept = []
    for name in os.listdir(root):
        path = root / name
        if name.startswith(_TXN_PREFIXES) or _LEGACY_TEMP_RE.match(name):
            _remove(path)
            swept.append(name)
    for folder in [root] + [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]:
        swept += [p.name for p in sweep_temp_files(folder)]
        if folder != root:
            for p in folder.glob(".*.tmp*"):  # legacy atomic_path names inside component folders
                if _LEGACY_TEMP_RE.match(p.name):
                    _remove(p)
                    swept.append(p.name)
    if swept:
        say(f"{root}: removed {len(swept)} leftover temporary file(s) of interrupted runs")


def recover_if_needed(root: Path, say: Callable[[str], None]) -> None:
    """For readers: a committed-but-unapplied transaction is completed (briefly taking the writer's lock)."""
    if (root / JOURNAL_NAME).is_file():
        with ExportLock(root, True, "recover", say):
            recover(root, say)


class Transaction:
    """Every change one command makes to an export directory, applied together or not at all.

    New files and folders are written under a staging folder inside the export (``stage``); files to
    drop are named (``remove``); the new manifest is edited in memory (``manifest``). ``commit`` writes
    a journal (the commit point: one atomic rename), then moves the staged paths into place, retires
    the replaced ones, writes the manifest and deletes the journal. A command killed before the
    journal leaves the old export untouched (its staging folder is swept by the next writer); killed
    after, the next command that opens the export finishes the moves. The lock makes this the only
    writer.
    """

    def __init__(self, root: Path, what: str, say: Callable[[str], None]):
        self.root = Path(root)
        self.what = what
        self.say = say
        self.id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.staging = self.root / f".txn-{self.id}"
        self.moves: list[str] = []
        self.removals: list[str] = []
        self.manifest = Manifest.load_or_new(self.root)
        self.journaled = False  # past the commit point: the staging area belongs to the journal now

    def stage(self, rel: str, folder: bool = False) -> Path:
        """A fresh path in the staging area for ``rel`` (a file, or a folder with ``folder=True``) that
        replaces ``OUT/rel`` at commit."""
        self.manifest.path(rel)  # stays inside the export
        path = self.staging / rel
        if rel in self.moves:
            _remove(path)
        else:
            self.moves.append(rel)
        if rel in self.removals:
            self.removals.remove(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            path.mkdir()
        return path

    def staged(self, rel: str) -> Path:
        """Where ``rel`` lies now: in the staging area if this transaction wrote it, else in the export."""
        return self.staging / rel if rel in self.moves else self.root / rel

    def remove(self, rel: str) -> None:
        self.manifest.path(rel)
        if rel in self.moves:
            self.moves.remove(rel)
            _remove(self.staging / rel)
        if (self.root / rel).exists() and rel not in self.removals:
            self.removals.append(rel)

    def scratch(self, name: str) -> Path:
        """A scratch folder inside the export (same file system as the artifacts), gone after the command."""
        path = self.staging / ".scratch" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self) -> None:
        interrupts.check()  # a signal whose exception was swallowed still stops the commit
        shutil.rmtree(self.staging / ".scratch", ignore_errors=True)
        journal = {"id": self.id, "command": self.what, "moves": self.moves, "removals": self.removals,
                   "manifest": self.manifest.data}
        # The commit point (the journal's rename), the flag that keeps abandon() off the staging area it names,
        # and its application, with SIGINT/SIGTERM held back: one that came between the rename and the flag
        # deleted the staging area the journal moves from; one after the rename is delivered once the new
        # state is in place, and the CLI's line says it was written (interrupts.committed).
        with interrupts.deferred():
            write_json(self.root / JOURNAL_NAME, journal)
            self.journaled = True
            interrupts.committed(f"sdexport {self.what} had written {self.root}")
            _journal_apply(self.root, journal)

    def abandon(self) -> None:
        """Drop what was staged, unless the transaction was committed (a journal then finishes it)."""
        if not self.journaled:
            shutil.rmtree(self.staging, ignore_errors=True)


@contextlib.contextmanager
def writing(root: str | os.PathLike, what: str, say: Callable[[str], None] = lambda msg: None,
            create: bool = True) -> Iterator[Transaction]:
    """Hold the export's lock exclusively, finish or sweep what an earlier run left, and yield a
    Transaction. Nothing is committed unless the caller calls ``commit``."""
    root = Path(root)
    if create:
        root.mkdir(parents=True, exist_ok=True)
    with ExportLock(root, True, what, say):
        recover(root, say)
        txn = Transaction(root, what, say)
        try:
            yield txn
        finally:
            txn.abandon()


@contextlib.contextmanager
def reading(root: str | os.PathLike, say: Callable[[str], None] = lambda msg: None) -> Iterator[None]:
    """Hold the export's lock shared (after finishing a committed transaction a killed writer left).
    A directory that holds no export (a model directory given by mistake) gets no lock file: the reader
    refuses it, and nothing may be left behind in it."""
    root = Path(root)
    if not (root / "manifest.json").is_file() and not (root / JOURNAL_NAME).is_file():
        yield
        return
    recover_if_needed(root, say)
    with ExportLock(root, False, "read", say):
        yield
