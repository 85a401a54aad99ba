"""The GPU experiment of issue 5, one stage per call (benchmarks/gpu.sh runs them in order).

Stages (each writes OUT/<stage>.json, and can be re-run alone on a warm machine):
  prepare  sd15-random preset, FP32 + FP16 exports, ONNX Runtime CUDA variants (dynamic, static 512)
  fourway  SD 1.5 random weights, 512x512, batch 1 with guidance, 50 and 30 steps: FP32 eager, FP16 eager,
           FP32 engine, FP16 engine (+ the other engine/baseline variants), side by side in one process
  sweep    images/s at batch 1, 2, 4, 8 (512 px) and latency at 512, 768, 1024 px: eager FP16 vs engines
  profile  top GPU kernels of one UNet step (ORT-fused vs torch.compile) and the fused graph's error vs FP32
  int8     calibrate + quantize (ModelOpt) the SD 1.5 UNet, then the INT8 accuracy report of `sdexport validate`
  trt      TensorRT-RTX builds of the FP16 engines (build time, size) and the attempt to run them here
  sdxl-prepare  sdxl-random preset (the exact SDXL base 1.0 architecture, random weights) and its FP32 export
  sdxl-ortprep  the ONNX Runtime CUDA variant of its UNet (ORT's SDXL UNet fusions + FP16; the force_upcast VAE
           stays FP32)
  sdxl     SDXL at 1024x1024, 30 steps, guidance 5.0 (UNet batch 2), Euler: FP32 eager (reference), FP16 eager,
           eager + CUDA graph, torch.compile + CUDA graph, ORT CUDA fused (dynamic), ORT CUDA fused static + step
           graph; per-stage table and each image's PSNR against FP32 eager; the VAE decoder at 1024 px in FP32
           and FP16 (time and FP16 error)
  sdxl-trt  the FP16 export of sdxl-random and TensorRT builds of every component (build time, plan size)
  sdxl-sweep  SDXL images/s at batch 1, 2, 4, 8 (1024 px): torch.compile + CUDA graph vs the dynamic-batch
           Inductor engine with step graphs
  sdxl-static  SDXL images/s where one batch size is served (--batches, one per process): static Inductor
           packages for that size with step graphs vs torch.compile + CUDA graph compiled first at that size

usage: python benchmarks/gpu_bench.py STAGE [--work /tmp/sdx] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COMPONENTS = ["text_encoder", "unet", "vae_decoder"]
ROOT = Path(__file__).resolve().parents[1]
OPTS = argparse.Namespace(model="sd15-random", device="cuda", quick=False, skip_fp16=False, sdxl_onnx_unet=False,
                          sdxl_export="sdxl-e32",
                          no_inductor=False, no_reexport=False)  # set by main()
PROMPT = "a photograph of an astronaut riding a horse"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save(out: Path, name: str, data) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))


def environment() -> dict[str, str]:
    """This checkout's sdexport in the subprocesses."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))


