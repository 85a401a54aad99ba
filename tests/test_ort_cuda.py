"""The ONNX Runtime CUDA variant: ORT's fusions are applied (checked on the graph; its contrib kernels
run on CUDA only) and it stays out of the portable export."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from click.testing import CliRunner

from sdexport.backends import load_engines
from sdexport.cli import cli
from sdexport.ort_cuda import prepare


@pytest.fixture(scope="module")
def prepared(export_fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("ortcuda") / "exp"
    shutil.copytree(export_fp32, out)
    prepare(out)
    return out


def test_fusions_are_applied(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    unet = manifest["ort_cuda"]["unet"]
    # every attention of the tiny UNet (2 transformer blocks x self/cross) becomes one fused op
    assert unet["fused_ops"]["MultiHeadAttention"] >= 4
    assert unet["fused_ops"]["NhwcConv"] >= 10 and unet["fused_ops"].get("GroupNorm", 0) + unet["fused_ops"].get(
        "SkipGroupNorm", 0) >= 10
    model = onnx.load(prepared / unet["file"])
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # I/O stays FP32
    assert len({n.name for n in model.graph.node}) == len(model.graph.node)  # unique names (ORT refuses dups)
    # the portable export is untouched: no contrib ops there
    plain = onnx.load(prepared / "unet" / "model.onnx")
    assert not [n for n in plain.graph.node if n.domain == "com.microsoft"]


def test_second_prepare_is_up_to_date(prepared):
    messages = []
    report = prepare(prepared, say=messages.append)
    assert sum("up to date" in m for m in messages) == 2  # UNet and VAE; the text encoder is not fused by default
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert sorted(manifest["ort_cuda"]) == ["unet", "vae_decoder"]
    assert (report["built"], report["up_to_date"], report["held"]) == ([], ["unet", "vae_decoder"],
                                                                       ["unet", "vae_decoder"])
    from conftest import run_cli

    # build's line: what this command built and what the export holds ("ort_cuda variant of unet, vae_decoder"
    # named every variant held, as if this command had made them)
    result = run_cli("build", prepared, "--backend", "ort", "--components", "vae_decoder")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == (f"{prepared}/manifest.json: 0 built, 1 up to date; the export holds 2 ONNX "
                                     "Runtime CUDA variant(s): unet, vae_decoder")


def test_build_prints_only_its_own_progress_lines(export):
    """build --backend ort printed ONNX Runtime's optimizer's tqdm bars ("fusion: 11%|█ | 2/18 ...") between its
    own lines. Now stderr holds sdexport's lines only, the fusions are the same, and tqdm is left as it was."""
    import tqdm

    from conftest import run_cli

    bar = tqdm.tqdm
    result = run_cli("build", export, "--backend", "ort", "--components", "vae_decoder")
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("ort-cuda vae_decoder: ") for line in lines), lines
    assert "fusion:" not in result.stderr and "it/s" not in result.stderr and "\r" not in result.stderr
    fused = json.loads((export / "manifest.json").read_text())["ort_cuda"]["vae_decoder"]["fused_ops"]
    assert fused.get("GroupNorm", 0) + fused.get("SkipGroupNorm", 0) >= 10  # the optimizer ran as before
    assert tqdm.tqdm is bar


def test_cpu_engines_keep_the_portable_graph(prepared):
    engine = load_engines(prepared, "ort", components=["unet"])["unet"]
    assert engine.variant == "plain"


def test_cuda_graph_needs_a_gpu(prepared):
    result = CliRunner().invoke(cli, ["bench", str(prepared), "--cuda-graph", "--device", "cpu"])
    assert result.exit_code == 2 and "CUDA device" in result.stderr


