"""Output paths checked against the command's inputs and artifacts, and for writability, before any work.

Every command that writes names its outputs and what it reads (``Guarded``: exact files and whole
directory trees) and calls ``check_output`` first: an output that is an input, lies inside an input
tree, or (for a directory output) contains one is refused with one line (exit 2), as is an output
that cannot be written (a read-only filesystem, ``/proc``, a path under a regular file, a name too
long for the temporary name beside it). Paths are compared after resolving symbolic links, so a
link does not smuggle an input in.

The output locations of the running command are remembered (``OUTPUTS``) so that the CLI can name
them when the disk fills up during the work (limits.disk_full_message).

``write_set`` writes several files (a batch of images and their sidecar) as one set: all are staged
under temporary names first and renamed into place only when every one was written.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import UsageError

OUTPUTS: list[Path] = []  # where this process writes (for the disk-full message)
# Longest suffix atomic_path/atomic_dir/tempfile add to a name: ".NAME.<8 random>.tmp.png" and the like.
TEMP_NAME_OVERHEAD = 32
NAME_MAX = 255
# Files of an export directory's root that are artifacts besides what the manifest lists.
EXPORT_ROOT_FILES = ("manifest.json", "model_index.json", "validation.json")
EXPORT_FIXED_DIRS = ("scheduler", "tokenizer", "ort_cuda")  # besides components, variants and build.ENGINE_DIR


def resolved(path: str | os.PathLike) -> Path:
    """Absolute, with every existing symbolic link resolved (the path need not exist). A symbolic link loop
    stays as it is, unresolved (``Path.resolve`` raises RuntimeError there): whoever opens it is told
    (``symlink_loop``), as for any path that cannot be read or written."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def symlink_loop(path: str | os.PathLike) -> bool:
    """Whether ``path`` (or a link on the way to it) is a symbolic link loop: it never reaches a file."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


@dataclasses.dataclass
class Guarded:
    """What a command reads or must keep: exact files, and trees nothing may be written into."""

    files: dict[Path, str] = dataclasses.field(default_factory=dict)  # path -> what it is
    trees: dict[Path, str] = dataclasses.field(default_factory=dict)

    def file(self, path: str | os.PathLike, what: str) -> "Guarded":
        self.files.setdefault(resolved(path), what)
        return self

    def tree(self, path: str | os.PathLike, what: str) -> "Guarded":
        self.trees.setdefault(resolved(path), what)
        return self

    def __or__(self, other: "Guarded") -> "Guarded":
        return Guarded({**other.files, **self.files}, {**other.trees, **self.trees})

    def collision(self, out: Path, kind: str) -> str | None:
        """How ``out`` would touch an input ("would overwrite X", "would write inside X"), or None."""
        if out in self.files:
            return f"would overwrite {self.files[out]}"
        for tree, what in self.trees.items():
            if out == tree:
                return f"would overwrite {what}"
            if tree in out.parents:
                return f"would write inside {what}"
        if kind == "dir":  # a directory output must not contain an input either
            for path, what in {**self.files, **self.trees}.items():
                if out in path.parents:
                    return f"would contain {what}"
        return None


def _listed_files(node) -> Iterable[str]:
    """Every ``file`` string anywhere in a manifest (components, external data, engines, variants)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "file" and isinstance(value, str):
                yield value
            else:
                yield from _listed_files(value)
    elif isinstance(node, list):
        for value in node:
            yield from _listed_files(value)


