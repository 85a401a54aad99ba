"""INT8: calibration capture, the Q/DQ graph's structure, its error against FP32 PyTorch, the manifest
entry, --unet int8 in infer/bench, the INT8 validation report, and every bad input."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from conftest import assert_error, run_cli, tensorrt_form_problems
from sdexport.calibration import DEFAULT_PROMPTS, Reservoir, load_calibration, load_prompts, select_prompts
from sdexport.components import Geometry
from sdexport.errors import UsageError
from sdexport.manifest import sha256_file
from sdexport.quantize import DEFAULT_EXCLUDES, INT8_REPORT_THRESHOLDS, psnr, ssim
from sdexport.runtime import ExportDir

# The documented bound (README "INT8") for the INT8 UNet against the FP32 PyTorch UNet on the tiny preset.
INT8_REL_L2 = 0.15
COMPUTE = ("Conv", "MatMul", "Gemm")


run = run_cli
assert_one_line_error = assert_error


def save_calib(path, arrays, meta):
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)


def raw_calib(path):
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads(str(arrays.pop("meta")))


# --- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib(tiny_model, tmp_path_factory):
    """4 prompts x 4 PNDM steps (5 UNet calls each, PLMS repeats one) x 2 guidance rows = 40 samples."""
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    result = run("calibrate", tiny_model, "--num-prompts", 4, "--steps", 4, "--seed", 3, "-o", path)
    assert result.exit_code == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def int8_export(export_fp32, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "tiny"
    shutil.copytree(export_fp32, out)
    result = run("quantize", out, "--calib", calib, "--precision", "int8")
    assert result.exit_code == 0, result.stderr
    (out.parent / "quantize.stderr").write_text(result.stderr)  # test_fp16_lines_name_the_graph_they_convert
    return out


def graph_facts(path):
    """Everything the structure tests look at, derived here from the ONNX file (not from sdexport)."""
    model = onnx.load(path)
    typed = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(typed.graph.value_info) + list(typed.graph.input) + list(typed.graph.output)}
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return model, types, inits, producer, readers


# --- prompts and the bounded sample -----------------------------------------------------------
def test_prompt_file_comments_blank_lines_and_selection(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# a comment\n\n  a red kite  \n   \n#another\nblue sky\n# last\n")
    assert load_prompts(path) == ["a red kite", "blue sky"]
    shipped = load_prompts(DEFAULT_PROMPTS)
    assert len(shipped) == 362 and len(set(shipped)) == 362
    picked = select_prompts(shipped, 20, seed=0)
    assert len(set(picked)) == 20 and picked == select_prompts(shipped, 20, seed=0)
    assert picked != shipped[:20]  # drawn over the whole file, not its first (portrait) lines
    with pytest.raises(UsageError, match="only 362 prompts"):
        select_prompts(shipped, 363, seed=0)
    (tmp_path / "empty.txt").write_text("# nothing here\n\n")
    with pytest.raises(UsageError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")


def test_reservoir_is_bounded_and_uniform():
    res = Reservoir(capacity=7, seed=0)
    for start in range(0, 1000, 10):
        res.add({"x": np.arange(start, start + 10, dtype=np.int64)[:, None] * np.ones((1, 3), np.int64)})
    kept = res.arrays()["x"]
    assert res.seen == 1000 and kept.shape == (7, 3) and res.store["x"].shape == (7, 3)
    assert len(set(kept[:, 0])) == 7 and (kept[:, 0] == kept[:, 1]).all()  # rows stay whole
    hits = np.zeros(20)
    for trial in range(3000):
        r = Reservoir(5, seed=trial)
        r.add({"x": np.arange(20)})
        hits[r.arrays()["x"]] += 1
    assert np.allclose(hits / 3000, 5 / 20, atol=0.04), hits / 3000  # every row kept with p = 5/20


# --- capture -------------------------------------------------------------------------------------
def test_calibration_capture(calib, tiny_model):
    c = load_calibration(calib)
    a, meta = c.arrays, c.meta
    assert a["sample"].shape == (40, 4, 16, 16) and a["timestep"].shape == (40,)
    assert a["encoder_hidden_states"].shape == (40, 77, 32)
    assert {a[k].dtype for k in ("sample", "timestep", "encoder_hidden_states")} == {np.dtype("float32")}
    assert meta["rows_seen"] == 40 and meta["samples"] == 40 and meta["unet_calls"] == 20
    from sdexport.models import ModelInfo

    assert meta["model"]["weights_sha256"] == ModelInfo.open(tiny_model).weights_sha256
    assert meta["unet"] == {"in_channels": 4, "cross_attention_dim": 32, "sequence_length": 77,
                            "latent_height": 16, "latent_width": 16}
    # PNDM (the model's scheduler), 4 steps: PLMS runs 5 UNet calls at these timesteps.
    assert sorted(set(a["timestep"].tolist())) == [1.0, 251.0, 501.0, 751.0]
    assert np.bincount(a["step"]).tolist() == [8] * 5 and a["cond"].sum() == 20
    # Step 0 of prompt i sees diffusers' initial noise for seed 3 + i (init_noise_sigma 1, PNDM scaling 1).
    for i in range(4):
        rows = (a["prompt"] == i) & (a["step"] == 0)
        noise = torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(3 + i)).numpy()
        assert rows.sum() == 2 and np.array_equal(a["sample"][rows], np.concatenate([noise, noise]))
    # Negative rows carry the empty prompt's embedding (same for every prompt); positive rows differ.
    neg = a["encoder_hidden_states"][a["cond"] == 0]
    pos = a["encoder_hidden_states"][a["cond"] == 1]
    assert np.allclose(neg, neg[:1]) and not np.allclose(pos, pos[:1])


def test_calibrate_keeps_at_most_max_samples(tiny_model, tmp_path):
    path = tmp_path / "small.npz"
    result = run("calibrate", tiny_model, "--num-prompts", 2, "--steps", 2, "--max-samples", 5, "--scheduler",
                 "euler", "--height", 64, "--width", 96, "-o", path)
    assert result.exit_code == 0, result.stderr
    c = load_calibration(path)
    assert c.meta["rows_seen"] == 8 and c.samples == 5  # 2 prompts x 2 Euler steps x 2 rows, 5 kept
    assert c.arrays["sample"].shape == (5, 4, 8, 12) and c.meta["settings"]["scheduler"] == "EulerDiscreteScheduler"
    assert "5 samples of 8" in result.stdout


# --- the Q/DQ graph --------------------------------------------------------------------------------
def test_qdq_structure(int8_export):
    model, types, inits, producer, readers = graph_facts(int8_export / "unet_int8" / "model.onnx")
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    onnx.checker.check_model(str(int8_export / "unet_int8" / "model.onnx"), full_check=True)
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(qs) >= 40 and len(dqs) >= 100
    for n in qs + dqs:
        zp = inits[n.input[2]]
        assert zp.data_type == TensorProto.INT8 and not numpy_helper.to_array(zp).any(), n.name
        assert inits[n.input[1]].data_type == TensorProto.FLOAT16, n.name  # FP16 scales (opset 19)
    for q in qs:
        assert list(inits[q.input[1]].dims) == [], q.name  # per-tensor activation scale
        assert types[q.input[0]] == TensorProto.FLOAT16 and types[q.output[0]] == TensorProto.INT8
        assert {r.op_type for r in readers[q.output[0]]} == {"DequantizeLinear"}
    excluded_re = [p for p, _ in DEFAULT_EXCLUDES]
    weights = {"Conv": 0, "MatMul": 0}
    for dq in dqs:
        users = readers[dq.output[0]]
        assert users and all(u.op_type in COMPUTE for u in users), (dq.name, [u.op_type for u in users])
        assert types[dq.output[0]] == TensorProto.FLOAT16
        for u in users:
            assert not any(re.search(p, u.name) for p in excluded_re), u.name
        if dq.input[0] in inits:  # weight: INT8 initializer, per output channel
            w = inits[dq.input[0]]
            axis = next(a.i for a in dq.attribute if a.name == "axis")
            assert w.data_type == TensorProto.INT8
            (user,) = users
            want_axis = {"Conv": 0, "MatMul": 1}[user.op_type]  # Conv [Cout, Cin, k, k]; MatMul B [K, N]
            assert axis == want_axis and list(inits[dq.input[1]].dims) == [w.dims[want_axis]], dq.name
            weights[user.op_type] += 1
        else:  # activation: scalar scale, fed by a QuantizeLinear
            assert producer[dq.input[0]].op_type == "QuantizeLinear"
            assert list(inits[dq.input[1]].dims) == []
    assert weights["Conv"] == 26 and weights["MatMul"] == 40
    by_name = {n.name: n for n in model.graph.node}
    for name, node in by_name.items():
        if node.op_type not in COMPUTE:
            continue
        fed = [i in producer and producer[i].op_type == "DequantizeLinear" for i in node.input[:2]]
        excluded = any(re.search(p, name) for p in excluded_re)
        assert not any(fed) if excluded else all(fed), name
    for name in ("/unet/conv_in/Conv", "/unet/conv_out/Conv", "/unet/time_embedding/linear_1/Gemm",
                 "/unet/up_blocks.0/resnets.0/conv_shortcut/Conv",
                 "/unet/mid_block/attentions.0/transformer_blocks.0/attn1/MatMul",
                 "/unet/mid_block/attentions.0/transformer_blocks.0/attn2/MatMul_1"):
        assert name in by_name and not any(producer.get(i, by_name[name]).op_type == "DequantizeLinear"
                                           for i in by_name[name].input), name
    # Non-quantized compute in FP16, except the FP32 islands the FP16 export keeps (time embedding, norms, softmax).
    for node in model.graph.node:
        out = types.get(node.output[0])
        if node.op_type in COMPUTE:
            want = TensorProto.FLOAT if "time_embedding" in node.name else TensorProto.FLOAT16
            assert out == want, (node.name, out)
        if node.op_type in ("Softmax", "InstanceNormalization", "LayerNormalization") or node.op_type in ("Sin", "Cos"):
            assert out == TensorProto.FLOAT, node.name
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.FLOAT] * 3
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


def check_count_lines(stderr, src, int8_path):
    """quantize's progress line(s) and result line against each other and against the graphs themselves: the
    Conv/MatMul/Gemm nodes of the FP32 UNet ``src`` (the total) and the DequantizeLinear-fed ones of ``int8_path``.
    The progress line once said '66 Conv/MatMul/Gemm candidates, 33 excluded' for 99 nodes, 66 of them quantized.
    Returns the quantizers whose progress lines were printed."""
    source = onnx.load(src, load_external_data=False)
    total = sum(n.op_type in COMPUTE for n in source.graph.node)
    model = onnx.load(int8_path, load_external_data=False)
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    fed = {op: sum(n.op_type == op and any(i in dq_out for i in n.input[:2]) for n in model.graph.node)
           for op in COMPUTE}
    lines = stderr.splitlines()
    (result,) = [re.search(r"INT8 Conv (\d+), MatMul (\d+), Gemm (\d+); (\d+) excluded, (\d+) left out by", line)
                 for line in lines if line.startswith("unet_int8: wrote ")]
    conv, matmul, gemm, r_excluded, left_out = map(int, result.groups())
    assert {"Conv": conv, "MatMul": matmul, "Gemm": gemm} == fed
    progress = [line for line in lines if re.match(r"unet_int8: (ModelOpt INT8 PTQ|ONNX Runtime quantize_static) \(",
                                                   line)]
    assert progress
    for line in progress:
        # lenient on the wording, so a line that counts something else fails on its numbers
        m = re.search(r", (\d+) Conv/MatMul/Gemm [a-z]+, (?:(\d+) to quantize, )?(\d+) excluded\)$", line)
        assert m, line
        printed_total, to_quantize, excluded = (int(g) if g else None for g in m.groups())
        assert printed_total == total, (line, total)
        assert to_quantize is not None and to_quantize + excluded == total, line
        assert excluded == r_excluded and conv + matmul + gemm + left_out == to_quantize, (line, result.group(0))
    return [line.split(" (")[0].removeprefix("unet_int8: ") for line in progress]


def test_quantize_lines_count_every_node_once(int8_export):
    """The tiny UNet: 99 Conv/MatMul/Gemm (README: 33 + 56 + 10), 66 quantized, 33 excluded, all on one line."""
    err = (int8_export.parent / "quantize.stderr").read_text()
    src, int8_path = int8_export / "unet" / "model.onnx", int8_export / "unet_int8" / "model.onnx"
    assert check_count_lines(err, src, int8_path) == ["ModelOpt INT8 PTQ"]
    assert "99 Conv/MatMul/Gemm nodes, 66 to quantize, 33 excluded)" in err and "; 33 excluded, 0 left out" in err


def _torch_unet(export_dir):
    export = ExportDir.open(export_dir)
    spec = export.spec("unet")
    return export, spec, spec.wrap(export.source_model().load_torch("unet")).eval()


def rel_errors(export_dir, onnx_path, feeds=None):
    """rel. L2 of an ONNX UNet (ONNX Runtime, CPU) against the FP32 PyTorch UNet, per feed."""
    export, spec, module = _torch_unet(export_dir)
    feeds = feeds or [spec.sample_inputs(spec.dims_for(Geometry(1, 128, 128)), seed=77)]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    errors = []
    for feed in feeds:
        with torch.no_grad():
            want = module(*feed.values()).numpy()
        got = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
        assert got.shape == want.shape and np.isfinite(got).all()
        errors.append(float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    return errors


def test_int8_unet_in_onnxruntime_against_fp32_torch(int8_export, calib):
    """Inputs made here: the spec's random inputs at three shapes, and held-out pipeline-like inputs."""
    spec = ExportDir.open(int8_export).spec("unet")
    feeds = [spec.sample_inputs(spec.dims_for(geo), seed=50 + i)
             for i, geo in enumerate([Geometry(1, 128, 128), Geometry(2, 64, 192), Geometry(1, 96, 96, guidance=False)])]
    c = load_calibration(calib).arrays
    rng = np.random.default_rng(0)  # pipeline-like: calibration rows, re-noised so they are not the calibration set
    rows = rng.choice(40, 4, replace=False)
    feeds.append({"sample": torch.from_numpy(c["sample"][rows] + rng.normal(0, 0.1, (4, 4, 16, 16)).astype(np.float32)),
                  "timestep": torch.tensor([900.0, 600.0, 300.0, 20.0]),
                  "encoder_hidden_states": torch.from_numpy(c["encoder_hidden_states"][rows])})
    errors = rel_errors(int8_export, int8_export / "unet_int8" / "model.onnx", feeds)
    assert max(errors) < INT8_REL_L2, errors
    assert min(errors) > 1e-3, errors  # it is quantized: FP32 would agree to ~1e-6