def test_cuda_session_gets_a_real_stream_and_no_end_of_run_sync(export_fp32, monkeypatch):
    """Guards the H200 finding (benchmarks/results/2026-11-22-h200-ort-stream-probe): ONNX Runtime ignores
    stream handle 0 and then races torch. The CUDA engine must hand ORT a stream of its own (never 0) and
    disable ORT's end-of-run sync (ordering is by events). Checked here with ORT and CUDA stubbed out."""
    import onnxruntime as ort
    import torch

    from sdexport.backends.ort import OrtEngine
    from sdexport.runtime import ExportDir

    seen = {}

    class FakeStream:
        cuda_stream = 0x5eed

        def __init__(self, device=None):
            seen["stream_device"] = device

    class FakeSession:
        def __init__(self, path, opts, providers):
            seen["providers"] = providers

        def get_outputs(self):
            return []

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(ort, "preload_dlls", lambda: None, raising=False)
    engine = OrtEngine(ExportDir.open(export_fp32), "unet", device="cuda:0")
    name, options = seen["providers"][0]
    assert name == "CUDAExecutionProvider"
    assert options["user_compute_stream"] == str(0x5eed) != "0"
    assert engine.run_options.get_run_config_entry("disable_synchronize_execution_providers") == "1"


def _geglu(width: int, left_end: int | None = None):
    """MatMul -> Add(bias) -> Slice/Slice -> Gelu -> Mul, constant Slice bounds (as our export writes GEGLU)."""
    import numpy as np
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    half, hidden = width // 2, 8
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((hidden, width)).astype(np.float32), "W"),
             nh.from_array(rng.standard_normal(width).astype(np.float32), "bias"),
             nh.from_array(np.array([0]), "zero"), nh.from_array(np.array([half]), "half"),
             nh.from_array(np.array([left_end or half]), "left_end"),
             nh.from_array(np.array([np.iinfo(np.int64).max]), "end"), nh.from_array(np.array([-1]), "axis")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"]), helper.make_node("Add", ["bias", "mm"], ["a"]),
             helper.make_node("Slice", ["a", "zero", "left_end", "axis"], ["l"]),
             helper.make_node("Slice", ["a", "half", "end", "axis"], ["r"]),
             helper.make_node("Gelu", ["r"], ["g"], domain="com.microsoft"), helper.make_node("Mul", ["l", "g"], ["y"])]
    graph = helper.make_graph(nodes, "geglu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", half])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("width,left_end,fused", [(2560, None, True), (10240, None, True),
                                                  (256, None, False),  # BiasSplitGelu's kernel refuses 256
                                                  (2560, 1000, False)])  # not a half split
def test_geglu_with_constant_slices_becomes_bias_split_gelu(width, left_end, fused):
    """The H200 profile showed the GEGLU (bias Add, 2 Slices, Gelu, Mul) unfused: ORT's own pattern wants
    computed Slice bounds. _fuse_geglu must fuse the constant form, keep the bias and the MatMul output as
    the op's inputs, and leave widths the CUDA kernel rejects (or a split that is not in halves) alone."""
    import onnxruntime.transformers.optimizer  # noqa: F401  (puts ORT's fusion modules on the path)
    from onnxruntime.transformers.onnx_model import OnnxModel

    from sdexport.ort_cuda import _fuse_geglu

    model = OnnxModel(_geglu(width, left_end))
    counts = _fuse_geglu(model)
    ops = [n.op_type for n in model.model.graph.node]
    if fused:
        assert counts["BiasSplitGelu"] == 1 and ops == ["MatMul", "BiasSplitGelu"]
        node = model.model.graph.node[1]
        assert node.domain == "com.microsoft" and list(node.input) == ["mm", "bias"] and list(node.output) == ["y"]
    else:
        assert counts["BiasSplitGelu"] == 0 and ops == ["MatMul", "Add", "Slice", "Slice", "Gelu", "Mul"]


def test_components_the_variant_leaves_out_run_the_plain_export(prepared, export_fp32):
    """variant="ort_cuda" (what the GPU benchmarks ask for) means: the fused graph where one was prepared.
    The text encoder is not fused by default (its fused FP16 graph was wrong on the CUDA EP), so it must
    open the plain export; an export without any variant is a clear error naming the command."""
    from sdexport.backends.ort import OrtEngine
    from sdexport.errors import IntegrityError
    from sdexport.runtime import ExportDir

    engine = OrtEngine(ExportDir.open(prepared), "text_encoder", variant="ort_cuda")
    assert engine.variant == "plain" and engine.path.parent.name == "text_encoder"
    with pytest.raises(IntegrityError, match="--backend ort"):
        OrtEngine(ExportDir.open(export_fp32), "unet", variant="ort_cuda")