def header() -> dict:
    from sdexport.bench import machine
    from sdexport.manifest import versions

    commit = os.environ.get("SDEXPORT_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError:
            commit = "unknown"
    return {"machine": machine(), "versions": versions(), "commit": commit,
            "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def timed_step(result: dict, out: Path, stage: str, name: str, fn):
    """Run one step of a stage, record its time and outcome under result["steps"][name] and save the
    stage's JSON; a failure is recorded (and printed) and the stage goes on. Returns fn's value or None."""
    t0 = time.perf_counter()
    value = None
    try:
        value = fn()
        result["steps"][name] = {"seconds": round(time.perf_counter() - t0, 1), "ok": True}
    except Exception as exc:  # record and go on: one failure must not lose the rest
        traceback.print_exc()
        result["steps"][name] = {"seconds": round(time.perf_counter() - t0, 1), "ok": False,
                                 "error": f"{type(exc).__name__}: {exc}"[:2000]}
    log(f"{stage} {name}: {result['steps'][name]}")
    save(out, stage, result)
    return value


def rel_error(got, want) -> dict:
    """validate.error_metrics of two torch tensors, under the keys of the committed results."""
    from sdexport.validate import error_metrics

    m = error_metrics(got.detach().float().cpu().numpy(), want.detach().float().cpu().numpy())
    return {"rel_l2": round(m["rel_l2_err"], 6), "max_abs": round(m["max_abs_err"], 5),
            "ref_max_abs": round(m["max_abs_ref"], 3), "finite": m["finite"]}


def _inductor_precision() -> str:
    return "fp32" if OPTS.device == "cpu" else "fp16"


def stage_prepare(work: Path, out: Path) -> None:
    from sdexport import ort_cuda
    from sdexport.export import export
    from sdexport.inductor import build as build_inductor
    from sdexport.models import write_preset

    result = {**header(), "steps": {}}

    def timed(name, fn):
        return timed_step(result, out, "prepare", name, fn)

    if not (work / "sd15" / "model_index.json").is_file():
        timed(f"preset {OPTS.model}", lambda: write_preset(OPTS.model, work / "sd15", progress=log))
    timed("export fp32", lambda: export(str(work / "sd15"), work / "e32", components=COMPONENTS, max_images=8, say=log))
    if not OPTS.skip_fp16:
        timed("export fp16", lambda: export(str(work / "sd15"), work / "e16", dtype="fp16", components=COMPONENTS,
                                            max_images=8, say=log))
    if not OPTS.skip_ort:
        timed("ort_cuda", lambda: ort_cuda.prepare(work / "e32", say=log))
    # Inductor engines (issue 14): the UNet for the four-way table's one shape, and a dynamic-batch UNet for the
    # sweep in a second, small export (packages compile from the source model; no UNet ONNX needed there)
    size = "128x128" if OPTS.quick else "512x512"
    timed("inductor static", lambda: build_inductor(work / "e32", size, batch=1, components=["unet"],
                                                     precision=_inductor_precision(), device=OPTS.device, say=log))
    _prepare_e32i(work, timed, size)
    _describe_exports(work, result)
    save(out, "prepare", result)


def _prepare_e32i(work: Path, timed, size: str) -> None:
    """The export serve and the sweep run: text encoder and VAE (+ the VAE's ORT CUDA variant) for up to 8
    images, and a dynamic-batch (1-8) Inductor UNet compiled from the source model."""
    from sdexport import ort_cuda
    from sdexport.export import export
    from sdexport.inductor import build as build_inductor

    timed("export for the dynamic-batch inductor UNet", lambda: export(
        str(work / "sd15"), work / "e32i", components=["text_encoder", "vae_decoder"], max_images=8, say=log))
    if not OPTS.skip_ort:
        timed("ort_cuda (e32i)", lambda: ort_cuda.prepare(work / "e32i", components=("vae_decoder",), say=log))
    timed("inductor dynamic batch", lambda: build_inductor(work / "e32i", size, batch=None, max_batch=8,
                                                            components=["unet"], precision=_inductor_precision(),
                                                            device=OPTS.device, say=log))


def stage_serve_prepare(work: Path, out: Path) -> None:
    """Only what the serve stage needs (issue 12; about 5 minutes on an H100 host, where prepare takes far
    longer): the preset and prepare's e32i."""
    from sdexport.models import write_preset

    result = {**header(), "steps": {}}

    def timed(name, fn):
        return timed_step(result, out, "serve-prepare", name, fn)

    if not (work / "sd15" / "model_index.json").is_file():
        timed(f"preset {OPTS.model}", lambda: write_preset(OPTS.model, work / "sd15", progress=log))
    _prepare_e32i(work, timed, "128x128" if OPTS.quick else "512x512")
    _describe_exports(work, result)
    save(out, "serve-prepare", result)


def _describe_exports(work: Path, result: dict) -> None:
    for exp in ("e32", "e16", "e32i"):
        if not (work / exp / "manifest.json").is_file():
            continue
        manifest = json.loads((work / exp / "manifest.json").read_text())
        result[f"{exp}_sizes_mib"] = {k: round(v["size_bytes"] / 2**20, 1) for k, v in manifest["components"].items()}
        result[f"{exp}_export_seconds"] = {k: v["export_seconds"] for k, v in manifest["components"].items()}
        for key in ("ort_cuda",):
            if key in manifest:
                result[f"{exp}_{key}"] = {k: {"fused_ops": v["fused_ops"], "seconds": v["seconds"]}
                                          for k, v in manifest[key].items()}
        if "inductor" in manifest:
            result[f"{exp}_inductor"] = {k: {f: v[f] for f in ("file", "size_bytes", "build_seconds", "changes",
                                                                 "geometry", "batch_range")}
                                         for k, v in manifest["inductor"].items()}


def _static():
    from sdexport.components import Geometry

    size = 128 if OPTS.quick else 512
    return Geometry(1, size // 4 if OPTS.quick else size, size // 4 if OPTS.quick else size)


def stage_ortprep(work: Path, out: Path) -> None:
    """Only the ONNX Runtime CUDA variants (when prepare's exports exist already, e.g. made with --skip-ort
    while onnxruntime-gpu was still on its way to the GPU host)."""
    from sdexport import ort_cuda

    t0 = time.perf_counter()
    result = {**header()}
    try:
        variants = ort_cuda.prepare(work / "e32", say=log)["variants"]
        result["ort_cuda"] = {k: {"fused_ops": v["fused_ops"], "seconds": v["seconds"]} for k, v in variants.items()}
        if (work / "e32i" / "manifest.json").is_file():
            ort_cuda.prepare(work / "e32i", components=("vae_decoder",), say=log)
    except Exception as exc:
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    save(out, "ortprep", result)


def configs(work: Path):
    """(label, export dir, backend, engine options, torch flags) for the four-way table and the peers."""
    e32, e16 = work / "e32", work / "e16"
    return [
        ("FP32 eager (TF32 off)", e32, "torch", {"dtype": "fp32"}, {"tf32": False}),
        ("FP16 eager (SDPA)", e32, "torch", {"dtype": "fp16"}, {}),
        ("FP32 engine: ORT CUDA, plain export (TF32 off)", e32, "ort", {"variant": "plain", "tf32": False}, {}),
        ("FP16 engine: ORT CUDA, AutoCast export", e16, "ort", {"variant": "plain"}, {}),
        ("FP16 engine: ORT CUDA, fused (dynamic)", e32, "ort", {"variant": "ort_cuda"}, {}),
        ("FP16 engine: ORT CUDA, fused static + step graph", e32, "ort",
         {"variant": "ort_cuda", "step_graph": True, "static": _static()}, {}),
        ("FP16 engine: ORT CUDA, fused static + step graph, fuse_conv_bias", e32, "ort",
         {"variant": "ort_cuda", "step_graph": True, "static": _static(), "cuda_options": {"fuse_conv_bias": "1"}},
         {}),
        ("FP16 engine: Inductor AOT (fused QKV, channels-last) + CUDA graph", e32, "inductor",
         {"cuda_graph": True}, {}),
        ("FP16 engine: Inductor AOT (fused QKV, channels-last) + step graph", e32, "inductor",
         {"step_graph": True}, {}),
        ("FP16 eager + CUDA graph", e32, "torch", {"dtype": "fp16", "cuda_graph": True}, {}),
        ("FP16 torch.compile + CUDA graph", e32, "torch", {"dtype": "fp16", "compile": True, "cuda_graph": True}, {}),
        ("FP16 torch.compile + step graph", e32, "torch", {"dtype": "fp16", "compile": True, "step_graph": True}, {}),
    ]


def set_tf32(on: bool | None) -> None:
    """TF32 for FP32 matmuls and convolutions: on, off, or None for torch's defaults (matmul off, cuDNN
    convolutions on), which is what `sdexport infer` and `bench` run with. Engine rows run with None: an FP32
    part of an FP16 engine (the SDXL VAE under force_upcast) then computes as users get it, as ONNX Runtime's
    CUDA provider does with its own default (TF32 on); the FP32 reference sets it off."""
    import torch

    if OPTS.device == "cpu":
        return
    torch.backends.cuda.matmul.allow_tf32 = bool(on)
    torch.backends.cudnn.allow_tf32 = True if on is None else on


def _psnr(a, b) -> float | None:
    import numpy as np

    from sdexport.quantize import psnr

    if a is None or b is None or a.shape != b.shape:
        return None
    value = psnr(np.asarray(a), np.asarray(b))
    return "identical" if value == float("inf") else round(value, 2)


def run_config(label, export_dir, backend, options, flags, settings_list, runs, warmup):
    """Figures per request of ``settings_list`` (engines loaded once), each with ``image`` (the last run's
    images, for the PSNR against FP32 eager; removed before saving) or ``error``."""
    from sdexport.bench import run_settings
    from sdexport.runtime import ExportDir

    set_tf32(flags.get("tf32"))
    try:
        if OPTS.quick:
            settings_list = [{**s, "steps": 2, "height": s["height"] // 4, "width": s["width"] // 4}
                             for s in settings_list]
            runs, warmup = 1, 1
        out = run_settings(ExportDir.open(export_dir), backend, OPTS.device, settings_list, runs, warmup, log,
                           label=label, **dict(options))
        return [{**figures, "image": result.images} for figures, result in out]
    except Exception as exc:
        traceback.print_exc()
        return [{"label": label, "error": f"{type(exc).__name__}: {exc}"[:2000]} for _ in settings_list]
    finally:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        set_tf32(False)


def stage_fourway(work: Path, out: Path, only: str | None = None, steps_list=(50, 30)) -> None:
    result = {**header(), "settings": {}, "results": {}}
    base = dict(prompt=PROMPT, negative_prompt="", guidance_scale=7.5, seed=0, height=512, width=512,
                batch_size=1, scheduler="euler")
    settings_list = [{**base, "steps": steps} for steps in steps_list]
    for settings in settings_list:
        result["settings"][str(settings["steps"])] = {k: v for k, v in settings.items() if k != "prompt"}
        result["results"].setdefault(str(settings["steps"]), [])
    reference: dict[int, object] = {}
    for label, exp, backend, options, flags in configs(work):
        if only and not any(part in label for part in only.split(",")):
            continue
        if not (exp / "manifest.json").is_file():
            log(f"{label}: skipped, {exp} was not prepared")
            continue
        rows = run_config(label, exp, backend, options, flags, settings_list, runs=3, warmup=1)
        for settings, row in zip(settings_list, rows):
            image = row.pop("image", None)
            if label.startswith("FP32 eager (TF32 off)"):
                reference[settings["steps"]] = image
            # same seed and prompt: how far each configuration's image is from FP32 eager's (random weights:
            # a consistency check of the engine, not image quality)
            row["psnr_vs_fp32_eager_db"] = _psnr(image, reference.get(settings["steps"]))
            result["results"][str(settings["steps"])].append(row)
        save(out, "fourway", result)
    save(out, "fourway", result)


def stage_sweep(work: Path, out: Path) -> None:
    """Images/s at batch 1, 2, 4, 8 (512 px, 30 steps): torch.compile + CUDA graph (the peer; automatic dynamic
    shapes after the first recompile), the ORT-fused static engine with step graphs (one engine per shape) and
    the dynamic-batch Inductor engine with step graphs; latency at 512/768/1024 px for the ORT engine."""
    result = {**header(), "batch": [], "resolution": []}
    from sdexport.components import Geometry

    base = dict(prompt=PROMPT, negative_prompt="", steps=30, guidance_scale=7.5, seed=0, scheduler="euler")
    size = 128 if OPTS.quick else 512
    batches = [("batch", b, {**base, "height": size, "width": size, "batch_size": b}) for b in OPTS.batches]
    sizes = [("resolution", px, {**base, "height": px, "width": px, "batch_size": 1})
             for px in ((128, 192, 256) if OPTS.quick else OPTS.sizes)]
    _sweep_dynamic(out, "sweep", result, work / "e32", work / "e32i", batches)
    for kind, value, settings in batches + sizes:  # static shapes: one engine per request
        geo = Geometry(settings["batch_size"], settings["height"], settings["width"])
        label = "FP16 engine: ORT CUDA, fused static + step graph"
        options = {"variant": "ort_cuda", "static": geo, "step_graph": True}
        row = run_config(label, work / "e32", "ort", options, {}, [settings], runs=2, warmup=1)[0]
        row.pop("image", None)
        result[kind].append({("batch" if kind == "batch" else "size"): value, **row})
        save(out, "sweep", result)


def _sweep_dynamic(out: Path, stage: str, result: dict, e32: Path, e32i: Path, batches: list) -> None:
    """The batch sweep's two dynamic-batch paths, each loaded once for every batch size: torch.compile + CUDA
    graph (the peer; automatic dynamic shapes after the first recompile) from ``e32``'s source model, and the
    dynamic-batch Inductor package of ``e32i`` with step graphs."""
    dynamic = [("FP16 torch.compile + CUDA graph", e32, "torch", {"dtype": "fp16", "compile": True, "cuda_graph": True}),
               ("FP16 engine: Inductor AOT dynamic batch + step graph", e32i, "inductor", {"step_graph": True})]
    for label, exp, backend, options in dynamic:
        rows = run_config(label, exp, backend, options, {}, [r[2] for r in batches], runs=2, warmup=1)
        for (kind, value, _), row in zip(batches, rows):
            row.pop("image", None)
            result[kind].append({"batch": value, **row})
        save(out, stage, result)
    by_label: dict[int, dict[str, float]] = {}
    for row in result["batch"]:
        if row.get("images_per_second"):
            by_label.setdefault(row["batch"], {})[row["label"]] = row["images_per_second"]
    result["inductor_vs_compile_images_per_second"] = {
        b: round(v[dynamic[1][0]] / v[dynamic[0][0]], 3) for b, v in sorted(by_label.items()) if len(v) == 2}
    save(out, stage, result)


def stage_sdxl_sweep(work: Path, out: Path) -> None:
    """SDXL images/s at batch 1, 2, 4, 8 (1024 px, 30 Euler steps, guidance 5.0): torch.compile + CUDA graph
    against the dynamic-batch Inductor engine (UNet and FP32 VAE packages for 1..8 images at 1024x1024) with
    step graphs. Writes its own export (``sdxl-e32s``: text encoders and VAE for up to 8 images) beside the
    preset (written here too if sdxl-prepare has not)."""
    from sdexport.export import export
    from sdexport.inductor import build as build_inductor

    model, _ = _sdxl_dirs(work)
    e32s = work / "sdxl-e32s"
    result = {**header(), "steps": {}, "batch": []}
    size = SDXL_SIZE // 2 if OPTS.quick else SDXL_SIZE  # run_config's --quick quarters it: 128 px on sdxl-tiny
    compiled = SDXL_SIZE // 8 if OPTS.quick else SDXL_SIZE

    def timed(step, fn):
        return timed_step(result, out, "sdxl-sweep", step, fn)

    _sdxl_preset(model, timed)
    max_batch = max(OPTS.batches)
    timed("export fp32", lambda: export(str(model), e32s, components=[p for p in SDXL_PARTS if p != "unet"],
                                        max_images=max_batch, say=log))
    timed("inductor dynamic batch", lambda: build_inductor(
        e32s, f"{compiled}x{compiled}", batch=None, max_batch=max_batch, components=["unet", "vae_decoder"],
        precision=_inductor_precision(), device=OPTS.device, say=log))
    base = dict(prompt=PROMPT, negative_prompt=None, steps=30, guidance_scale=5.0, seed=0, scheduler="euler",
                height=size, width=size)
    result["settings"] = {k: v for k, v in base.items() if k != "prompt"}
    batches = [("batch", b, {**base, "batch_size": b}) for b in OPTS.batches]
    _sweep_dynamic(out, "sdxl-sweep", result, e32s, e32s, batches)


def stage_sdxl_static(work: Path, out: Path) -> None:
    """SDXL images/s where one batch size is served (1024 px, 30 Euler steps, guidance 5.0): for each of
    --batches, the static Inductor packages (UNet FP16, VAE FP32 as ``force_upcast`` asks) for exactly that many
    images, with step graphs, against torch.compile + CUDA graph compiled first at that size (so it specializes
    on it, as the packages do; torch._dynamo is reset before it). The engine row runs before and after the
    peer's, so drift on the machine shows as a gap between the two. Run one batch size per process for the
    committed numbers. Writes its own export (``sdxl-e32b``: text encoders and VAE) beside the preset."""
    from sdexport.export import export
    from sdexport.inductor import build as build_inductor

    model, _ = _sdxl_dirs(work)
    e32b = work / "sdxl-e32b"
    result = {**header(), "steps": {}, "batch": [], "static_vs_compile_images_per_second": {}}
    size = SDXL_SIZE // 2 if OPTS.quick else SDXL_SIZE  # run_config's --quick quarters it: 128 px on sdxl-tiny
    compiled = SDXL_SIZE // 8 if OPTS.quick else SDXL_SIZE

    def timed(step, fn):
        return timed_step(result, out, "sdxl-static", step, fn)

    _sdxl_preset(model, timed)
    # up to 8 images whatever --batches is, so that a process per batch size reuses the first one's export
    timed("export fp32", lambda: export(str(model), e32b, components=[p for p in SDXL_PARTS if p != "unet"],
                                        max_images=max(8, *OPTS.batches), say=log))
    base = dict(prompt=PROMPT, negative_prompt=None, steps=30, guidance_scale=5.0, seed=0, scheduler="euler",
                height=size, width=size)
    result["settings"] = {k: v for k, v in base.items() if k != "prompt"}
    engine = "FP16 engine: Inductor AOT static batch + step graph"
    peer = "FP16 torch.compile + CUDA graph (compiled first at this batch)"
    for b in OPTS.batches:
        timed(f"inductor static batch {b}", lambda: build_inductor(
            e32b, f"{compiled}x{compiled}", batch=b, components=["unet", "vae_decoder"],
            precision=_inductor_precision(), device=OPTS.device, say=log))
        settings = {**base, "batch_size": b}
        rows = {}
        gpu = OPTS.device != "cpu"  # a CPU dry run checks the code paths: no graphs, FP32
        engine_options = {"step_graph": True} if gpu else {}
        peer_options = {"dtype": "fp16", "compile": True, "cuda_graph": True} if gpu else {"compile": True}
        for key, label, backend, options in (
                ("engine", engine, "inductor", engine_options),
                ("peer", peer, "torch", peer_options),
                ("engine_again", engine + " (again, after the peer)", "inductor", engine_options)):
            if backend == "torch":
                import torch

                torch._dynamo.reset()
            row = run_config(label, e32b, backend, options, {}, [settings], runs=3, warmup=1)[0]
            rows[key] = row
        images = {k: r.pop("image", None) for k, r in rows.items()}
        for key, row in rows.items():
            if key != "peer" and images.get(key) is not None and images.get("peer") is not None:
                row["psnr_vs_peer"] = _psnr(images[key], images["peer"])
            result["batch"].append({"batch": b, **row})
        ips = {k: r.get("images_per_second") for k, r in rows.items()}
        if ips["peer"] and ips["engine"]:
            result["static_vs_compile_images_per_second"][b] = {
                "engine": round(ips["engine"] / ips["peer"], 4),
                **({"engine_again": round(ips["engine_again"] / ips["peer"], 4)} if ips["engine_again"] else {})}
        save(out, "sdxl-static", result)


def stage_trt(work: Path, out: Path) -> None:
    result = {**header()}
    try:
        from sdexport.build import build

        t0 = time.perf_counter()
        manifest = build(work / "e16", precision="fp16", say=log)
        result["build_seconds_total"] = round(time.perf_counter() - t0, 1)
        result["engines"] = manifest.engines if hasattr(manifest, "engines") else manifest
    except Exception as exc:
        traceback.print_exc()
        result["build_error"] = f"{type(exc).__name__}: {exc}"[:3000]
    save(out, "trt", result)
    try:
        from sdexport.backends import load_engines

        load_engines(work / "e16", "trt", device=OPTS.device)
        result["run"] = "engines loaded"
    except Exception as exc:
        result["run_refused"] = f"{type(exc).__name__}: {exc}"[:3000]
    save(out, "trt", result)


def stage_int8(work: Path, out: Path) -> None:
    """Issue 4 on the GPU machine: calibrate on the PyTorch pipeline, quantize the FP32 UNet (ModelOpt,
    max calibration, default excludes), then `sdexport validate`'s INT8 report (UNet error at early/middle/
    late timesteps, final latents, image PSNR/SSIM) against FP32 and the ORT-fused FP16 UNet."""
    from sdexport.calibration import calibrate
    from sdexport.quantize import quantize
    from sdexport.validate import validate

    result = {**header(), "steps": {}}
    e32, calib = work / "e32", work / "calib.npz"
    quick = OPTS.quick

    def timed(name, fn):
        return timed_step(result, out, "int8", name, fn)

    settings = dict(num_prompts=4 if quick else 32, steps=4 if quick else 20, max_samples=16 if quick else 128)
    result["calibration_settings"] = settings
    set_tf32(False)
    if not calib.is_file():  # a re-run on a warm machine resumes where the last one stopped
        timed("calibrate", lambda: calibrate(str(work / "sd15"), calib, device=OPTS.device, say=log,
                                             progress_bar=False, **settings))
    entry = timed("quantize", lambda: quantize(e32, calib, method="max", say=log))
    if entry:
        result["quantize"] = {k: v for k, v in entry.items() if k in ("precision", "size_bytes", "quantize_seconds",
                                                                        "opset", "nodes", "calibration")}
        result["quantize"]["precision"].pop("excluded_nodes", None)
    report = timed("validate", lambda: validate(e32, backend="ort", device=OPTS.device, components=["unet_int8"],
                                                say=log, write_report=False))
    if report:
        result["validate"] = {"passed": report["passed"], "results": report["results"], "int8": report.get("int8")}
    save(out, "int8", result)


def stage_profile(work: Path, out: Path) -> None:
    """Top GPU kernels of one UNet step (batch 2, 64x64 latent) for the fastest engine and for
    torch.compile, from torch.profiler (CUPTI sees ONNX Runtime's kernels in the same process)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from sdexport.backends import load_engines
    from sdexport.components import Geometry

    result = {**header(), "note": "kernel time summed over 5 UNet calls, after warm-up; no CUDA graph "
              "(graph replays hide kernels from the profiler), so launch gaps are not included"}
    geo = Geometry(1, 512, 512) if not OPTS.quick else Geometry(1, 32, 32)
    # The fused graph's numbers against FP32 on the same feed (TF32 off): a wrong fusion shows here first.
    set_tf32(False)
    ref_engine = load_engines(work / "e32", "torch", components=["unet"], device=OPTS.device, dtype="fp32")["unet"]
    ref_feed = ref_engine.spec.sample_inputs(ref_engine.spec.dims_for(geo), device=OPTS.device, seed=7)
    with torch.inference_mode():
        reference = ref_engine(ref_feed)["out_sample"].float().clone()
    del ref_engine
    torch.cuda.empty_cache()
    for label, backend, options in (("ORT CUDA fused FP16", "ort", {"variant": "ort_cuda"}),
                                    ("torch.compile FP16", "torch", {"dtype": "fp16", "compile": True})):
        try:
            engine = load_engines(work / "e32", backend, components=["unet"], device=OPTS.device, **options)["unet"]
            feed = engine.spec.sample_inputs(engine.spec.dims_for(geo), device=OPTS.device)
            for _ in range(3):
                engine(feed)
            with torch.inference_mode():
                got = engine(ref_feed)["out_sample"].float()
            result.setdefault("vs_fp32", {})[label] = rel_error(got, reference)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    engine(feed)
                torch.cuda.synchronize()
            rows = []
            for evt in prof.key_averages():
                dev_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
                if dev_us > 0:
                    rows.append((evt.key, dev_us / 5 / 1e3, evt.count // 5))
            rows.sort(key=lambda r: -r[1])
            total = sum(r[1] for r in rows)
            result[label] = {"kernel_ms_per_step": round(total, 3),
                             "top": [{"kernel": k[:160], "ms_per_step": round(ms, 3), "share_pct": round(100 * ms / total, 1),
                                      "calls_per_step": n} for k, ms, n in rows[:15]]}
        except Exception as exc:
            traceback.print_exc()
            result[label] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        save(out, "profile", result)


def stage_lora(work: Path, out: Path) -> None:
    """Issue 11 on the GPU: how long switching a LoRA onto loaded engines takes per backend (no re-export, no
    rebuild), against the two things it replaces: a re-export with the LoRA fused (sdexport export --lora) and,
    for the Inductor engines, a rebuild. Runs the user's commands (sdexport bench --lora / export --lora) on
    prepare's FP32 export, with LoRAs of rank 16 on the UNet's and the text encoder's attention
    (benchmarks/make_lora.py). A -> B -> A exactness on CUDA is the GPU tests' job (tests/test_lora.py)."""
    import subprocess

    result = {**header(), "rows": {}}
    env = environment()
    loras = []
    for name, seed in (("lora_a", 1), ("lora_b", 2)):
        f = work / f"{name}.safetensors"
        if not f.is_file():
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_lora.py"), str(work / "sd15"), str(f),
                            "--seed", str(seed)], check=True, env=env)
        loras.append(f)
    steps = "2" if OPTS.quick else "30"
    for label, args in (("ORT CUDA (FP32 graphs)", ["--backend", "ort"]),
                        ("PyTorch eager FP32 (diffusers' load + fuse)", ["--backend", "torch"])):
        js = work / f"lora-bench-{len(result['rows'])}.json"
        cmd = [sys.executable, "-m", "sdexport", "bench", str(work / "e32"), *args, "--device", OPTS.device,
               "--steps", steps, "--runs", "3", "--no-eager", "--lora", f"{loras[0]}:0.8", "--json", str(js)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        row = {"command": " ".join(cmd[1:]), "rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
        if proc.returncode == 0 and js.is_file():
            data = json.loads(js.read_text())
            results = data.get("results") or data.get("rows") or []
            first = results[0] if results else {}
            row.update({"lora_switch": first.get("lora_switch"), "stages_ms": first.get("stages_ms"),
                        "load_seconds": first.get("load_seconds")})
        else:
            row["stderr_tail"] = proc.stderr[-2000:]
        result["rows"][label] = row
        log(f"lora {label}: {row.get('lora_switch') or row.get('stderr_tail', '')[-300:]}")
        save(out, "lora", result)
    # what a switch replaces: re-export with the LoRA fused, and (Inductor) a rebuild of the UNet package
    if OPTS.no_reexport:
        return
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sdexport", "export", str(work / "sd15"), "-o", str(work / "e32lora"),
                           "--components", ",".join(COMPONENTS), "--max-batch", "8", "--lora", f"{loras[0]}:0.8"],
                          env=env, capture_output=True, text=True)
    result["reexport_with_lora"] = {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
                                    **({"stderr_tail": proc.stderr[-1500:]} if proc.returncode else {})}
    save(out, "lora", result)


# --- SDXL (issue 10) ----------------------------------------------------------------------------------
SDXL_PARTS = ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
SDXL_SIZE = 1024


def _sdxl_dirs(work: Path) -> tuple[Path, Path]:
    return work / "sdxl-model", work / OPTS.sdxl_export


def _sdxl_preset(model: Path, timed) -> None:
    """The SDXL stages' shared preset in ``model`` (sdxl-tiny with --quick), written once per --work."""
    from sdexport.models import write_preset

    if not (model / "model_index.json").is_file():
        name = "sdxl-tiny" if OPTS.quick else "sdxl-random"
        timed(f"preset {name}", lambda: write_preset(name, model, progress=log))


def _reference_file(work: Path, settings: dict) -> Path:
    """Where the sdxl stage keeps FP32 eager's image for these settings, so that rows measured by another
    invocation on the same host (e.g. the ORT rows, after their variant is prepared) get their PSNR."""
    import hashlib

    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return work / f"sdxl-fp32-eager-{digest}.npy"


def _keep_reference(path: Path, image) -> None:
    """Under its final name only when whole: chains beside each other read it, and a torn file (a full disk,
    a killed run) would stop every later sdxl invocation at its np.load."""
    import numpy as np

    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        with open(part, "wb") as f:
            np.save(f, np.asarray(image))
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def stage_sdxl_prepare(work: Path, out: Path) -> None:
    """sdxl-random (written once into --work) and its FP32 export: 512-1536 px (SDXL's default range), one
    image per call (UNet batch 2 with guidance), the components the sampler loop runs."""
    from sdexport.export import export
    from sdexport.inductor import build as build_inductor

    result = {**header(), "steps": {}}
    model, e32 = _sdxl_dirs(work)

    def timed(step, fn):
        return timed_step(result, out, "sdxl-prepare", step, fn)

    _sdxl_preset(model, timed)
    # The UNet's FP32 ONNX export (10 GB) is left out unless --sdxl-onnx-unet: the engine measured here is the
    # Inductor package, compiled from the source model; the ORT rows need the ONNX UNet (sdxl-ortprep).
    parts = SDXL_PARTS if OPTS.sdxl_onnx_unet else [p for p in SDXL_PARTS if p != "unet"]
    timed("export fp32", lambda: export(str(model), e32, components=parts, max_images=1, say=log))
    size = SDXL_SIZE // 8 if OPTS.quick else SDXL_SIZE
    if not OPTS.no_inductor:
        timed("inductor", lambda: build_inductor(e32, f"{size}x{size}", batch=1, components=["unet", "vae_decoder"],
                                                 precision=_inductor_precision(), device=OPTS.device, say=log))
    if (e32 / "manifest.json").is_file():
        manifest = json.loads((e32 / "manifest.json").read_text())
        result["e32_sizes_mib"] = {k: round(v["size_bytes"] / 2**20, 1) for k, v in manifest["components"].items()}
        result["e32_export_seconds"] = {k: v["export_seconds"] for k, v in manifest["components"].items()}
        result["ranges"] = manifest["ranges"]
    save(out, "sdxl-prepare", result)


def stage_sdxl_ortprep(work: Path, out: Path) -> None:
    from sdexport import ort_cuda

    result = {**header(), "steps": {}}
    variants = timed_step(result, out, "sdxl-ortprep", "ort_cuda",
                          lambda: ort_cuda.prepare(_sdxl_dirs(work)[1], say=log))
    if variants:
        result["ort_cuda"] = {k: {"fused_ops": v["fused_ops"], "seconds": v["seconds"]} for k, v in variants.items()}
    save(out, "sdxl-ortprep", result)


def stage_sdxl_trt(work: Path, out: Path) -> None:
    """Issue 10 on the GPU host: the FP16 export of sdxl-random (AutoCast; the force_upcast VAE stays FP32)
    and a TensorRT build of each component for one static 1024x1024 image, with the flavour `sdexport build`
    picks here (NVIDIA's tensorrt for this GPU where installed, else TensorRT-RTX for its default targets):
    build time and plan size per component, or the build's error. Needs sdxl-prepare's preset."""
    from sdexport.build import build
    from sdexport.export import export

    model, e16 = _sdxl_dirs(work)[0], work / "sdxl-e16"
    result = {**header(), "steps": {}, "engines": {}}
    size = SDXL_SIZE // 8 if OPTS.quick else SDXL_SIZE
    timed_step(result, out, "sdxl-trt", "export fp16",
               lambda: export(str(model), e16, dtype="fp16", max_images=1, say=log))
    for component in ("unet", "text_encoder", "text_encoder_2", "vae_decoder"):
        t0 = time.perf_counter()
        try:
            build(e16, precision="fp16", components=[component], static=f"{size}x{size}", batch=1, say=log)
            entry = json.loads((e16 / "manifest.json").read_text())["engines"][component]
            result["engines"][component] = {
                "seconds": round(time.perf_counter() - t0, 1), "size_mib": round(entry["size_bytes"] / 2**20, 1),
                "file": entry["file"], "precision": entry.get("precision"),
                "compute_capabilities": entry.get("compute_capabilities")}
        except Exception as exc:  # recorded (e.g. TensorRT-RTX 1.7's known FP16 text encoder failure), next one
            result["engines"][component] = {"seconds": round(time.perf_counter() - t0, 1),
                                            "error": f"{type(exc).__name__}: {exc}"[:1500]}
        log(f"sdxl-trt {component}: {result['engines'][component]}")
        save(out, "sdxl-trt", result)


def sdxl_configs(e32: Path):
    from sdexport.components import Geometry

    size = SDXL_SIZE // 8 if OPTS.quick else SDXL_SIZE  # --quick: sdxl-tiny at its native 128 px
    static = Geometry(1, size, size)
    return [
        ("FP32 eager (TF32 off)", "torch", {"dtype": "fp32"}, {"tf32": False}),
        ("FP16 eager (SDPA)", "torch", {"dtype": "fp16"}, {}),
        ("FP16 eager + CUDA graph", "torch", {"dtype": "fp16", "cuda_graph": True}, {}),
        ("FP16 torch.compile + CUDA graph", "torch", {"dtype": "fp16", "compile": True, "cuda_graph": True}, {}),
        ("FP16 engine: ORT CUDA, fused (dynamic)", "ort", {"variant": "ort_cuda"}, {}),
        ("FP16 engine: ORT CUDA, fused static + step graph", "ort",
         {"variant": "ort_cuda", "step_graph": True, "static": static}, {}),
        ("FP16 engine: Inductor AOT (fused QKV, channels-last) + step graph", "inductor", {"step_graph": True}, {}),
    ]


def _vae_at_native(e32: Path) -> dict:
    """The VAE decoder alone at 1024 px (latent 128x128), PyTorch eager FP32 and FP16 (diffusers runs the SDXL
    VAE in FP32: force_upcast), CUDA-event timed, and the FP16 output's error against FP32. Random weights do
    not reproduce the real SDXL VAE's FP16 overflow; the error here is FP16 rounding only."""
    import torch

    from sdexport.backends.torch import TorchEngine
    from sdexport.runtime import ExportDir

    export = ExportDir.open(e32)
    spec = export.spec("vae_decoder")
    module = export.source_model().load_torch("vae")
    latent = (SDXL_SIZE // 8) // (8 if OPTS.quick else 1)
    feed = {"latent_sample": torch.randn(1, 4, latent, latent, generator=torch.Generator("cpu").manual_seed(0))
            .to(OPTS.device)}
    from sdexport.timing import StageClock

    cuda = OPTS.device.startswith("cuda")
    result, outputs = {"latent": [1, 4, latent, latent], "keep_fp32": spec.keep_fp32}, {}
    # fp32: TF32 off (the reference); fp32_tf32: torch's defaults, cuDNN convolutions in TF32 (what infer runs
    # for a force_upcast VAE); fp16: what a force_upcast: false VAE runs
    for label, dtype, tf32 in (("fp32", "fp32", False), ("fp32_tf32", "fp32", None), ("fp16", "fp16", False)):
        set_tf32(tf32)
        engine = TorchEngine(spec, module, OPTS.device, dtype)  # directly: load_all would keep it FP32
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            for _ in range(2):
                engine(feed)
            clock = StageClock(OPTS.device)
            for _ in range(5):
                with clock.stage("vae"):
                    outputs[label] = engine(feed)["sample"].float().clone()
        times = sorted(clock.results_ms()["vae"])
        result[label] = {"median_ms": round(times[len(times) // 2], 2),
                         **({"torch_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if cuda else {})}
        del engine
        if cuda:
            torch.cuda.empty_cache()
    result["fp16_vs_fp32"] = rel_error(outputs["fp16"], outputs["fp32"])
    result["fp32_tf32_vs_fp32"] = rel_error(outputs["fp32_tf32"], outputs["fp32"])
    set_tf32(False)
    return result


def stage_sdxl(work: Path, out: Path, only: str | None = None) -> None:
    model, e32 = _sdxl_dirs(work)
    result = {**header(), "results": [], "steps": {}}
    size = SDXL_SIZE // 2 if OPTS.quick else SDXL_SIZE  # run_config's --quick quarters it: 128 px on sdxl-tiny
    settings = dict(prompt=PROMPT, negative_prompt=None, steps=30, guidance_scale=5.0, seed=0, height=size,
                    width=size, batch_size=1, scheduler="euler")
    result["settings"] = {k: v for k, v in settings.items() if k != "prompt"}
    import numpy as np

    kept = _reference_file(work, {**settings, "quick": OPTS.quick})
    reference = np.load(kept) if kept.is_file() else None
    for label, backend, options, flags in sdxl_configs(e32):
        if only and not any(part in label for part in only.split(",")):
            continue
        row = run_config(label, e32, backend, options, flags, [settings], runs=2, warmup=1)[0]
        image = row.pop("image", None)
        if label.startswith("FP32 eager") and image is not None:
            reference = np.asarray(image)
            _keep_reference(kept, reference)
        row["psnr_vs_fp32_eager_db"] = _psnr(image, reference)
        result["results"].append(row)
        save(out, "sdxl", result)
    if not only or "vae" in only:
        result["vae_decoder_1024"] = timed_step(result, out, "sdxl", "vae", lambda: _vae_at_native(e32))
    save(out, "sdxl", result)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["prepare", "serve-prepare", "ortprep", "fourway", "sweep", "trt", "profile", "int8",
                                          "sdxl-prepare", "sdxl-ortprep", "sdxl", "sdxl-trt", "sdxl-sweep", "sdxl-static",
                                          "lora"])
    parser.add_argument("--work", default="/tmp/sdx")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/raw"))
    parser.add_argument("--only", default=None, help="fourway: run only configs whose label contains one of these (comma-separated)")
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", default="50,30", help="fourway: step counts, comma-separated")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 steps, 1/4 size, 1 run")
    parser.add_argument("--skip-fp16", action="store_true", help="prepare: no AutoCast FP16 export (saves ~5 min)")
    parser.add_argument("--skip-ort", action="store_true",
                        help="prepare: no ONNX Runtime CUDA variants (run the ortprep stage later)")
    parser.add_argument("--batches", default="1,2,4,8", help="sweep: batch sizes")
    parser.add_argument("--sizes", default="512,768,1024", help="sweep: image sides (empty: none)")
    parser.add_argument("--sdxl-onnx-unet", action="store_true",
                        help="sdxl-prepare: also export the SDXL UNet to ONNX (10 GB FP32; the ORT rows need it)")
    parser.add_argument("--sdxl-export", default="sdxl-e32",
                        help="sdxl stages: the FP32 export's folder under --work (chains that run beside each other "
                             "each write their own; the preset sdxl-model is shared)")
    parser.add_argument("--no-inductor", action="store_true",
                        help="sdxl-prepare: no Inductor package (its rows are left out; saves ~5 min)")
    parser.add_argument("--no-reexport", action="store_true",
                        help="lora: leave out the re-export with the LoRA fused (the thing a switch replaces)")
    args = parser.parse_args()
    OPTS.no_inductor, OPTS.no_reexport = args.no_inductor, args.no_reexport
    OPTS.model, OPTS.device, OPTS.quick, OPTS.skip_fp16 = args.model, args.device, args.quick, args.skip_fp16
    OPTS.sdxl_onnx_unet, OPTS.skip_ort, OPTS.sdxl_export = args.sdxl_onnx_unet, args.skip_ort, args.sdxl_export
    OPTS.batches = [int(b) for b in args.batches.split(",") if b]
    OPTS.sizes = [int(p) for p in args.sizes.split(",") if p]
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    {"prepare": stage_prepare, "serve-prepare": stage_serve_prepare, "ortprep": stage_ortprep, "sweep": stage_sweep, "trt": stage_trt,
     "profile": stage_profile, "int8": stage_int8, "sdxl-prepare": stage_sdxl_prepare,
     "sdxl-ortprep": stage_sdxl_ortprep, "sdxl-trt": stage_sdxl_trt, "sdxl-sweep": stage_sdxl_sweep,
     "sdxl-static": stage_sdxl_static, "lora": stage_lora, "sdxl": lambda w, o: stage_sdxl(w, o, args.only)}.get(
        args.stage, lambda w, o: stage_fourway(w, o, args.only, [int(x) for x in args.steps.split(",")]))(work, out)


if __name__ == "__main__":
    main()