def test_manifest_entry_and_runtime(int8_export, calib, export_fp32):
    data = json.loads((int8_export / "manifest.json").read_text())
    entry, unet = data["components"]["unet_int8"], data["components"]["unet"]
    path = int8_export / entry["file"]
    assert entry["file"] == "unet_int8/model.onnx" and entry["sha256"] == sha256_file(path)
    assert (int8_export / "unet_int8" / "config.json").read_text() == (int8_export / "unet" / "config.json").read_text()
    for field in ("inputs", "outputs", "dynamic_axes", "axes", "profile"):
        assert entry[field] == unet[field], field
    p = entry["precision"]
    assert p["dtype"] == "int8" and p["quantizer"].startswith("modelopt.onnx.quantization")
    assert p["calibration_method"] == "max" and p["excluded_patterns"] == [pat for pat, _ in DEFAULT_EXCLUDES]
    model = onnx.load(path)
    count = {op: sum(n.op_type == op for n in model.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    assert p["qdq_nodes"] == count and p["quantized_nodes"] == {"Conv": 26, "MatMul": 40, "Gemm": 0}
    assert len(p["excluded_nodes"]) == 33 and entry["opset"] >= 19
    assert entry["calibration"]["sha256"] == sha256_file(calib) and entry["calibration"]["samples"] == 40
    assert entry["source"]["sha256"] == unet["sha256"] and entry["versions"]["nvidia-modelopt"]
    export = ExportDir.open(int8_export)
    spec = export.spec("unet_int8")
    assert spec.name == "unet_int8" and spec.inputs == export.spec("unet").inputs and spec.source == "unet"
    assert export.dtype == "fp32"  # the INT8 variant does not make the export "mixed"
    again = run("quantize", int8_export, "--calib", calib)
    assert again.exit_code == 0 and "up to date" in again.stderr
    assert json.loads((int8_export / "manifest.json").read_text())["components"]["unet_int8"] == entry
    assert "unet_int8" not in json.loads((export_fp32 / "manifest.json").read_text())["components"]


def test_infer_and_bench_with_the_int8_unet(int8_export, tmp_path):
    from PIL import Image

    args = ["--prompt", "a teapot", "--steps", 3, "--height", 64, "--width", 64, "--seed", 2]
    assert run("infer", int8_export, *args, "-o", tmp_path / "fp32.png").exit_code == 0
    result = run("infer", int8_export, *args, "-o", tmp_path / "int8.png", "--unet", "int8")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "int8.json").read_text())["unet"] == "int8"
    a = np.asarray(Image.open(tmp_path / "fp32.png"), np.float64) / 255
    b = np.asarray(Image.open(tmp_path / "int8.png"), np.float64) / 255
    assert 30.0 < psnr(a, b) < 100.0  # close to, but not, the FP32 image
    result = run("bench", int8_export, "--steps", 1, "--runs", 1, "--warmup", 0, "--height", 64, "--width", 64,
                 "--no-eager", "--unet", "int8", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["options"]["unet"] == "int8"
    assert_one_line_error(run("infer", int8_export, *args, "-o", tmp_path / "t.png", "--unet", "int8",
                              "--backend", "torch"), 2, "torch backend")


def activation_scales(path):
    """{(compute node, input index): activation scale} of a Q/DQ graph."""
    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    scales = {}
    for n in model.graph.node:
        for k, name in enumerate(n.input[:2]):
            dq = producer.get(name)
            if n.op_type in COMPUTE and dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] not in inits:
                scales[(n.name, k)] = float(inits[dq.input[1]])
    return scales


