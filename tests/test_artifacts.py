"""Artifacts are atomic, locked and described: transactions, the export lock, manifest coverage and
containment, consistency between components, and real signals sent to real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_error, run_cli, sdexport_cmd, sdexport_env

from sdexport import manifest as mf
from sdexport.runtime import ExportDir


def _leftover(rel: Path) -> bool:
    """Staging folders of a killed writer: garbage the next writer sweeps, invisible to readers."""
    return rel.parts[0].startswith((".txn-", ".trash-"))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (but the lock file and a killed writer's staging) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != mf.LOCK_NAME and not _leftover(p.relative_to(root))}


def verify_whole(root: Path, leftovers_allowed: bool = False) -> dict:
    """The export opens, every artifact and pipeline file matches the manifest, no journal is pending
    (and, unless allowed, no staging leftovers lie around)."""
    export = ExportDir.open(root)
    for entry in list(export.manifest.components.values()) + list(export.manifest.engines.values()):
        export.manifest.verified_path(entry)
    export.check_components(list(export.manifest.components))
    names = {p.name for p in root.iterdir()}
    assert mf.JOURNAL_NAME not in names
    if not leftovers_allowed:
        assert not any(_leftover(Path(n)) for n in names), names
    return export.manifest.data


@pytest.fixture()
def fresh_export(export_fp32, tmp_path) -> Path:
    out = tmp_path / "e"
    shutil.copytree(export_fp32, out)
    return out


# --- containment and coverage ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../../elsewhere/unet.onnx", "/etc/passwd", "unet/../../x.onnx", "~/x.onnx"])
def test_manifest_paths_stay_inside_the_export(fresh_export, tmp_path, bad):
    data = json.loads((fresh_export / "manifest.json").read_text())
    data["components"]["unet"]["file"] = bad
    (fresh_export / "manifest.json").write_text(json.dumps(data))
    result = run_cli("infer", fresh_export, "--prompt", "p", "-o", tmp_path / "x.png", "--steps", 1)
    assert_error(result, 5, "outside the export")
    assert not (tmp_path / "x.png").exists()


def test_a_link_out_of_the_export_is_refused(fresh_export, tmp_path):
    """A symbolic link with the right bytes behind it, pointing outside: still refused."""
    outside = tmp_path / "outside.onnx"
    shutil.copy(fresh_export / "unet" / "model.onnx", outside)
    (fresh_export / "unet" / "model.onnx").unlink()
    (fresh_export / "unet" / "model.onnx").symlink_to(outside)
    result = run_cli("infer", fresh_export, "--prompt", "p", "-o", tmp_path / "x.png", "--steps", 1)
    assert_error(result, 5, "leaves the export")


@pytest.mark.parametrize("victim, edit", [
    ("scheduler/scheduler_config.json", lambda d: {**d, "beta_end": 0.02}),
    ("model_index.json", lambda d: {**d, "_class_name": "StableDiffusionImg2ImgPipeline"}),
    ("tokenizer/vocab.json", None),
    ("unet/config.json", lambda d: {**d, "sample_size": 8}),
])
def test_every_file_the_runtime_reads_is_checked(fresh_export, tmp_path, victim, edit):
    path = fresh_export / victim
    if edit is None:
        path.write_text(path.read_text().replace('"a</w>"', '"q</w>"', 1) + " ")
    else:
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    result = run_cli("infer", fresh_export, "--prompt", "p", "-o", tmp_path / "x.png", "--steps", 1)
    assert_error(result, 5, victim.split("/")[-1], "does not match the manifest")


@pytest.mark.parametrize("victim", ["tokenizer", "scheduler/scheduler_config.json", "unet/config.json"])
def test_deleted_files_are_named_and_a_reexport_restores_them(fresh_export, tiny_model, tmp_path, victim):
    path = fresh_export / victim
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = run_cli("infer", fresh_export, "--prompt", "p", "-o", tmp_path / "x.png", "--steps", 1)
    assert_error(result, 5, "missing")
    result = run_cli("export", tiny_model, "-o", fresh_export)
    assert result.exit_code == 0, result.stderr
    assert path.exists()
    verify_whole(fresh_export)


# --- transactions ----------------------------------------------------------------------------------

def test_a_failed_command_leaves_the_previous_export_byte_identical(fresh_export, tiny_model, monkeypatch):
    before = snapshot(fresh_export)
    import sdexport.export as export_module

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    calls = {"n": 0}
    real = export_module.export_component

    def second_fails(*args, **kwargs):  # the first component is staged, the second fails
        calls["n"] += 1
        if calls["n"] == 2:
            boom()
        return real(*args, **kwargs)

    monkeypatch.setattr(export_module, "export_component", second_fails)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_module.export(str(tiny_model), fresh_export, force=True)
    assert snapshot(fresh_export) == before
    verify_whole(fresh_export)


def test_a_commit_killed_half_way_is_finished_by_the_next_reader(fresh_export, tiny_model, monkeypatch):
    """The journal is the commit point: killed between moving components into place and writing the
    manifest, the next command completes the transaction; no listed component is ever missing."""
    import sdexport.export as export_module

    class Killed(BaseException):
        pass

    real_replace = os.replace
    moves = {"n": 0}

    def replace(src, dst):
        if ".txn-" in str(src) and "model_index" not in str(src):
            moves["n"] += 1
            if moves["n"] == 3:  # two components in place, the rest and the manifest not
                raise Killed()
        return real_replace(src, dst)

    monkeypatch.setattr(mf.os, "replace", replace)
    with pytest.raises(Killed):
        export_module.export(str(tiny_model), fresh_export, dtype="fp16", force=True)
    monkeypatch.setattr(mf.os, "replace", real_replace)
    assert (fresh_export / mf.JOURNAL_NAME).is_file()
    data = verify_whole(fresh_export)  # opening recovers: the new export, whole
    assert data["dtype"] == "fp16"
    assert {c["key"]["dtype"] for c in data["components"].values()} == {"fp16"}


def test_partial_reexport_with_other_ranges_or_dtype_is_refused(fresh_export, tiny_model):
    before = snapshot(fresh_export)
    for args in (["--components", "unet", "--max-size", "128"], ["--components", "unet", "--dtype", "fp16"]):
        result = run_cli("export", tiny_model, "-o", fresh_export, *args)
        assert_error(result, 2, "would mix", "--force")
        assert snapshot(fresh_export) == before


def test_consumers_refuse_components_that_do_not_belong_together(fresh_export, tmp_path):
    data = json.loads((fresh_export / "manifest.json").read_text())
    data["components"]["vae_decoder"]["key"]["ranges"]["max_size"] = 128  # as a mixed older export would say
    (fresh_export / "manifest.json").write_text(json.dumps(data))
    result = run_cli("infer", fresh_export, "--prompt", "p", "-o", tmp_path / "x.png", "--steps", 1)
    assert_error(result, 5, "vae_decoder", "shape ranges", "re-export")


def test_a_range_mismatch_names_what_differs(fresh_export, tmp_path):
    """Only the pixel multiple differs: the line showed the same range on both sides ('64-256 px x4 vs 64-256 px x4')."""
    data = json.loads((fresh_export / "manifest.json").read_text())
    ranges = data["ranges"]
    data["components"]["vae_decoder"]["key"]["ranges"]["pixel_multiple"] = ranges["pixel_multiple"] // 2
    (fresh_export / "manifest.json").write_text(json.dumps(data))
    result = run_cli("infer", fresh_export, "--prompt", "p", "-o", tmp_path / "x.png", "--steps", 1)
    assert_error(result, 5, "vae_decoder", f"in steps of {ranges['pixel_multiple'] // 2}, x{ranges['max_images']} vs "
                 f"{ranges['min_size']}-{ranges['max_size']} px in steps of {ranges['pixel_multiple']}")


def test_leftovers_of_killed_runs_are_swept_by_the_next_writer(fresh_export, tiny_model):
    dead_pid = 2**22 - 7  # above the default pid_max: no such process
    leftovers = [fresh_export / ".txn-123-deadbeef" / "unet", fresh_export / ".unet.old-4242",
                 fresh_export / ".int8-work-abc123"]
    for p in leftovers:
        p.mkdir(parents=True)
        (p / "junk").write_bytes(b"x" * 100)
    temp = fresh_export / "unet" / f".model.onnx.{dead_pid}-0badc0de.tmp"
    temp.write_bytes(b"partial")
    result = run_cli("export", tiny_model, "-o", fresh_export)
    assert result.exit_code == 0, result.stderr
    assert "leftover" in result.stderr
    assert not any(p.exists() for p in leftovers + [temp])


# --- real processes ---------------------------------------------------------------------------------

def _start(*args, **env):
    return subprocess.Popen(sdexport_cmd(*args), env=sdexport_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_writers_on_one_export_both_land(tiny_model, tmp_path):
    """export --components unet and --components vae_decoder at the same time: each waits (saying so) while
    the export is held, then one writes after the other; both exit 0 and the manifest has both. The test
    holds the export's lock until both have said they wait, so the two really overlap on any machine (on a
    16-core host a tiny export finished before the other process had imported torch)."""
    out = tmp_path / "e"
    out.mkdir()
    logs = [tmp_path / "a.err", tmp_path / "b.err"]
    with mf.ExportLock(out, exclusive=True, what="test holding the export"):
        procs = []
        for component, log in zip(("unet", "vae_decoder"), logs):
            with log.open("w") as err:
                procs.append(subprocess.Popen(sdexport_cmd("export", tiny_model, "-o", out, "--components", component),
                                              env=sdexport_env(), stdout=subprocess.DEVNULL, stderr=err, text=True))
        deadline = time.monotonic() + 300
        while not all("waiting for another sdexport" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [l.read_text() for l in logs]
            time.sleep(0.2)
        assert not (out / "manifest.json").exists()  # nobody wrote while the lock was held
    for p in procs:
        p.wait(timeout=600)
    errs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert all(e.count("waiting for another sdexport") == 1 for e in errs), errs
    data = verify_whole(out)
    assert set(data["components"]) == {"unet", "vae_decoder"}


@pytest.mark.slow
@pytest.mark.parametrize("sig, delay_s", [(signal.SIGINT, 2.0), (signal.SIGTERM, 4.0), (signal.SIGKILL, 6.0),
                                          (signal.SIGINT, 9.0), (signal.SIGKILL, 12.0)])
def test_signals_during_export_leave_the_old_export_or_the_new_one(export_fp32, tiny_model, tmp_path, sig, delay_s):
    """A real export --force --dtype fp16 over an FP32 export, stopped by a real signal at several points:
    afterwards the directory is the old export byte for byte, or the whole new one; never a mix."""
    out = tmp_path / "e"
    shutil.copytree(export_fp32, out)
    before = snapshot(out)
    proc = _start("export", tiny_model, "-o", out, "--dtype", "fp16", "--force")
    time.sleep(delay_s)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:  # finished before the signal
        assert verify_whole(out)["dtype"] == "fp16"
        return
    expected = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}[sig]
    assert proc.returncode == expected, (proc.returncode, err)
    assert "Traceback" not in err
    data = verify_whole(out, leftovers_allowed=sig == signal.SIGKILL)
    if data["dtype"] == "fp32":
        assert snapshot(out) == before
    else:
        assert {c["key"]["dtype"] for c in data["components"].values()} == {"fp16"}
    rerun = subprocess.run(sdexport_cmd("export", tiny_model, "-o", out, "--dtype", "fp16", "--force"),
                           env=sdexport_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert verify_whole(out)["dtype"] == "fp16"


def test_interrupt_swallowed_inside_a_library_still_exits_130(export_fp32, tiny_model, monkeypatch, tmp_path):
    """A Ctrl-C whose KeyboardInterrupt a __del__ or callback swallowed must not let the command commit and
    exit 0: the recorded signal stops the commit and sets the exit status."""
    import sdexport.export as export_module
    from sdexport import interrupts

    real = export_module.export_component

    def swallowed(*args, **kwargs):  # the signal arrived during the work, its exception went nowhere
        entry = real(*args, **kwargs)
        interrupts.record(signal.SIGINT)
        return entry

    monkeypatch.setattr(export_module, "export_component", swallowed)
    out = tmp_path / "e"
    shutil.copytree(export_fp32, out)
    before = snapshot(out)
    result = run_cli("export", tiny_model, "-o", out, "--components", "unet", "--force")  # refused at the commit
    assert result.exit_code == 130, result.stderr
    assert snapshot(out) == before


def test_interrupt_after_the_commit_says_the_export_was_written(tiny_model, tmp_path):
    """A real SIGINT that reaches a real export after its commit point: the new export is whole, and the one
    line said 'nothing partial was left' as if it had been stopped before (exit 130 and no word that it was
    written). The exit status still says the command was interrupted (130: a script stops); the line says the
    export was written, complete."""
    out, mark = tmp_path / "e", tmp_path / "committed"
    script = ("import sys, time\n"
              "from pathlib import Path\n"
              "from sdexport import manifest\n"
              "commit = manifest.Transaction.commit\n"
              "def committed_then_wait(self):\n"
              "    commit(self)\n"
              "    Path(sys.argv[1]).write_text('')\n"
              "    time.sleep(120)\n"
              "manifest.Transaction.commit = committed_then_wait\n"
              "from sdexport.cli import cli\n"
              "cli(sys.argv[2:], prog_name='sdexport')\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(mark), "export", str(tiny_model), "-o", str(out),
                             "--components", "vae_decoder"], env=sdexport_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not mark.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=60)
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == (f"interrupted (SIGINT) after sdexport export had written {out} (committed before the "
                    "interrupt: complete)"), last
    assert set(verify_whole(out)["components"]) == {"vae_decoder"}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_command_printed_its_result_changes_nothing(tiny_model, tmp_path, sig):
    """Ctrl-C once the export has printed its result: the process still needs about a second to shut down (torch
    and ONNX Runtime loaded), during which Python runs no signal handler and then restores the default action, so
    the signal killed it without a line (exit status 130/143 by signal) or left a bare 'interrupted'. Signals from
    the result line on, sent until the process is gone: the exit status is the export's own (0, no
    'interrupted' line) or, for one that came before the command had finished, 130/143 with the line that says the
    export was written; the export is whole either way."""
    out = tmp_path / "e"
    proc = _start("export", tiny_model, "-o", out, "--components", "vae_decoder")
    line = proc.stdout.readline()
    assert line.strip() == f"{out}/manifest.json", (line, proc.communicate(timeout=60))
    sent = 0
    while proc.poll() is None:
        proc.send_signal(sig)
        sent += 1
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60)
    assert sent, "the process had ended before the first signal: the test checks nothing"
    if proc.returncode == 0:
        assert "interrupted" not in err, err
    else:
        assert proc.returncode == 128 + sig, (proc.returncode, err)
        name = signal.Signals(sig).name
        assert err.strip().splitlines()[-1] == (f"interrupted ({name}) after sdexport export had written {out} "
                                                "(committed before the interrupt: complete)"), err
    assert "Traceback" not in err
    assert set(verify_whole(out)["components"]) == {"vae_decoder"}


def test_a_signal_at_the_commit_point_is_delivered_after_it(fresh_export, tiny_model, monkeypatch):
    """A real SIGINT right after the journal's rename (the commit point), before the transaction marked itself
    committed: it ran as the signal came, so abandon() deleted the staging area the journal moves from, and the
    next command applied a journal whose new files were gone. The commit now holds signals back until the new
    export is in place: none is pending after exit 130, and the export is whole."""
    real = mf.write_json

    def write_json(path, data):
        real(path, data)
        if Path(path).name == mf.JOURNAL_NAME:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(mf, "write_json", write_json)
    result = run_cli("export", tiny_model, "-o", fresh_export, "--components", "vae_decoder", "--force")
    assert result.exit_code == 130, result.stderr
    assert "committed before the interrupt" in result.stderr.strip().splitlines()[-1], result.stderr
    names = {p.name for p in fresh_export.iterdir()}
    assert mf.JOURNAL_NAME not in names and not any(_leftover(Path(n)) for n in names), names
    verify_whole(fresh_export)


@pytest.mark.parametrize("damage", ["empty", "missing", "foreign"])
def test_a_model_without_its_tokenizer_is_refused(tiny_model, tmp_path, damage):
    """Without its tokenizer every prompt would give the same image: refused before anything is written."""
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    folder = model / "tokenizer"
    if damage == "foreign":  # a tokenizer with more tokens than the text encoder's vocabulary
        vocab = json.loads((folder / "vocab.json").read_text())
        vocab.update({f"extra{i}</w>": len(vocab) + i for i in range(10)})
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "tokenizer.json").unlink(missing_ok=True)
    else:
        shutil.rmtree(folder)
        if damage == "empty":
            folder.mkdir()
    out = tmp_path / "e"
    result = run_cli("export", model, "-o", out)
    assert_error(result, 3, "tokenizer")
    assert not (out / "manifest.json").exists()
