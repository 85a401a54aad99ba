"""Export: Optimum layout and names, dynamic axes, manifest, checker, up-to-date skip, FP16 graph."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import LOCK_NAMES, load_manifest
from sdexport.components import Geometry
from sdexport.runtime import ExportDir

OPTIMUM_IO = {
    "text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"]),
    "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
    "vae_decoder": (["latent_sample"], ["sample"]),
    "vae_encoder": (["sample"], ["latent_parameters"]),
}


def test_optimum_layout_and_names(export_fp32):
    for part in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json"):
        assert (export_fp32 / part).is_file(), part
    for name, (inputs, outputs) in OPTIMUM_IO.items():
        model = onnx.load(export_fp32 / name / "model.onnx")
        assert [i.name for i in model.graph.input] == inputs
        assert [o.name for o in model.graph.output] == outputs
        assert (export_fp32 / name / "config.json").is_file()
        onnx.checker.check_model(str(export_fp32 / name / "model.onnx"), full_check=True)


def test_dynamic_axes_are_named(export_fp32):
    def dims(model, name):
        value = next(v for v in list(model.graph.input) + list(model.graph.output) if v.name == name)
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    unet = onnx.load(export_fp32 / "unet" / "model.onnx")
    assert dims(unet, "sample") == ["batch", 4, "latent_height", "latent_width"]
    assert dims(unet, "timestep") == ["batch"]
    assert dims(unet, "encoder_hidden_states") == ["batch", 77, 32]
    vae_enc = onnx.load(export_fp32 / "vae_encoder" / "model.onnx")
    assert dims(vae_enc, "sample") == ["batch", 3, "image_height", "image_width"]
    text = onnx.load(export_fp32 / "text_encoder" / "model.onnx")
    assert dims(text, "input_ids") == ["batch", 77]
    assert text.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT32


def test_manifest_records_hashes_io_ranges_and_provenance(export_fp32, tiny_model):
    manifest = load_manifest(export_fp32)
    assert set(manifest["components"]) == set(OPTIMUM_IO)
    for name, entry in manifest["components"].items():
        data = (export_fp32 / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert entry["source"]["path"] == str(tiny_model.resolve())
        assert len(entry["source"]["weights_sha256"]) == 64
        for lib in ("torch", "diffusers", "onnx", "sdexport"):
            assert entry["versions"][lib]
        assert [i["name"] for i in entry["inputs"]] == OPTIMUM_IO[name][0]
        assert entry["axes"]["batch"]["min"] == 1
    unet = manifest["components"]["unet"]
    assert unet["axes"]["latent_height"] == {"min": 8, "opt": 16, "max": 32, "multiple": 2}
    assert unet["profile"]["sample"] == [[1, 4, 8, 8], [2, 4, 16, 16], [8, 4, 32, 32]]
    assert manifest["ranges"] == {"max_images": 4, "min_size": 64, "max_size": 256, "opt_size": 128,
                                  "pixel_multiple": 16}


def test_unchanged_export_is_not_redone(export_fp32, tiny_model):
    from sdexport.export import export

    before = {p: p.stat().st_mtime_ns for p in export_fp32.rglob("model.onnx")}
    messages = []
    export(str(tiny_model), export_fp32, say=messages.append)
    assert sum("up to date" in m for m in messages) == 4
    assert {p: p.stat().st_mtime_ns for p in export_fp32.rglob("model.onnx")} == before


def test_other_model_exports_with_its_own_shapes(export_other):
    manifest = load_manifest(export_other)
    unet = manifest["components"]["unet"]
    assert unet["inputs"][0]["dims"] == ["batch", 6, "latent_height", "latent_width"]
    assert unet["inputs"][2]["dims"] == ["batch", 77, 48]
    assert unet["axes"]["latent_height"]["multiple"] == 4
    assert manifest["components"]["vae_encoder"]["outputs"][0]["dims"] == ["batch", 12, "image_height / 4",
                                                                           "image_width / 4"]
    assert manifest["components"]["vae_decoder"]["outputs"][0]["dims"] == ["batch", 3, "latent_height * 4",
                                                                           "latent_width * 4"]
    assert manifest["ranges"]["pixel_multiple"] == 16 and manifest["ranges"]["opt_size"] == 96


def test_tokenizer_written_by_transformers_5_gets_the_files_transformers_4_reads(export_other, other_model, tmp_path):
    """transformers 5 saves a tokenizer as tokenizer.json alone; transformers 4 (Optimum's environment) reads
    vocab.json + merges.txt. The export holds both, and the pair alone tokenizes as the source does."""
    import shutil

    from transformers import CLIPTokenizer

    assert not (other_model / "tokenizer" / "vocab.json").exists()  # the case: a directory transformers 5 wrote
    alone = tmp_path / "tokenizer"
    alone.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(export_other / "tokenizer" / name, alone / name)
    theirs = CLIPTokenizer.from_pretrained(other_model / "tokenizer")
    ours = CLIPTokenizer.from_pretrained(alone)
    for prompt in ("a cabin in a snowy forest", "Ünïcödé café, 東京 at 3am!!", ""):
        assert ours(prompt, padding="max_length", max_length=77).input_ids == \
            theirs(prompt, padding="max_length", max_length=77).input_ids
    files = load_manifest(export_other)["files"]
    for name in ("vocab.json", "merges.txt"):
        assert files[f"tokenizer/{name}"] == hashlib.sha256((export_other / "tokenizer" / name).read_bytes()).hexdigest()


def test_disk_check_counts_the_derived_tokenizer_files(other_model, export_other, monkeypatch):
    """The pipeline files the disk check counts are what the export writes of them, derived files included."""
    from sdexport import limits
    from sdexport.export import check_export_space
    from sdexport.manifest import Manifest
    from sdexport.models import ModelInfo

    needs = []
    monkeypatch.setattr(limits, "check_disk", lambda path, need, what: needs.append(need))
    check_export_space(ModelInfo.open(other_model), {}, [], "fp32", export_other, Manifest(export_other), {})
    written = sum((export_other / rel).stat().st_size for rel in load_manifest(export_other)["files"])
    assert len(needs) == 1 and written <= needs[0] < written + 1024  # the source's model_index.json is a bit longer


def _elem_types(model):
    model = onnx.shape_inference.infer_shapes(model)
    return {v.name: v.type.tensor_type.elem_type for v in
            list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}


def test_fp16_graph_keeps_sensitive_ops_fp32(export_fp16):
    model = onnx.load(export_fp16 / "unet" / "model.onnx")
    types = _elem_types(model)
    by_op = {}
    for node in model.graph.node:
        by_op.setdefault(node.op_type, []).append(types.get(node.output[0]))
    FP16, FP32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert by_op["Conv"].count(FP16) >= 0.9 * len(by_op["Conv"])
    assert by_op["MatMul"].count(FP16) >= 0.5 * len(by_op["MatMul"])
    for op in ("Softmax", "InstanceNormalization", "LayerNormalization"):
        assert set(by_op[op]) == {FP32}, op
    time_nodes = [n for n in model.graph.node if "time_proj" in n.name and n.op_type in ("Sin", "Cos", "Mul")]
    assert time_nodes and all(types[n.output[0]] == FP32 for n in time_nodes)
    assert model.graph.input[0].type.tensor_type.elem_type == FP32  # I/O stays FP32


@pytest.mark.parametrize("fixture,component,scale", [("export_fp32", "vae_decoder", 300.0),
                                                     ("export_sdxl", "unet", 50.0),
                                                     ("export_fp32", "text_encoder", 1.0)])
def test_own_reference_run_gives_autocasts_graph(request, fixture, component, scale):
    """sdexport measures the activations itself and hands AutoCast the nodes to keep (its own reference run
    needs several copies of the weighted model: precision's docstring). The FP16 graph must be byte for byte
    the one AutoCast makes with its own run on the same inputs, with nodes kept for their values: inputs scaled
    up so that some exceed data_max (the VAE's first convolution, SDXL's time and size embeddings), and token
    ids (integers above 512) for the text encoder."""
    from sdexport.components import FP32_OP_TYPES
    from sdexport.precision import _autocast, canonical_input_casts, convert_fp16, out_of_range_nodes

    export = ExportDir.open(request.getfixturevalue(fixture))
    spec = export.spec(component)
    feed = {k: v * scale if v.is_floating_point() else v for k, v in spec.sample_inputs(spec.min_dims()).items()}
    path = export.root / component / "model.onnx"
    kept = out_of_range_nodes(path, feed)
    assert kept
    if component != "text_encoder":  # nodes that neither an op type nor a name pattern keeps
        assert any(n for n in kept if "time_proj" not in n and "time_embed" not in n), kept
    ours = convert_fp16(path, spec, feed)
    calib = request.getfixturevalue("tmp_path") / "calib.npz"
    np.savez(calib, **{k: v.numpy() for k, v in feed.items()})
    theirs = _autocast()(onnx_path=str(path), low_precision_type="fp16", keep_io_types=True,
                         op_types_to_exclude=list(FP32_OP_TYPES), nodes_to_exclude=list(spec.fp32_node_patterns),
                         calibration_data=str(calib), providers=["cpu"])
    # the input Casts' order, which AutoCast takes from a set, is made canonical (test below)
    assert ours.SerializeToString() == canonical_input_casts(theirs).SerializeToString()


def test_fp16_graph_is_the_same_in_every_process(export_fp32):
    """Release pipelines compare artifact hashes: the FP16 UNet must not depend on the process's string hash
    seed. AutoCast alone orders the Casts of the graph inputs by a set of names, so its graph differs between
    seeds (checked here, so that the test fails if that premise goes); sdexport's does not, and computes the
    same outputs."""
    import subprocess
    import sys

    import conftest

    script = (
        "import hashlib, sys\n"
        "from pathlib import Path\n"
        "from sdexport import precision\n"
        "from sdexport.runtime import ExportDir\n"
        "export = ExportDir.open(sys.argv[1])\n"
        "spec = export.spec('unet')\n"
        "path = export.root / 'unet' / 'model.onnx'\n"
        "ours = precision.convert_fp16(path, spec)\n"
        "own = precision._autocast()(onnx_path=str(path), low_precision_type='fp16', keep_io_types=True,\n"
        "    op_types_to_exclude=list(precision.FP32_OP_TYPES), nodes_to_exclude=list(spec.fp32_node_patterns),\n"
        "    data_max=float('inf'), providers=['cpu'])\n"
        "print(hashlib.sha256(ours.SerializeToString()).hexdigest(), hashlib.sha256(own.SerializeToString()).hexdigest())\n"
    )
    hashes = []
    for seed in (1, 2, 3):
        done = subprocess.run([sys.executable, "-c", script, str(export_fp32)], capture_output=True, text=True,
                              timeout=300, env=conftest.sdexport_env(PYTHONHASHSEED=seed))
        assert done.returncode == 0, done.stderr[-2000:]
        hashes.append(done.stdout.split()[-2:])
    assert len({ours for ours, _ in hashes}) == 1, hashes
    assert len({own for _, own in hashes}) > 1, hashes

    from sdexport import precision

    export = ExportDir.open(export_fp32)
    spec = export.spec("unet")
    path = export.root / "unet" / "model.onnx"
    own = precision._autocast()(onnx_path=str(path), low_precision_type="fp16", keep_io_types=True,
                                op_types_to_exclude=list(precision.FP32_OP_TYPES),
                                nodes_to_exclude=list(spec.fp32_node_patterns), data_max=float("inf"),
                                providers=["cpu"])
    feed = {k: v.numpy() for k, v in spec.sample_inputs(spec.opt_dims(), seed=3).items()}
    want = ort.InferenceSession(own.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    canonical = precision.canonical_input_casts(own)
    got = ort.InferenceSession(canonical.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    assert [n.op_type for n in canonical.graph.node[:3]] == ["Cast"] * 3
    np.testing.assert_array_equal(got[0], want[0])


def test_reference_run_reads_a_graph_labelled_with_a_newer_ir_version(export_fp32, tmp_path):
    """AutoCast lowers the IR version to what ONNX Runtime reads (10) before its own reference run; sdexport's
    run does the same, so a graph labelled by a tool newer than this ONNX Runtime gives the same nodes to keep
    (ONNX Runtime refuses the relabelled graph when it is run as it is)."""
    import onnx

    from sdexport.precision import out_of_range_nodes

    export = ExportDir.open(export_fp32)
    spec = export.spec("vae_decoder")
    feed = {k: v * 300.0 for k, v in spec.sample_inputs(spec.min_dims()).items()}
    source = export.root / "vae_decoder" / "model.onnx"
    model = onnx.load(str(source))
    model.ir_version = 99
    newer = tmp_path / "model.onnx"
    onnx.save(model, str(newer))
    with pytest.raises(Exception, match="IR version"):
        ort.InferenceSession(str(newer), providers=["CPUExecutionProvider"])
    assert out_of_range_nodes(newer, feed) == out_of_range_nodes(source, feed) != []


def test_fp16_conversion_reports_progress(export_fp32, monkeypatch, capsys):
    """AutoCast says nothing for minutes on a real UNet (713 s for SDXL's): the conversion says what the
    reference run kept, then a line every PROGRESS_EVERY_S until AutoCast returns, also through INT8's
    _quiet (which hides AutoCast's own output), and leaves no thread behind. The graph is the same as
    without progress."""
    import sys
    import threading
    import time

    from sdexport import precision, quantize

    export = ExportDir.open(export_fp32)
    spec = export.spec("vae_decoder")
    feed = {k: v * 300.0 for k, v in spec.sample_inputs(spec.min_dims()).items()}
    path = export.root / "vae_decoder" / "model.onnx"
    kept = precision.out_of_range_nodes(path, feed)
    assert kept
    quiet_graph = precision.convert_fp16(path, spec, feed).SerializeToString()

    real = precision._autocast

    def slow_autocast():
        convert = real()
        return lambda **kw: (time.sleep(0.5), convert(**kw))[1]

    monkeypatch.setattr(precision, "_autocast", slow_autocast)
    monkeypatch.setattr(precision, "PROGRESS_EVERY_S", 0.1)
    lines: list[str] = []
    graph = precision.convert_fp16(path, spec, feed, say=lines.append)
    assert graph.SerializeToString() == quiet_graph
    assert lines[0].startswith("vae_decoder: reference run (latent_sample 1x4x")
    assert f": {len(kept)} node(s) above |512| kept FP32" in lines[0]
    ticks = lines[1:]
    assert len(ticks) >= 3 and all(t.startswith("vae_decoder: still converting (") for t in ticks), lines
    assert not [t for t in threading.enumerate() if t.name == "sdexport-progress"]

    capsys.readouterr()
    quantize._fp16(path, spec, say=lambda msg: print(msg, file=sys.stderr))
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("vae_decoder: reference run (latent_sample 1x4x"), err
    assert len(err) >= 3 and all(line.startswith("vae_decoder: still converting (") for line in err[1:]), err


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_fp16_error_against_fp32_torch(export_fp16, tiny_model, component):
    """FP16 graph vs the FP32 PyTorch model at shapes chosen here (not the validate command's)."""
    export = ExportDir.open(export_fp16)
    spec = export.spec(component)
    module = spec.wrap(export.source_model().load_torch(spec.source)).eval()
    session = ort.InferenceSession(str(export_fp16 / component / "model.onnx"), providers=["CPUExecutionProvider"])
    for seed, geo in enumerate([Geometry(1, 80, 112), Geometry(3, 144, 96), Geometry(2, 240, 64, guidance=False)]):
        feed = spec.sample_inputs(spec.dims_for(geo), seed=seed)
        with torch.no_grad():
            want = module(*feed.values())
        want = [want] if isinstance(want, torch.Tensor) else list(want)
        got = session.run(None, {k: v.numpy() for k, v in feed.items()})
        for w, g in zip(want, got):
            assert g.shape == tuple(w.shape)
            rel = np.linalg.norm(g - w.numpy()) / np.linalg.norm(w.numpy())
            assert rel < 1e-2, (component, geo, rel)


def _tree(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in LOCK_NAMES}


def test_another_export_into_an_export_replaces_only_what_it_names(tiny_model, other_model, tmp_path):
    """An export of another model (or dtype, ranges, LoRAs) into an existing export: without --force it is
    refused (the two would mix); with --force it replaces the whole export, so it is refused too while
    --components leaves out a component it would delete (a README way out once lost a user's UNet so), and
    done when every component is named. A refusal leaves every file as it was."""
    from conftest import assert_error, run_cli

    out = tmp_path / "e"
    parts = "text_encoder,unet,vae_decoder"
    assert run_cli("export", tiny_model, "-o", out, "--components", parts).exit_code == 0
    before = _tree(out)
    assert_error(run_cli("export", other_model, "-o", out, "--components", "text_encoder"), 2,
                 "would mix the two", "unet, vae_decoder would stay", only_line=True)
    assert _tree(out) == before
    assert_error(run_cli("export", other_model, "-o", out, "--components", "text_encoder", "--force"), 2,
                 "would delete unet, vae_decoder, which --components leaves out",
                 f"--components text_encoder,unet,vae_decoder", only_line=True)
    assert _tree(out) == before
    result = run_cli("export", other_model, "-o", out, "--components", parts, "--force")
    assert result.exit_code == 0, result.stderr
    manifest = load_manifest(out)
    assert sorted(manifest["components"]) == sorted(parts.split(","))
    assert manifest["model"]["path"] == str(other_model.resolve())


def test_another_export_is_refused_where_any_built_engine_would_stay(tiny_model, trt, tmp_path):
    """Every kind of engine built from the components (a TensorRT plan, the ONNX Runtime CUDA variant) keeps
    an export of another range from replacing it without --force (the ORT variant used to be deleted
    silently); the refusal names each and changes nothing, and --force replaces them all."""
    from conftest import assert_error, run_cli

    out = tmp_path / "e"
    assert run_cli("export", tiny_model, "-o", out).exit_code == 0
    assert run_cli("build", out, "--precision", "fp32", "--components", "text_encoder").exit_code == 0
    assert run_cli("build", out, "--backend", "ort", "--components", "vae_decoder").exit_code == 0
    before = _tree(out)
    assert_error(run_cli("export", tiny_model, "-o", out, "--max-batch", "2"), 2, "would mix the two",
                 "(engines/text_encoder, ort_cuda/vae_decoder would stay", only_line=True)
    assert _tree(out) == before
    result = run_cli("export", tiny_model, "-o", out, "--max-batch", "2", "--force")
    assert result.exit_code == 0, result.stderr
    manifest = load_manifest(out)
    assert not manifest["engines"] and not manifest.get("ort_cuda")
    assert not list((out / "engines").glob("*.plan")) and not list((out / "ort_cuda").rglob("*.onnx"))
    assert not _empty_dirs(out)


@pytest.fixture(scope="module")
def export_with_engines(export_fp32, trt, tmp_path_factory):
    """The tiny FP32 export with a TensorRT plan of its text encoder and the ONNX Runtime CUDA variant of its VAE
    decoder (both made without a GPU). Read-only: copy it."""
    from conftest import run_cli

    out = shutil.copytree(export_fp32, tmp_path_factory.mktemp("built") / "e")
    assert run_cli("build", out, "--precision", "fp32", "--components", "text_encoder").exit_code == 0
    assert run_cli("build", out, "--backend", "ort", "--components", "vae_decoder").exit_code == 0
    return out


BUILT = ("engines/text_encoder", "ort_cuda/vae_decoder")


def _built_files(out) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in list((out / "engines").glob("*.plan"))
                  + list((out / "ort_cuda").rglob("*.onnx")) if p.is_file()) if out.is_dir() else []


@pytest.mark.parametrize("change", ["opset", "sdexport version", "damaged file", "max-batch", "dtype", "model"])
def test_every_reexport_that_would_drop_built_engines_asks_for_force(export_with_engines, tiny_model, other_model,
                                                                      tmp_path, monkeypatch, change):
    """Whatever makes export write a component anew (another opset, another sdexport, a component whose files
    no longer match the manifest, other ranges, dtype or model), the engines built from the old one would go: a
    re-export with only another --opset used to drop the TensorRT plan and the ORT CUDA variant silently (exit
    0). Each is refused without --force in one line that names what would be dropped and --force, changing
    nothing; with --force the engines go, files and manifest entries alike."""
    from conftest import assert_error, run_cli

    import sdexport.export as export_module

    out = shutil.copytree(export_with_engines, tmp_path / "e")
    model, args, why = tiny_model, [], []
    if change == "opset":
        args, why = ["--opset", "18"], ["opset 17 -> 18", "--opset 17"]
    elif change == "sdexport version":
        monkeypatch.setattr(export_module, "__version__", "99.0")
        why = ["-> 99.0"]
    elif change == "damaged file":
        for name in ("text_encoder", "vae_decoder"):
            with open(out / name / "model.onnx", "ab") as f:
                f.write(b"\0")
        why = ["files differ from the manifest"]
    elif change == "max-batch":
        args, why = ["--max-batch", "2"], ["would mix the two"]
    elif change == "dtype":
        args, why = ["--dtype", "fp16"], ["would mix the two"]
    else:
        model, args, why = other_model, ["--max-batch", "2"], ["would mix the two"]
    before = _tree(out)
    assert_error(run_cli("export", model, "-o", out, *args), 2, *BUILT, "--force", *why, only_line=True)
    assert _tree(out) == before
    result = run_cli("export", model, "-o", out, *args, "--force")
    assert result.exit_code == 0, result.stderr
    manifest = load_manifest(out)
    assert not any(manifest.get(section) for section in ("engines", "ort_cuda", "inductor")), manifest
    assert _built_files(out) == [] and not _empty_dirs(out), (_built_files(out), _empty_dirs(out))
    if change == "opset":
        assert {c["opset"] for c in manifest["components"].values()} == {18}


def test_a_reexport_that_drops_nothing_built_is_not_refused(export_with_engines, tiny_model, tmp_path):
    """The neighbours of the rule: an unchanged re-export is a no-op that keeps every engine; one with another
    --opset for a component nothing was built from re-exports that one alone, without --force, and keeps the
    engines of the others."""
    from conftest import run_cli

    out = shutil.copytree(export_with_engines, tmp_path / "e")
    before = _tree(out)
    result = run_cli("export", tiny_model, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("up to date") == 4, result.stderr
    assert _tree(out) == before
    result = run_cli("export", tiny_model, "-o", out, "--opset", "18", "--components", "unet")
    assert result.exit_code == 0, result.stderr
    manifest = load_manifest(out)
    assert manifest["components"]["unet"]["opset"] == 18 and manifest["components"]["text_encoder"]["opset"] == 17
    assert sorted(manifest["engines"]) == ["text_encoder"] and sorted(manifest["ort_cuda"]) == ["vae_decoder"]
    after = _tree(out)
    assert {k: v for k, v in after.items() if not k.startswith(("unet/", "manifest.json"))} == \
        {k: v for k, v in before.items() if not k.startswith(("unet/", "manifest.json"))}
    assert len(_built_files(out)) == 2


def _empty_dirs(root) -> list[str]:
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*")) if p.is_dir() and not any(p.iterdir())]


def test_reexport_removes_a_dropped_ort_cuda_variant_whole(tiny_model, export_fp32, tmp_path):
    """A re-export of a component drops the ONNX Runtime CUDA variant built from it: its files went, and the
    empty ort_cuda/vae_decoder/ and ort_cuda/ folders stayed behind. Now what is dropped goes whole, in the
    export's transaction: no empty folder, and the manifest names no variant."""
    from conftest import run_cli

    from sdexport.ort_cuda import prepare

    out = shutil.copytree(export_fp32, tmp_path / "e")
    prepare(out, components=("vae_decoder",))
    assert (out / "ort_cuda" / "vae_decoder" / "model.onnx").is_file() and not _empty_dirs(out)
    result = run_cli("export", tiny_model, "-o", out, "--components", "vae_decoder", "--force")
    assert result.exit_code == 0, result.stderr
    assert not load_manifest(out).get("ort_cuda")
    assert not (out / "ort_cuda").exists()
    assert not _empty_dirs(out), _empty_dirs(out)


def test_force_replaces_an_export_of_a_model_with_other_components(tiny_model, sdxl_tiny_model, tmp_path):
    """--force into an export of another family: a component the new model does not have (SDXL's
    text_encoder_2 under an SD model) is not one --components "leaves out" (no --components can name it), so
    --force replaces the export instead of asking for a --components that is refused as unknown."""
    from conftest import assert_error, run_cli

    out = tmp_path / "e"
    assert run_cli("export", sdxl_tiny_model, "-o", out, "--components", "text_encoder_2").exit_code == 0
    assert_error(run_cli("export", tiny_model, "-o", out, "--components", "text_encoder"), 2,
                 "would mix the two", only_line=True)
    result = run_cli("export", tiny_model, "-o", out, "--components", "text_encoder", "--force")
    assert result.exit_code == 0, result.stderr
    manifest = load_manifest(out)
    assert sorted(manifest["components"]) == ["text_encoder"] and manifest["model"]["family"] == "sd"
    assert not (out / "text_encoder_2").exists()


def test_tokenizer_json_whose_merges_hold_a_space_gets_no_merges_txt(tmp_path):
    """merges.txt separates a merge's two parts by a space: a BPE whose merges hold one (tokenizers writes
    merges as pairs for exactly that) cannot be written as the pair, so none is derived; its neighbour without
    one is."""
    import json

    from sdexport.models import vocab_and_merges_from_tokenizer_json

    def derived(merges):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        vocab = {"a": 0, "b": 1, " ": 2, "a b": 3, "ab": 4}
        (folder / "tokenizer.json").write_text(json.dumps(
            {"model": {"type": "BPE", "vocab": vocab, "merges": merges}, "added_tokens": []}))
        return vocab_and_merges_from_tokenizer_json(folder)

    assert derived([["a", " "], ["a ", "b"]]) == {}
    assert derived(["a b"])["merges.txt"] == "#version: 0.2\na b\n"
    assert derived([["a", "b"]])["merges.txt"] == "#version: 0.2\na b\n"


def test_unnamed_node_out_of_range_falls_back_to_autocasts_own_run(tmp_path):
    """AutoCast names unnamed nodes before it matches name patterns, so a node without a name that the reference
    run finds out of range can only be kept by AutoCast's own run: convert_fp16 falls back to it (a graph of
    another tool; sdexport's graphs name every node), and gives AutoCast's graph; named nodes keep sdexport's."""
    from types import SimpleNamespace

    from onnx import TensorProto, helper, numpy_helper

    from sdexport.components import FP32_OP_TYPES
    from sdexport.precision import _autocast, canonical_input_casts, convert_fp16, out_of_range_nodes

    def graph(names):
        weight = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 1000, "w")
        nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name=names[0]),
                 helper.make_node("Relu", ["a"], ["b"], name=names[1]),
                 helper.make_node("Add", ["b", "x"], ["y"], name=names[2])]
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("x", "y")]
        return helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], [weight]),
                                 opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    spec = SimpleNamespace(name="g", fp32_node_patterns=())
    feed = {"x": torch.ones(1, 4)}
    for names in (["mm", "relu", "add"], ["mm", "", "add"], ["", "", ""]):
        path = tmp_path / f"{'-'.join(n or '_' for n in names)}.onnx"
        onnx.save(graph(names), str(path))
        assert set(out_of_range_nodes(path, feed)) == set(names)  # 1000 everywhere after the MatMul
        np.savez(tmp_path / "c.npz", x=feed["x"].numpy())
        theirs = _autocast()(onnx_path=str(path), low_precision_type="fp16", keep_io_types=True,
                             op_types_to_exclude=list(FP32_OP_TYPES), nodes_to_exclude=[],
                             calibration_data=str(tmp_path / "c.npz"), providers=["cpu"])
        ours = convert_fp16(path, spec, feed).SerializeToString()
        assert ours == canonical_input_casts(theirs).SerializeToString(), names