def assert_tighter_than_max(scales, max_scales):
    common = set(scales) & set(max_scales)
    assert len(common) >= 60
    assert all(scales[k] <= max_scales[k] * 1.002 for k in common)  # a clipped range never exceeds the max
    assert sum(scales[k] for k in common) < 0.98 * sum(max_scales[k] for k in common)


def test_entropy_with_modelopt(int8_export, calib, tmp_path):
    out = tmp_path / "entropy"
    shutil.copytree(int8_export, out)
    result = run("quantize", out, "--calib", calib, "--calibration-method", "entropy", "--quantizer", "modelopt")
    assert result.exit_code == 0, result.stderr
    entropy = json.loads((out / "manifest.json").read_text())["components"]["unet_int8"]
    assert entropy["precision"]["calibration_method"] == "entropy"
    assert entropy["precision"]["quantizer"].startswith("modelopt")
    assert_tighter_than_max(activation_scales(out / "unet_int8" / "model.onnx"),
                            activation_scales(int8_export / "unet_int8" / "model.onnx"))
    assert 1e-3 < rel_errors(out, out / "unet_int8" / "model.onnx")[0] < INT8_REL_L2


def test_percentile_with_onnxruntime_and_gemm_axis(int8_export, calib, tmp_path):
    """percentile runs on ONNX Runtime's quantizer; without the time_emb_proj default the Gemms are quantized."""
    out = tmp_path / "percentile"
    shutil.copytree(int8_export, out)
    keep = [p for p, _ in DEFAULT_EXCLUDES if p != "time_emb_proj"]
    args = [a for p in keep for a in ("--exclude", p)]
    result = run("quantize", out, "--calib", calib, "--calibration-method", "percentile", "--no-default-excludes",
                 *args)
    assert result.exit_code == 0, result.stderr
    entry = json.loads((out / "manifest.json").read_text())["components"]["unet_int8"]
    assert entry["precision"]["quantizer"].startswith("onnxruntime.quantization.quantize_static")
    assert "percentile" in entry["precision"]["fallback_reason"]
    assert entry["precision"]["quantized_nodes"] == {"Conv": 26, "MatMul": 40, "Gemm": 8}
    model, types, inits, producer, readers = graph_facts(out / "unet_int8" / "model.onnx")
    gemms = [n for n in model.graph.node if n.op_type == "Gemm" and "time_emb_proj" in n.name]
    assert len(gemms) == 8
    for g in gemms:
        trans_b = next((a.i for a in g.attribute if a.name == "transB"), 0)
        dq = producer[g.input[1]]
        w = inits[dq.input[0]]
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert dq.op_type == "DequantizeLinear" and w.data_type == TensorProto.INT8
        assert axis == (0 if trans_b else 1) and list(inits[dq.input[1]].dims) == [w.dims[axis]]
        assert producer[g.input[0]].op_type == "DequantizeLinear"
    for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        assert all(u.op_type in COMPUTE for u in readers[dq.output[0]])
        assert not numpy_helper.to_array(inits[dq.input[2]]).any()
    assert 1e-3 < rel_errors(out, out / "unet_int8" / "model.onnx")[0] < INT8_REL_L2
    assert_tighter_than_max(activation_scales(out / "unet_int8" / "model.onnx"),
                            activation_scales(int8_export / "unet_int8" / "model.onnx"))


