"""A full disk (issue 9, item 13) on a small tmpfs: one line naming the path (exit 10) and the space needed
where it can be known before the work; nothing partial under a final name; a batch of images and its
sidecar written as one set. ENOSPC during the work is made by a tmpfs without free inodes, so that it
strikes in the middle of real writes (torch.onnx.export, onnx, PIL) with bytes to spare."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import assert_refused, cli

INFER = ("--prompt", "a kite", "--steps", "1", "--height", "64", "--width", "64")


def _leftovers(root):
    """Temporary names (``.NAME.XXXX.tmp...``) anywhere under ``root``."""
    return [p for p in root.rglob(".*") if ".tmp" in p.name or ".old-" in p.name]


def test_export_refused_before_the_work_when_it_cannot_fit(tiny_model, mount_tmpfs):
    disk = mount_tmpfs("4m")
    line = assert_refused(cli("export", tiny_model, "-o", disk / "out"), 10, "needs about", "MiB of disk space",
                          "free there")
    assert str(disk / "out") in line
    assert not (disk / "out").exists() and not list(disk.iterdir())


def test_a_preset_is_refused_before_it_is_built_when_it_cannot_fit(mount_tmpfs, tmp_path):
    """The 'tiny' preset (16 MB of FP32 weights) onto a 4 MB disk: refused before building (exit 10, the space
    needed named), both by `preset -o` and when `export` writes it into the cache. The cache's disk is the full
    one: the line names the cache, not the export's -o (on another disk, with room), which it used to name after
    building the preset and failing to write it."""
    disk = mount_tmpfs("4m")
    proc = cli("preset", "tiny", "-o", disk / "p")
    line = assert_refused(proc, 10, "'tiny' preset", "needs about", "MiB of disk space", "free there")
    assert str(disk / "p") in line and "building tiny" not in proc.stderr
    cache = disk / "cache"
    proc = cli("export", "tiny", "-o", tmp_path / "out", env={"SDEXPORT_CACHE": cache})
    line = assert_refused(proc, 10, "'tiny' preset", "needs about", "free there")
    assert str(cache / "presets") in line and str(tmp_path / "out") not in line, line
    assert "building tiny" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (disk / "p").exists()
    assert not [p for p in disk.rglob("*") if p.name != ".sdexport.lock" and p.is_file()]


@pytest.mark.slow
def test_export_when_the_disk_fills_during_the_work(tiny_model, mount_tmpfs):
    disk = mount_tmpfs("200m", nr_inodes=8)  # room for the first component's files, then ENOSPC
    proc = cli("export", tiny_model, "-o", disk / "out")
    line = assert_refused(proc, 10, "no space left on device", "nothing was left under a final name")
    assert str(disk / "out") in line
    assert not _leftovers(disk)
    out = disk / "out"
    if (out / "manifest.json").exists():  # what completed before the disk filled is whole and listed right
        manifest = json.loads((out / "manifest.json").read_text())
        for entry in manifest["components"].values():
            assert hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]


def test_infer_refused_before_generating_when_the_images_cannot_fit(export_fp32, mount_tmpfs):
    disk = mount_tmpfs("16k")
    assert_refused(cli("infer", export_fp32, *INFER, "--batch-size", "2", "-o", disk / "b.png"), 10,
                   "needs about", "free there")
    assert not list(disk.iterdir())


def test_a_batch_and_its_sidecar_are_written_as_one_set(export_fp32, mount_tmpfs):
    """Two PNGs and the sidecar need three new files; the filesystem has inodes for two: none is written."""
    disk = mount_tmpfs("8m", nr_inodes=3)
    proc = cli("infer", export_fp32, *INFER, "--batch-size", "2", "-o", disk / "b.png")
    assert_refused(proc, 10, "no space left on device", "none was written")
    assert not list(disk.iterdir())


def test_calibrate_refused_before_the_capture(tiny_model, mount_tmpfs):
    disk = mount_tmpfs("1m")
    assert_refused(cli("calibrate", tiny_model, "--num-prompts", "1", "-o", disk / "c.npz"), 10, "needs about",
                   "calibration file")
    assert not list(disk.iterdir())


def test_bench_report_refused_before_timing(export_fp32, mount_tmpfs):
    disk = mount_tmpfs("16k")
    (disk / "filler").write_bytes(b"\0" * 12 * 1024)
    proc = cli("bench", export_fp32, "--steps", "1", "--json", disk / "bench.json")
    assert_refused(proc, 10, "the report")
    assert "loading engines" not in proc.stderr and not (disk / "bench.json").exists()


def test_fp16_export_keeps_autocasts_model_copy_in_its_scratch_within_the_disk_check(tiny_model, tmp_path,
                                                                                     monkeypatch):
    """For graphs over 2 GB (the SDXL UNet) AutoCast's reference run saves a copy of the whole FP32 model in
    the temporary directory: it must land in the export's scratch (gone with the transaction, on the disk the
    check measured), not in /tmp, and the check must cover the real peak. The tiny UNet takes the same path
    with ModelOpt's size test forced; the peak is sampled while the export runs (on the tiny model the
    tokenizer files dominate the estimate, so this checks that it covers the peak, not its every term)."""
    import tempfile
    import threading
    import time

    from modelopt.onnx import utils as onnx_utils

    from sdexport import limits
    from sdexport.export import export

    def tree_bytes(root):
        total = 0
        for p in root.rglob("*"):
            try:
                total += p.stat().st_size if p.is_file() else 0
            except OSError:  # removed while walking
                pass
        return total

    out = tmp_path / "e16"
    tempdir_before = tempfile.tempdir
    copies, needs, peak, done = [], [], [0], threading.Event()
    real_save, real_check = onnx_utils.save_onnx, limits.check_disk
    monkeypatch.setattr(onnx_utils, "is_model_too_large_for_protobuf", lambda *a, **k: True)
    monkeypatch.setattr(onnx_utils, "save_onnx",
                        lambda model, path, *a, **k: (copies.append(Path(path)), real_save(model, path, *a, **k))[1])
    monkeypatch.setattr(limits, "check_disk", lambda path, need, what: (needs.append(need),
                                                                        real_check(path, need, what))[1])

    def sample():
        while not done.is_set():
            if out.exists():
                peak[0] = max(peak[0], tree_bytes(out))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        export(str(tiny_model), out, dtype="fp16", components=["unet"], max_images=1)
    finally:
        done.set()
        sampler.join()
    assert copies, "AutoCast did not take its file-backed path"
    for path in copies:
        assert out in path.parents, f"AutoCast wrote {path} outside the export"
    assert not list(out.rglob(".scratch")) or not any(p.is_file() for p in out.rglob(".scratch/*"))
    assert tempfile.tempdir == tempdir_before  # restored for the rest of the process
    assert needs and peak[0] > 0
    assert needs[0] >= peak[0], f"disk check asked for {needs[0]} bytes; the export's peak was {peak[0]}"



def test_build_ort_refused_before_the_work_when_its_variant_cannot_fit(export_fp32, mount_tmpfs):
    """build --backend ort re-exports the UNet in FP32 twice over in its scratch (20 GB for SDXL): on a disk
    without that room it stops before tracing, with the export as it was."""
    import shutil

    disk = mount_tmpfs("40m")  # the tiny export (17 MiB) and room for its variant
    out = disk / "e"
    shutil.copytree(export_fp32, out)
    manifest = (out / "manifest.json").read_bytes()
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(free - 2 * 2**20, 0))  # 2 MiB left: less than the UNet's graphs
    proc = cli("build", out, "--backend", "ort")
    assert_refused(proc, 10, "build --backend ort (unet, vae_decoder)", "needs about", "free there")
    assert "export (classic attention)" not in proc.stderr
    assert (out / "manifest.json").read_bytes() == manifest and not (out / "ort_cuda").exists()
    (disk / "filler").unlink()  # with room again the same command makes the variant
    proc = cli("build", out, "--backend", "ort")
    assert proc.returncode == 0, proc.stderr
    assert "unet" in json.loads((out / "manifest.json").read_text())["ort_cuda"]


@pytest.mark.slow  # two variant builds (~20 s on 2 cores)
def test_build_ort_disk_check_is_its_peak_not_more(export_fp32, tmp_path, monkeypatch):
    """The disk check of build --backend ort asks for what the variant's build holds at its peak (measured after
    each file it writes), not for every FP16 result on top of the largest component's two FP32 graphs (5 GB of
    free disk too many for the SDXL UNet). The check is fed the FP32 graphs' real sizes (a tiny model's graph is
    mostly not parameters), measured by a first build."""
    import shutil

    from sdexport import export as export_mod
    from sdexport import limits, ort_cuda, schema

    def run(out, needs):
        shutil.copytree(export_fp32, out)
        base, growth, raw = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()), [0], {}

        def measured(fn):
            def wrapper(*a, **k):
                result = fn(*a, **k)
                path = a[1] if fn is real_save else a[0]
                if fn is real_save and Path(path).parent.name == "fp32":  # scratch/<variant>-<component>/fp32/model.onnx
                    raw[Path(path).parents[1].name.split("-", 1)[1]] = (Path(path).parents[1] / "raw" /
                                                                        "model.onnx").stat().st_size
                growth[0] = max(growth[0], sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) - base)
                return result
            return wrapper

        monkeypatch.setattr(export_mod, "save_onnx", measured(real_save))
        monkeypatch.setattr(ort_cuda, "_optimize", measured(real_optimize))
        monkeypatch.setattr(limits, "check_disk", lambda path, need, what: needs.append(need))
        ort_cuda.prepare(out)
        return growth[0], raw

    real_save, real_optimize = export_mod.save_onnx, ort_cuda._optimize
    _, raw = run(tmp_path / "first", [])
    sources = {ort_cuda.ExportDir.open(tmp_path / "first").spec(n).source: b for n, b in raw.items()}
    monkeypatch.setattr(schema, "check_loadable", lambda info, parts: {p: sources[p] / 4 for p in parts})
    needs = []
    growth, _ = run(tmp_path / "second", needs)
    assert len(needs) == 1 and growth > 0
    assert growth <= needs[0] <= 1.1 * growth, (needs[0], growth)


def test_fp16_conversions_in_threads_keep_their_own_scratch_and_restore_the_tempdir(tmp_path, monkeypatch):
    """convert_fp16 points the process-wide tempfile.tempdir at its export's scratch (ModelOpt takes no folder):
    two exports converting at once in threads of one process (a library caller) must each see their own
    scratch, and the process's temporary directory must be as before once both are done."""
    import tempfile
    import threading
    import time
    import types

    import onnx
    import torch

    from sdexport import precision

    seen, before = {}, tempfile.tempdir

    def convert(**kwargs):
        name = threading.current_thread().name
        seen[name] = [tempfile.gettempdir()]
        time.sleep(0.4)
        seen[name].append(tempfile.gettempdir())
        return onnx.ModelProto()

    monkeypatch.setattr(precision, "_autocast", lambda: convert)
    monkeypatch.setattr(precision, "out_of_range_nodes", lambda path, feed: [])  # no graph here
    spec = types.SimpleNamespace(name="unet", fp32_node_patterns=())
    dirs = {name: tmp_path / name for name in ("a", "b")}
    for d in dirs.values():
        d.mkdir()
    threads = [threading.Thread(target=precision.convert_fp16, name=name,
                                args=(tmp_path / "model.onnx", spec, {"x": torch.zeros(1)}), kwargs={"work_dir": d})
               for name, d in dirs.items()]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert tempfile.tempdir == before
    for name, d in dirs.items():
        assert seen[name] == [str(d), str(d)], seen