def export_artifacts(root: str | os.PathLike, data: dict | None = None) -> Guarded:
    """An export directory's artifacts: its root files, every file its manifest lists (and the
    directories holding them), and its subdirectories (a re-export swaps them whole).
    Only new files directly in the export's root may be written (e.g. ``OUT/image.png``)."""
    root = resolved(root)
    guard = Guarded()
    for name in EXPORT_ROOT_FILES:
        guard.file(root / name, f"{root}'s {name}")
    if data is None:
        try:
            data = json.loads((root / "manifest.json").read_text())
        except (OSError, ValueError):
            data = {}
    files = data.get("files") if isinstance(data, dict) else None
    listed = [*_listed_files(data), *(files if isinstance(files, dict) else [])]  # artifacts, pipeline files
    for rel in listed:
        if not isinstance(rel, str):
            continue
        path = root / rel
        guard.file(path, f"{path}, listed in {root}/manifest.json")
        top = Path(rel).parts[0] if Path(rel).parts else ""
        if top and top not in ("..", "/") and len(Path(rel).parts) > 1:
            guard.tree(root / top, f"{root / top}, a directory of the export")
    from .artifacts import VARIANT_OF
    from .build import ENGINE_DIR

    components = data.get("components") if isinstance(data, dict) else None
    for name in (*(components if isinstance(components, dict) else ()), *VARIANT_OF, *EXPORT_FIXED_DIRS,
                 ENGINE_DIR):
        guard.tree(root / name, f"{root / name}, a directory of the export")
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and not child.name.startswith("."):
                guard.tree(child, f"{child}, a directory of the export")
    return guard


def export_holding(path: str | os.PathLike) -> Path | None:
    """The export directory that ``path`` lies inside (its nearest parent with a manifest), or None."""
    for parent in resolved(path).parents:
        if is_export_dir(parent):
            return parent
    return None


def enclosing_export(path: str | os.PathLike) -> Guarded:
    """The artifacts of an export directory that holds ``path`` (none where no parent has a manifest), for an
    output that belongs to no export: it may be a new file there, never one of the export's own files."""
    holder = export_holding(path)
    return export_artifacts(holder) if holder is not None else Guarded()


def not_an_export_inside_one(path: str | os.PathLike) -> str | None:
    """What a reader says when the directory it was given (or a file, or a missing path) lies inside an export:
    that export is what to give. None where no parent is an export (the reader's own advice stands)."""
    holder = export_holding(path)
    if holder is None:
        return None
    return f"{path}: inside the export {holder}, not an export itself; give the export directory: {holder}"


def model_inputs(root: str | os.PathLike, what: str = "the source model") -> Guarded:
    """A diffusers model directory: its files and every subdirectory (new files in its root are allowed)."""
    root = resolved(root)
    guard = Guarded()
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir():
                guard.tree(child, f"{child}, part of {what}")
            else:
                guard.file(child, f"{child}, part of {what}")
    return guard


def check_output(option: str, path: str | os.PathLike, guarded: Guarded | None = None, kind: str = "file",
                 what: str | None = None) -> Path:
    """Refuse (exit 2) an output that is an input/artifact of the command or cannot be written;
    returns the resolved path and remembers it in ``OUTPUTS``."""
    label = what or f"{option} {path}"
    out = resolved(path)
    hit = guarded.collision(out, kind) if guarded else None
    if hit:
        raise UsageError(f"{label}: {hit}, which this command reads or keeps; choose another path")
    check_writable(label, out, kind)
    OUTPUTS.append(out)
    return out