def test_ort_quantizer_scales_equal_stock_quantize_static(export_fp32, calib, tmp_path):
    """sdexport's ONNX Runtime path calibrates only the activation inputs of the nodes it quantizes (ONNX Runtime's
    calibrator takes every Conv/MatMul/Gemm input and output: 19.6 against 9.7 GiB for one 512 px batch of SD
    1.5), batch by batch, and quantize_static's own pass sees one image at the smallest size: every activation
    scale equals stock quantize_static's over the same batches, where one scale from that small pass would not."""
    from onnxruntime.quantization import quantize_static

    from sdexport.calibration import load_calibration
    from sdexport.quantize import (QUANTIZABLE_OPS, _ort_qdq_settings, _Reader, _run_ort, exclude_patterns,
                                   select_nodes)

    src = export_fp32 / "unet" / "model.onnx"
    batches = load_calibration(calib).batches(8)
    spec = ExportDir.open(export_fp32).spec("unet")
    small = {k: v.numpy() for k, v in spec.sample_inputs(spec.min_dims(), seed=0).items()}
    assert small["sample"].shape[0] < batches[0]["sample"].shape[0]
    to_quantize, excluded = select_nodes(onnx.load(src), exclude_patterns())
    (tmp_path / "ours").mkdir()
    _run_ort(src, tmp_path / "ours" / "qdq.onnx", batches, "max", to_quantize, excluded, False, small)
    augmented = onnx.load(tmp_path / "ours" / "augmented.onnx", load_external_data=False)
    calibrated = {n.input[0] for n in augmented.graph.node if n.op_type == "ReduceMax"}
    graph = onnx.load(src, load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    every = {t for n in graph.node if n.op_type in QUANTIZABLE_OPS for t in [*n.input, *n.output]} - weights - {""}
    assert calibrated and calibrated < every and len(calibrated) < 0.6 * len(every)
    settings = _ort_qdq_settings(to_quantize, excluded, False)  # sdexport's settings, without its overrides
    quantize_static(str(src), str(tmp_path / "stock.onnx"), _Reader(batches), **settings)
    ours, stock = activation_scales(tmp_path / "ours" / "qdq.onnx"), activation_scales(tmp_path / "stock.onnx")
    assert len(stock) >= 60 and ours.keys() == stock.keys()
    assert all(ours[k] == pytest.approx(stock[k], rel=1e-6) for k in stock)
    quantize_static(str(src), str(tmp_path / "small.onnx"), _Reader([small]), **settings)
    alone = activation_scales(tmp_path / "small.onnx")
    assert sum(alone[k] != pytest.approx(stock[k], rel=1e-3) for k in stock) > len(stock) // 2


def test_without_modelopt_falls_back_to_onnxruntime(int8_export, calib, tmp_path, monkeypatch):
    import sdexport.precision
    import sdexport.quantize
    from sdexport.errors import BackendUnavailable

    def missing():
        raise BackendUnavailable("ModelOpt is not installed (test)")

    monkeypatch.setattr(sdexport.quantize, "_modelopt", missing)
    monkeypatch.setattr(sdexport.precision, "_autocast", missing)
    out = tmp_path / "noopt"
    shutil.copytree(int8_export, out)
    result = run("quantize", out, "--calib", calib, "--force")
    assert result.exit_code == 0, result.stderr
    assert "falling back to ONNX Runtime" in result.stderr
    assert check_count_lines(result.stderr, out / "unet" / "model.onnx", out / "unet_int8" / "model.onnx") == [
        "ModelOpt INT8 PTQ", "ONNX Runtime quantize_static"]
    p = json.loads((out / "manifest.json").read_text())["components"]["unet_int8"]["precision"]
    assert p["quantizer"].startswith("onnxruntime") and p["high_precision_dtype"] == "fp32"
    assert p["quantized_nodes"] == {"Conv": 26, "MatMul": 40, "Gemm": 0}
    model, types, inits, producer, readers = graph_facts(out / "unet_int8" / "model.onnx")
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        assert all(u.op_type in COMPUTE for u in readers[dq.output[0]])
    assert {types[n.output[0]] for n in model.graph.node if n.op_type in COMPUTE} == {TensorProto.FLOAT}
    assert 1e-3 < rel_errors(out, out / "unet_int8" / "model.onnx")[0] < INT8_REL_L2
    assert_one_line_error(run("quantize", out, "--calib", calib, "--quantizer", "modelopt", "--force"), 7,
                          "ModelOpt is not installed")


def test_unet_with_external_data(int8_export, calib, tmp_path):
    """The path models over 2 GB take (SD 1.5: model.onnx + model.onnx_data), on the tiny UNet."""
    out = tmp_path / "external"
    shutil.copytree(int8_export, out, ignore=shutil.ignore_patterns("unet_int8"))
    unet = out / "unet" / "model.onnx"
    onnx.save_model(onnx.load(unet), str(unet), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=1024)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["components"].pop("unet_int8")
    manifest["components"]["unet"].update(sha256=sha256_file(unet), external_data=[
        {"file": "unet/model.onnx_data", "sha256": sha256_file(out / "unet" / "model.onnx_data")}])
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run("quantize", out, "--calib", calib)
    assert result.exit_code == 0, result.stderr
    entry = json.loads((out / "manifest.json").read_text())["components"]["unet_int8"]
    assert entry["precision"]["quantizer"].startswith("modelopt") and "fallback_reason" not in entry["precision"]
    assert entry["precision"]["quantized_nodes"] == {"Conv": 26, "MatMul": 40, "Gemm": 0}
    assert 1e-3 < rel_errors(out, out / "unet_int8" / "model.onnx")[0] < INT8_REL_L2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".sdexport.lock"]  # no work files