def test_variant_follows_the_exports_loras(prepared, tiny_model, tmp_path):
    """The variant is exported from the source model with the export's fused LoRAs (source_model): its
    rebuild key held the weights but not the LoRAs, so a variant made with other LoRAs (or none) was 'up to
    date' and the CUDA engine ran it. Now: prepare rebuilds it, and an engine refuses a variant whose LoRAs
    are not the export's. A LoRA never changes the VAE: its variant stays up to date and opens (it used to be
    rebuilt for every other LoRA set)."""
    from test_lora import _peft_lora

    from sdexport.backends.ort import OrtEngine
    from sdexport.errors import IntegrityError
    from sdexport.lora import open_loras
    from sdexport.ort_cuda import _key, check_variant
    from sdexport.runtime import ExportDir

    out = shutil.copytree(prepared, tmp_path / "e")
    data = json.loads((out / "manifest.json").read_text())
    assert data["ort_cuda"]["unet"]["key"]["loras"] == data["model"]["loras"] == []
    lora = _peft_lora(tiny_model, tmp_path / "l.safetensors", 1, ["to_q"])
    data["model"]["loras"] = [open_loras([f"{lora}:0.7"])[0].to_json()]  # as if re-exported keeping the variant
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="other fused LoRAs"):
        OrtEngine(ExportDir.open(out), "unet", variant="ort_cuda")
    assert _key(ExportDir.open(out), 17, "unet")["loras"] == data["model"]["loras"]  # prepare rebuilds it
    OrtEngine(ExportDir.open(out), "text_encoder", variant="ort_cuda")  # not in the variant: the plain export
    vae = data["ort_cuda"]["vae_decoder"]
    assert check_variant(ExportDir.open(out), "vae_decoder") == vae  # what the CUDA engine opens
    messages = []
    prepare(out, components=("vae_decoder",), say=messages.append)  # no LoRA part: no rebuild
    assert any("vae_decoder: up to date" in m for m in messages), messages
    assert json.loads((out / "manifest.json").read_text())["ort_cuda"]["vae_decoder"] == vae


def test_shape_switch_probe_counts_its_first_call_as_a_change(monkeypatch, tmp_path):
    """benchmarks/ort_shape_switch_probe.py warms each batch size up in ascending order, so its first timed call
    (size 1) follows the warm-up's last (the largest): a change of size, which must not be counted among the
    repeated ones (on the H100 it was: 466-661 ms in the 'repeated' medians of EXHAUSTIVE). Over stand-ins for
    the export, the engine and CUDA: the labels only."""
    import sys

    import torch

    import sdexport.backends.ort as ort_backend
    import sdexport.runtime as runtime
    from conftest import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import ort_shape_switch_probe as probe

    class Spec:
        def dims_for(self, geo):
            return {"batch": geo.images}

        def sample_inputs(self, dims, seed, device):
            return {"latent_sample": torch.zeros(dims["batch"])}

    class Export:
        manifest = type("M", (), {"data": {}})()

        def spec(self, component):
            return Spec()

    class Engine:
        def __init__(self, export, component, **kw):
            pass

        def __call__(self, feed):
            return {"sample": feed["latent_sample"] + 1}

        def close(self):
            pass

    monkeypatch.setattr(runtime.ExportDir, "open", classmethod(lambda cls, root: Export()))
    monkeypatch.setattr(ort_backend, "OrtEngine", Engine)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(sys, "argv", ["probe", "e", "--size", "64", "--out", str(tmp_path)])
    probe.main()
    result = json.loads((tmp_path / "ort_shape_switch_probe-vae_decoder.json").read_text())
    calls = result["runs"]["plain dynamic/EXHAUSTIVE"]["calls"]
    assert calls[0]["n"] != max(probe.SEQUENCE) and calls[0]["changed"] is True
    previous = [max(probe.SEQUENCE)] + [c["n"] for c in calls[:-1]]
    assert [c["changed"] for c in calls] == [n != p for n, p in zip((c["n"] for c in calls), previous)]