def check_writable(label: str, out: Path, kind: str = "file") -> None:
    """Whether ``out`` (a file, or a directory for ``kind="dir"``) can be created here, found without writing it:
    an existing output of the wrong kind, a name too long for its temporary sibling, a parent that is a
    file, and a directory where creating a file fails (read-only filesystem, /proc, permissions)."""
    try:
        st = os.stat(out)
    except FileNotFoundError:
        st = None
    except OSError as exc:  # ENOTDIR: a parent is a regular file; ELOOP; EACCES
        raise UsageError(f"{label}: cannot be written ({exc.strerror})") from None
    if st is not None:
        if kind == "file" and not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{label}: exists and is {_kind_of(st.st_mode)}, not a regular file")
        if kind == "dir" and not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{label}: exists and is {_kind_of(st.st_mode)}, not a directory")
    for part in out.parts[1:]:
        if len(os.fsencode(part)) + TEMP_NAME_OVERHEAD > NAME_MAX:
            raise UsageError(f"{label}: the name '{part[:40]}…' is too long ({len(os.fsencode(part))} bytes; "
                             f"at most {NAME_MAX - TEMP_NAME_OVERHEAD} leave room for its temporary name)")
    probe_dir = out if (kind == "dir" and st is not None) else out.parent
    while not probe_dir.exists():
        if probe_dir == probe_dir.parent:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UsageError(f"{label}: {probe_dir} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sdexport-write-probe-", dir=probe_dir)
    except OSError as exc:
        raise UsageError(f"{label}: cannot write in {probe_dir} ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a file")):
        if test(mode):
            return name
    return "not a regular file"