# --- the INT8 validation report -----------------------------------------------------------------
def test_ssim_and_psnr():
    rng = np.random.default_rng(0)
    img = rng.random((32, 40, 3))
    assert ssim(img, img) == pytest.approx(1.0) and psnr(img, img) == float("inf")
    # Constant images: variances vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1) exactly.
    c1 = (0.01 * 1.0) ** 2
    assert ssim(np.full((16, 16), 0.2), np.full((16, 16), 0.6)) == pytest.approx((2 * .12 + c1) / (.04 + .36 + c1))
    noisy = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
    very = np.clip(img + rng.normal(0, 0.2, img.shape), 0, 1)
    assert 1 > ssim(img, noisy) > ssim(img, very) > 0 and ssim(img, noisy) == pytest.approx(ssim(noisy, img))
    # Against a direct (non-separable) evaluation of the same definition at one window position.
    a, b = img[:11, :11, 0], noisy[:11, :11, 0]
    x = np.arange(-5, 6)
    w = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * 1.5 ** 2))
    w /= w.sum()
    ma, mb = (w * a).sum(), (w * b).sum()
    va, vb, cov = (w * a * a).sum() - ma ** 2, (w * b * b).sum() - mb ** 2, (w * a * b).sum() - ma * mb
    c2 = (0.03) ** 2
    direct = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    assert ssim(a, b) == pytest.approx(direct, rel=1e-9)
    assert psnr(np.zeros(4), np.full(4, 0.1)) == pytest.approx(20.0)


def test_validate_reports_int8(int8_export):
    result = run("validate", int8_export, "--components", "unet_int8")
    assert result.exit_code == 0, result.stderr
    report = json.loads((int8_export / "validation.json").read_text())
    int8 = report["int8"]
    assert report["passed"] and int8["passed"]
    assert int8["measures"] == "agreement between INT8 and FP32 pipelines on random-weight models; not image quality"
    assert int8["thresholds"] == INT8_REPORT_THRESHOLDS
    assert [r["target_timestep"] for r in int8["unet"]] == [950, 500, 50]
    for row in int8["unet"]:
        assert min(abs(t - row["target_timestep"]) for t in row["timesteps"]) <= 50
        assert 1e-3 < row["int8"]["rel_l2_err"] <= INT8_REPORT_THRESHOLDS["unet_rel_l2"]
        assert row["fp16"]["rel_l2_err"] < row["int8"]["rel_l2_err"]  # FP16 sits between INT8 and FP32
    assert len(int8["pipeline"]) == 2
    for row in int8["pipeline"]:
        m = row["int8"]
        assert m["final_latent"]["rel_l2_err"] <= INT8_REPORT_THRESHOLDS["final_latent_rel_l2"]
        assert INT8_REPORT_THRESHOLDS["image_psnr_db"] <= m["image_psnr_db"] < row["fp16"]["image_psnr_db"]
        assert INT8_REPORT_THRESHOLDS["image_ssim"] <= m["image_ssim"] <= 1.0
    assert sum(line.startswith("PASS int8 unet") for line in result.stderr.splitlines()) == 3
    _check_int8_lines(result.stderr, int8)
    assert "not image quality" in result.stderr
    # The FP16 comparison UNet is converted from the FP32 UNet, not from the Q/DQ graph quantize converted:
    # its 'kept FP32' line names that graph (quantize's names the Q/DQ graph: test_quantize_output_names_...).
    runs = [line for line in result.stderr.splitlines() if "reference run (" in line]
    assert len(runs) == 1 and runs[0].startswith(
        "unet (the export's FP32 UNet, made FP16 for the comparison): reference run (sample 1x4x"), runs
    assert re.search(r": \d+ node\(s\) above \|512\| kept FP32; converting", runs[0]), runs


def test_quantize_output_names_the_graph_its_fp16_step_converts(int8_export):
    """make int8 MODEL=sdxl-tiny printed 'unet: reference run ...: 5 node(s) above |512| kept FP32' in quantize and
    the same line with 6 in validate: two graphs (the Q/DQ graph, whose quantizer dropped a no-op Cast, and the
    FP32 UNet made FP16 for the comparison), both named 'unet'. Each line now names its graph."""
    err = (int8_export.parent / "quantize.stderr").read_text()
    runs = [line for line in err.splitlines() if "reference run (" in line]
    assert len(runs) == 1 and runs[0].startswith("unet_int8 (the Q/DQ graph): reference run (sample 1x4x"), runs


def test_validate_fails_on_a_bad_int8_unet(int8_export, tmp_path, monkeypatch):
    """Scale the weight scales of the INT8 convs: a valid graph, wrong numbers -> exit 6."""
    import sdexport.quantize

    monkeypatch.setattr(sdexport.quantize, "REPORT_STEPS", 6)  # a shorter run; the thresholds are the same
    monkeypatch.setattr(sdexport.quantize, "REPORT_FP16", False)
    bad = tmp_path / "bad"
    shutil.copytree(int8_export, bad)
    path = bad / "unet_int8" / "model.onnx"
    model = onnx.load(path)
    inits = {i.name: i for i in model.graph.initializer}
    readers = {i: n for n in model.graph.node for i in n.input}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and readers[n.output[0]].op_type == "Conv":
            scale = inits[n.input[1]]
            scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float16(3.0), scale.name))
    onnx.save(model, path)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["components"]["unet_int8"]["sha256"] = sha256_file(path)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    result = run("validate", bad, "--components", "unet_int8")
    assert_one_line_error(result, 6, "unet_int8 (INT8 report)")
    report = json.loads((bad / "validation.json").read_text())
    assert not report["passed"] and not report["int8"]["passed"]
    assert not any(r["pass"] for r in report["int8"]["unet"])
    _check_int8_lines(result.stderr, report["int8"])