def write_set(files: list[tuple[Path, bytes]]) -> None:
    """Write every (path, bytes) as one set: all staged beside their final names, then renamed into
    place (in the given order; put the file that describes the others last). If any write fails,
    nothing is renamed and every staged file is removed. A full disk is found before writing when
    the free space is already too small, and named with the space the set needs."""
    from .limits import DISK_FULL_ERRNOS, DiskFull, check_disk, human_bytes

    need = sum(len(data) for _, data in files)
    for directory in {path.parent for path, _ in files}:
        directory.mkdir(parents=True, exist_ok=True)
        check_disk(directory, sum(len(d) for p, d in files if p.parent == directory), "writing the output")
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((Path(tmp), path))
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp, 0o666 & ~_umask())
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as exc:
        for tmp, _ in staged:
            if tmp.exists():
                tmp.unlink()
        if exc.errno in DISK_FULL_ERRNOS:
            where = exc.filename or files[0][0]
            raise DiskFull(f"{where}: no space left on device; the set of {len(files)} file(s) needs "
                           f"{human_bytes(need)}; none was written") from None
        raise
    except BaseException:
        for tmp, _ in staged:
            if tmp.exists():
                tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_export_dir(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def check_new_or_empty_dir(option: str, out: Path, keeps: str, ok: bool = False) -> None:
    """A directory output that would replace what it holds: refuse one that holds anything (hidden
    temporary entries aside) unless ``ok`` (it is already what the command writes)."""
    if ok or not out.is_dir():
        return
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if held:
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise UsageError(f"{option} {out}: the directory is not empty ({shown}) and is not {keeps}; "
                         "choose a new or empty directory")



# --- each command's outputs ----------------------------------------------------------------------------
def source_inputs(export, model_dir: str | os.PathLike | None = None) -> Guarded:
    """The export's source model (the manifest's path, and ``--model`` when given): the PyTorch reference."""
    guard = Guarded()
    recorded = export.manifest.data.get("model", {}).get("path")
    for root in (recorded, model_dir):
        if root:
            guard = guard | model_inputs(root)
    return guard


def request_inputs(image=None, mask=None, loras=()) -> Guarded:
    """The files a generation request reads besides the export: ``--image``, ``--mask`` and ``--lora``."""
    guard = Guarded()
    for option, path in (("--image", image), ("--mask", mask)):
        if path is not None:
            guard.file(path, f"the {option} file {path}")
    for lora in loras:
        guard.file(lora.path, f"the --lora file {lora.path}")
    return guard


def check_infer_outputs(export, out: str | os.PathLike, geo, model_dir=None, inputs: Guarded | None = None) -> list[Path]:
    """``infer -o``: every PNG of the batch and the sidecar, against the export, its source model and the
    request's own inputs (``request_inputs``), and room for them (at most 3 bytes a pixel and a sidecar)."""
    from .limits import check_disk
    from .pipeline import image_paths

    names, sidecar = image_paths(out, geo.images)
    guard = export_artifacts(export.root, export.manifest.data) | source_inputs(export, model_dir) | (inputs or Guarded())
    for name in names:
        what = f"-o {out}" if name == Path(out) else f"-o {out}: its image {name}"
        check_output("-o", name, guard, what=what)
    check_output("-o", sidecar, guard, what=f"-o {out}: its sidecar {sidecar}")
    check_disk(sidecar.parent, geo.images * (geo.height * geo.width * 3 + 1024) + 16384, "the images and sidecar")
    return [*names, sidecar]


REPORT_BYTES = 64 * 1024  # bench.json is a few KiB


def check_report_output(option: str, path: str | os.PathLike, export, model_dir=None,
                        inputs: Guarded | None = None) -> Path:
    """A report file (``bench --json``) against the export, its source model and the request's own inputs
    (``request_inputs``), with room for it."""
    from .limits import check_disk

    guard = export_artifacts(export.root, export.manifest.data) | source_inputs(export, model_dir) | (inputs or Guarded())
    out = check_output(option, path, guard)
    check_disk(out.parent, REPORT_BYTES, "the report")
    return out


def check_repository_output(directory: str | os.PathLike, model_name: str, export, loras=()) -> Path:
    """``serve --write-repository DIR``: the model directory ``DIR/<model-name>`` it writes lies nowhere in or
    around the export, its source model or a ``--lora`` file, can be written, and replaces only a model that
    ``serve`` wrote before (its config.pbtxt says so), never another directory's contents."""
    from .serve import REPOSITORY_MARK

    guard = export_artifacts(export.root, export.manifest.data) | source_inputs(export) | request_inputs(loras=loras)
    guard.tree(export.root, f"the export {resolved(export.root)}")
    recorded = export.manifest.data.get("model", {}).get("path")
    if recorded:
        guard.tree(recorded, f"the source model {resolved(recorded)}")
    final = Path(directory) / model_name
    out = check_output("--write-repository", final, guard, kind="dir",
                       what=f"--write-repository {directory}: its model directory {final}")
    config = out / "config.pbtxt"
    try:
        ours = config.is_file() and config.read_text(errors="replace").startswith(REPOSITORY_MARK)
    except OSError:
        ours = False
    check_new_or_empty_dir("--write-repository", out, "a model written by 'sdexport serve'", ok=ours)
    return out


def check_export_writable(export, what: str) -> None:
    """A command that writes into an export directory (validate's report, build's engines, quantize's
    variant): the directory must take new files."""
    check_writable(f"{export.root} ({what})", resolved(export.root), kind="dir")
    OUTPUTS.append(resolved(export.root))


def check_build_outputs(export, timing_cache: str | os.PathLike | None) -> None:
    """``build``: the export takes new engines, and ``--timing-cache`` (read and rewritten) is no other
    artifact of the export (the engines directory is where the default cache lives)."""
    check_export_writable(export, "build writes engines/ there")
    if timing_cache is None:
        return
    from .build import ENGINE_DIR

    guard = export_artifacts(export.root, export.manifest.data)
    engines = resolved(export.root) / ENGINE_DIR
    guard.trees = {p: w for p, w in guard.trees.items() if p != engines}
    guard.files = {p: w for p, w in guard.files.items() if engines not in p.parents}
    check_output("--timing-cache", timing_cache, guard)


def check_quantize_outputs(export_dir: str | os.PathLike, calib: str | os.PathLike) -> None:
    """``quantize``: the export takes the new variant, whose directory must not hold the calibration file
    it reads (that directory is replaced whole)."""
    from .artifacts import INT8_UNET
    from .runtime import ExportDir

    export = ExportDir.open(export_dir)
    check_export_writable(export, f"quantize writes {INT8_UNET}/ there")
    target = export.root / INT8_UNET
    check_output("--calib", target, Guarded().file(calib, f"the calibration file {calib}"), kind="dir",
                 what=f"{target} (what quantize writes)")