INT8_UNET_LINE = re.compile(r"^(PASS|FAIL) int8 unet   t~(\d+) +out_sample: rel_l2 (\S+) (<=|>) (\S+)  \(max_abs ")
INT8_IMAGE_LINE = re.compile(r"^(PASS|FAIL) int8 image  seed (\d+) +latent rel_l2 (\S+) (<=|>) (\S+), "
                             r"PSNR (\S+) dB (>=|<) (\S+) dB, SSIM (\S+) (>=|<) ([^\s;]+)")


def _check_int8_lines(stderr, int8):
    """The INT8 report's lines show each checked metric next to its threshold, as validation.json has them."""
    th = int8["thresholds"]
    unet = [m for m in map(INT8_UNET_LINE.match, stderr.splitlines()) if m]
    assert len(unet) == len(int8["unet"]), stderr
    for m, row in zip(unet, int8["unet"]):
        status, target, value, sign, limit = m.groups()
        assert (status == "PASS", int(target)) == (row["pass"], row["target_timestep"]), m[0]
        assert float(value) == pytest.approx(row["int8"]["rel_l2_err"], rel=1e-2), m[0]
        assert float(limit) == pytest.approx(th["unet_rel_l2"], rel=1e-2), m[0]
        assert sign == ("<=" if row["int8"]["rel_l2_err"] <= th["unet_rel_l2"] else ">"), m[0]
    images = [m for m in map(INT8_IMAGE_LINE.match, stderr.splitlines()) if m]
    assert len(images) == len(int8["pipeline"]), stderr
    for m, row in zip(images, int8["pipeline"]):
        g, got = m.groups(), row["int8"]
        assert (g[0] == "PASS", int(g[1])) == (row["pass"], row["seed"]), m[0]
        for (value, sign, limit), want, want_limit, minimum in (
                (g[2:5], got["final_latent"]["rel_l2_err"], th["final_latent_rel_l2"], False),
                (g[5:8], got["image_psnr_db"], th["image_psnr_db"], True),
                (g[8:11], got["image_ssim"], th["image_ssim"], True)):
            assert float(value) == pytest.approx(want, rel=1e-2, abs=1e-3), m[0]
            assert float(limit) == pytest.approx(want_limit, rel=1e-2), m[0]
            ok = want >= want_limit if minimum else want <= want_limit
            assert sign == {(True, True): ">=", (True, False): "<", (False, True): "<=", (False, False): ">"}[
                (minimum, ok)], m[0]


def test_tensorrt_rtx_builds_the_int8_unet(int8_export, tmp_path):
    """TensorRT-RTX (builds without a GPU) parses the Q/DQ graph and builds it for compute capability 8.0 through
    sdexport build; every attention block (kept out of INT8, FP16 with its Softmax in FP32) is assigned to
    TensorRT's fused self-attention kernel, and TF32 is off for the graph's FP32 islands."""
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("CI: tensorrt_rtx is not installed (pip install tensorrt-rtx-cu13==1.7.1.116)")
        pytest.skip("tensorrt_rtx is not installed")
    from sdexport.build import build

    out = tmp_path / "int8"
    shutil.copytree(int8_export, out)
    report = build(out, precision="int8", components=["unet"], compute_capabilities="8.0")
    entry = report["engines"]["unet"]
    assert entry["precision"] == "int8" and entry["onnx"]["component"] == "unet_int8"
    assert entry["builder_flags"]["TF32"] is False and (out / entry["file"]).stat().st_size > 0
    graph = onnx.load(out / "unet_int8" / "model.onnx").graph
    softmax = [n.name for n in graph.node if n.op_type == "Softmax"]
    assert tensorrt_form_problems(out / "unet_int8" / "model.onnx")[1] == []  # same forms as the FP16 graphs
    assert softmax and set(softmax) <= set(report["attention_nodes"]["unet"])
    assert entry["fused_attention_nodes"] == 3 * len(softmax)


def test_a_reexport_of_the_unet_asks_for_force_before_dropping_its_quantized_variant(int8_export, tiny_model,
                                                                                     tmp_path):
    """unet_int8 is made from the exported UNet (calibrated, quantized): a re-export of the UNet with another
    --opset dropped it with a progress line and exit 0, while an export of another model was refused over it.
    Now any re-export that would drop it is refused without --force, naming it and changing nothing; --force
    drops it (the directory and its manifest entry) and says so."""
    from conftest import LOCK_NAMES

    out = shutil.copytree(int8_export, tmp_path / "e")

    def files():
        return {p: sha256_file(p) for p in out.rglob("*") if p.is_file() and p.name not in LOCK_NAMES}

    before = files()
    assert_one_line_error(run("export", tiny_model, "-o", out, "--components", "unet", "--opset", "18"), 2,
                          "re-exporting unet (opset 17 -> 18) would drop unet_int8", "--force", "--opset 17")
    assert files() == before
    result = run("export", tiny_model, "-o", out, "--components", "unet", "--opset", "18", "--force")
    assert result.exit_code == 0, result.stderr
    assert "unet_int8: removed (made from the previous unet" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert "unet_int8" not in manifest["components"] and manifest["components"]["unet"]["opset"] == 18
    assert not (out / "unet_int8").exists()


# --- bad input -----------------------------------------------------------------------------------
def test_calibration_from_another_model_is_refused(other_model, int8_export, tmp_path):
    """A file of another model of the same family (6 latent channels) is the same refusal as one of another
    family (test_sdxl): exit 5 naming both models and the first input that differs. It was exit 4 on the shape."""
    path = tmp_path / "other.npz"
    assert run("calibrate", other_model, "--num-prompts", 1, "--steps", 1, "-o", path).exit_code == 0
    with np.load(path) as data:
        shape = data["sample"].shape[1:]
    assert shape[0] == 6
    out = tmp_path / "x"
    shutil.copytree(int8_export, out, ignore=shutil.ignore_patterns("unet_int8"))
    result = run("quantize", out, "--calib", path)
    assert_one_line_error(result, 5, f"{path} was captured from sd model {other_model} (weights",
                          f"not from the model of {out} (sd model", f"its 'sample' is {shape} a sample",
                          "takes ['batch', 4,")


@pytest.mark.parametrize("name", ["z.png", "z", "z.npz.json", ".npz"])
def test_calibrate_output_must_be_an_npz(tiny_model, tmp_path, name):
    """-o z.png wrote an NPZ under a .png name (exit 0); numpy's savez would have written z.png.npz. One line,
    exit 2, before any work; nothing written."""
    out = tmp_path / "out"
    out.mkdir()
    result = run("calibrate", tiny_model, "--num-prompts", 1, "--steps", 1, "-o", out / name)
    assert_one_line_error(result, 2, f"-o {out / name}: the calibration file must be a .npz file", only_line=True)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("change, code, needle", [
    ("float64", 5, "is float64; the UNet takes float32"),
    ("hidden", 4, "has size 48 in dimension 2"),
    ("size", 4, "latent_height=40 is outside the exported range [8, 32]"),
    ("weights", 5, "not from the model of"),
    ("few", 2, "needs at least 32 samples"),
    ("corrupt", 5, "not a calibration file"),
    ("missing", 2, "no such file"),
])
def test_bad_calibration_files(int8_export, calib, tmp_path, change, code, needle):
    arrays, meta = raw_calib(calib)
    path = tmp_path / "bad.npz"
    if change == "float64":
        arrays["sample"] = arrays["sample"].astype(np.float64)
    elif change == "hidden":
        arrays["encoder_hidden_states"] = np.zeros((40, 77, 48), np.float32)
    elif change == "size":
        arrays["sample"] = np.zeros((40, 4, 40, 40), np.float32)
    elif change == "weights":
        meta["model"]["weights_sha256"] = "0" * 64
    elif change == "few":
        arrays = {k: v[:31] for k, v in arrays.items()}
    if change == "corrupt":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif change != "missing":
        save_calib(path, arrays, meta)
    out = tmp_path / "x"
    shutil.copytree(int8_export, out, ignore=shutil.ignore_patterns("unet_int8"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["components"].pop("unet_int8")
    (out / "manifest.json").write_text(json.dumps(manifest))
    method = ["--calibration-method", "entropy"] if change == "few" else []
    assert_one_line_error(run("quantize", out, "--calib", path, *method), code, needle)
    assert not (out / "unet_int8").exists()
    assert "unet_int8" not in json.loads((out / "manifest.json").read_text())["components"]


def test_bad_quantize_and_calibrate_input(int8_export, export_fp16, calib, tiny_model, tmp_path):
    assert_one_line_error(run("quantize", export_fp16, "--calib", calib), 2, "fp16 export", "--dtype fp32")
    assert not (export_fp16 / "unet_int8").exists()
    # An export whose UNet already is a Q/DQ graph (manifest updated to match the bytes).
    done = tmp_path / "done"
    shutil.copytree(int8_export, done)
    shutil.copy(done / "unet_int8" / "model.onnx", done / "unet" / "model.onnx")
    manifest = json.loads((done / "manifest.json").read_text())
    manifest["components"]["unet"]["sha256"] = sha256_file(done / "unet" / "model.onnx")
    (done / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(run("quantize", done, "--calib", calib, "--force"), 5, "already quantized")
    assert_one_line_error(run("quantize", int8_export, "--calib", calib, "--calibration-method", "percentile",
                              "--quantizer", "modelopt"), 2, "max and entropy only")
    assert_one_line_error(run("quantize", int8_export, "--calib", calib, "--exclude", "no_such_layer"), 2,
                          "matches no Conv/MatMul/Gemm")
    assert_one_line_error(run("quantize", int8_export, "--calib", calib, "--exclude", "(unclosed"), 2,
                          "not a regular expression")
    empty = tmp_path / "prompts.txt"
    empty.write_text("# only a comment\n\n")
    assert_one_line_error(run("calibrate", tiny_model, "--prompts", empty, "-o", tmp_path / "c.npz"), 2, "no prompts")
    assert_one_line_error(run("calibrate", tiny_model, "--num-prompts", 400, "-o", tmp_path / "c.npz"), 2,
                          "only 362 prompts")
    assert_one_line_error(run("calibrate", tiny_model, "--steps", 0, "-o", tmp_path / "c.npz"), 2, "--steps 0")
    assert_one_line_error(run("calibrate", tiny_model, "--num-prompts", 1, "--height", 72, "-o", tmp_path / "c.npz"),
                          4, "multiple of 16")
    assert not (tmp_path / "c.npz").exists()
