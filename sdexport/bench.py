"""Benchmark: an engine backend against PyTorch eager, same shapes, same process, one run.

For each backend the full sampler loop runs ``warmup`` times untimed and ``runs``
times timed. Stage times come from the pipeline's own StageClock (CUDA events on
a GPU); per-step UNet latency is the distribution of every UNet call in the timed
runs. The loop's own overhead is the denoising loop's time minus the time inside
UNet calls (scheduler, guidance, casts, and any GPU idle gap between steps).
Peak memory is sampled while each backend runs: process RSS on the CPU, and on a
GPU the device memory in use (all allocators, ONNX Runtime's arena included) plus
torch's allocator peak. This is a benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any, Callable

from .backends import load_engines
from .manifest import versions
from .pipeline import Pipeline, check_request
from .runtime import ExportDir
from .timing import summarize_ms


class PeakMemory:
    """Samples memory in a background thread; reports the peak above the starting level."""

    def __init__(self, device: str, interval_s: float = 0.005):
        self.cuda = device.startswith("cuda")
        self.interval_s = interval_s
        self.peak_rss = self.base_rss = self._rss()
        self.peak_dev = self.base_dev = self._dev()
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _dev(self) -> int:
        if not self.cuda:
            return 0
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.peak_rss = max(self.peak_rss, self._rss())
            self.peak_dev = max(self.peak_dev, self._dev())

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._rss())
        self.peak_dev = max(self.peak_dev, self._dev())

    def result(self) -> dict[str, float]:
        out = {"process_rss_peak_mib": round(self.peak_rss / 2**20, 1),
               "process_rss_increase_mib": round((self.peak_rss - self.base_rss) / 2**20, 1)}
        if self.cuda:
            import torch

            out["device_used_peak_mib"] = round(self.peak_dev / 2**20, 1)
            out["device_used_increase_mib"] = round((self.peak_dev - self.base_dev) / 2**20, 1)
            out["torch_allocator_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count()}
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["compute_capability"] = f"{props.major}.{props.minor}"
            info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["cuda"] = torch.version.cuda
            try:
                import subprocess

                info["driver"] = subprocess.run(  # one line per GPU, the same driver on each: the first
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True, text=True, timeout=20).stdout.strip().partition("\n")[0]
                info["gpu_count"] = torch.cuda.device_count()
            except (OSError, subprocess.SubprocessError):
                pass
    except ImportError:
        pass
    return info


def engine_label(backend: str, engine_options: dict[str, Any]) -> str:
    """The name of a row (table header and per-step line, progress, warnings, bench.json's ``label``) from the
    options its engines load with: the backend, and for torch whether the modules run eager or under
    ``torch.compile`` (``compile``) and their precision (``dtype``)."""
    if backend != "torch":
        return backend
    mode = "torch.compile" if engine_options.get("compile") else "torch eager"
    return f"{mode} {engine_options.get('dtype') or 'fp32'}"


def run_backend(export: ExportDir, backend: str, device: str, settings: dict[str, Any], runs: int, warmup: int,
                say: Callable[[str], None], label: str | None = None, loras=(), **engine_options) -> dict[str, Any]:
    """Time the full loop on one backend configuration (engine options go to ``load_engines``)."""
    return run_settings(export, backend, device, [settings], runs, warmup, say, label, loras,
                        **engine_options)[0][0]


def run_settings(export: ExportDir, backend: str, device: str, settings_list: list[dict[str, Any]], runs: int,
                 warmup: int, say: Callable[[str], None], label: str | None = None, loras=(),
                 **engine_options) -> list[tuple[dict[str, Any], Any]]:
    """Load one backend configuration once and time the full loop for each request of ``settings_list``;
    returns (figures, last GenerationResult) per request. ``loras``: switched onto the engines first; the
    switch is timed (the first one, which reads the base weights, and then none <-> LoRAs back and forth)."""
    label = label or engine_label(backend, engine_options)
    say(f"{label}: loading engines")
    t0 = time.perf_counter()
    step_graph = engine_options.pop("step_graph", False)
    image_input = any(s.get("image") is not None for s in settings_list)
    engines = load_engines(export, backend, components=export.components_for(image_input), device=device,
                           **engine_options)
    load_s = time.perf_counter() - t0
    warnings: list[str] = []
    pipe = Pipeline(engines, export, device=device, warn=warnings.append, step_graph=step_graph)
    out = []
    switch: dict[str, Any] | None = None
    try:
        if loras:
            first = pipe.set_loras(loras)
            later = []
            for _ in range(2):
                pipe.set_loras([])
                later.append(pipe.set_loras(loras))
                say(f"{label}: LoRA switch {later[-1]['switch_ms']:.1f} ms")
            switch = {"first_ms": round(first["switch_ms"], 3),
                      **{f"{k}_median": round(statistics.median(t[k] for t in later), 3)
                         for k in ("switch_ms", "fuse_ms", "apply_ms", "files_ms", "base_ms")}}
        for settings in settings_list:
            summaries, unet_calls, loops = [], [], set()
            with PeakMemory(device) as mem:
                for i in range(warmup + runs):
                    result = pipe(**settings)
                    if i >= warmup:
                        summaries.append(result.stage_summary())
                        unet_calls.extend(result.timings_ms["unet"])
                        loops.add(result.loop)
                    say(f"{label}: {settings['steps']} steps, run {i + 1}/{warmup + runs}"
                        f"{' (warm-up)' if i < warmup else ''}: {result.stage_summary()['total_ms']:.1f} ms")
            med = {k: statistics.median(s[k] for s in summaries) for k in summaries[0]}
            figures = {
                "backend": backend, "label": label,
                "options": {k: str(v) for k, v in {**engine_options,
                                                   **({"step_graph": True} if step_graph else {})}.items()},
                # "step-graph": each step (UNet, guidance, scheduler update) is one CUDA graph replay, so the
                # "UNet step" figures time whole steps and the loop overhead is what remains between replays.
                "loop": "/".join(sorted(loops)), "warnings": sorted(set(warnings)),
                "load_seconds": round(load_s, 2),
                "stages_ms": {
                    **({"image_preprocess": round(med["image_preprocess_ms"], 3),
                        "vae_encoder": round(med["vae_encoder_ms"], 3)} if image_input else {}),
                    "text_encoder": round(med["text_encoder_ms"], 3),
                    "unet_total": round(med["unet_total_ms"], 3),
                    "vae_decoder": round(med["vae_decoder_ms"], 3),
                    "pipeline_total": round(med["total_ms"], 3),
                },
                "unet_steps": int(med["unet_steps"]),
                "unet_step_ms": summarize_ms(unet_calls),
                "images_per_second": round(settings["batch_size"] / (med["total_ms"] / 1e3), 4),
                "loop_overhead_ms": round(med["loop_overhead_ms"], 3),
                "loop_overhead_pct": round(med["loop_overhead_pct"], 3),
                "outside_loop_and_engines_ms": round(med["other_ms"], 3),
                "memory": mem.result(),
                "runs": runs, "warmup": warmup,
                **({"lora_switch": switch, "loras": [lora.to_json() for lora in loras]} if switch else {}),
            }
            out.append((figures, result))
    finally:
        for engine in engines.values():
            engine.close()
        del engines, pipe
        gc.collect()
    return out


# p90 of the per-step UNet latency above this multiple of the median: the timings are noise (a busy machine).
NOISY_SPREAD = 1.5


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> dict[str, Any]:
    """Set PyTorch's intra-op threads (ONNX Runtime's are set per session from the same number) and
    describe what the timings ran with: the same count for both, recorded, never each library's default."""
    import torch

    threads = threads or usable_cores()
    torch.set_num_threads(threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"threads": threads, "torch_intra_op": torch.get_num_threads(), "onnxruntime_intra_op": threads,
            "usable_cores": usable_cores(), "cpu_count": os.cpu_count(), "load_average_1m_at_start": load}


def noise_warnings(results: list[dict[str, Any]], threads: dict[str, Any]) -> list[str]:
    """Say when the numbers are noise: a p90/median spread of the UNet step above NOISY_SPREAD, or a
    machine already busier than its cores when the benchmark started."""
    out = []
    for r in results:
        u = r["unet_step_ms"]
        spread = u["p90_ms"] / u["median_ms"] if u["median_ms"] else 0.0
        r["unet_step_spread"] = round(spread, 3)
        if spread > NOISY_SPREAD:
            out.append(f"{r['label']}: UNet step p90 is {spread:.2f}x the median (n={u['n']}): these timings "
                       "are noise, not the engine's speed; rerun on an idle machine or with more --runs")
    load = threads.get("load_average_1m_at_start")
    if load is not None and load > threads["usable_cores"]:
        out.append(f"the machine was busy when the benchmark started (load average {load:.1f} on "
                   f"{threads['usable_cores']} usable cores): ratios between backends are not reliable")
    return out


def bench(export_dir, backend: str = "ort", device: str = "cpu", steps: int | None = None, height: int | None = None,
          width: int | None = None, batch_size: int = 1, guidance_scale: float | None = None,
          scheduler: str | None = None,
          runs: int = 3, warmup: int = 1, eager_dtype: str = "fp32", compare_eager: bool = True,
          say: Callable[[str], None] = lambda msg: None, unet: str = "default", cuda_graph: bool = False,
          torch_compile: bool = False, step_graph: bool = False, threads: int | None = None,
          json_path: str | os.PathLike | None = None, model_dir: str | os.PathLike | None = None, image=None,
          mask=None, strength: float | None = None, loras=(), inputs=None) -> dict[str, Any]:
    """``image`` (and ``mask``): time image-to-image (inpainting) requests; the table then has a VAE-encode row.
    ``inputs``: the request's files (paths.request_inputs), which ``json_path`` must not overwrite.
    ``steps``/``guidance_scale`` None: the model family's defaults, as infer takes them
    (``Family.request_defaults``: e.g. 30 steps, 4 for an LCM model)."""
    from . import limits
    from .paths import check_report_output

    limits.count("--runs", runs, 1, limits.MAX_RUNS)
    limits.count("--warmup", warmup, 0, limits.MAX_WARMUP)
    if threads is not None:
        limits.count("--threads", threads, 1, limits.MAX_THREADS)
    if torch_compile and backend != "torch":  # it used to be ignored: a table that did not measure what was asked
        from .errors import UsageError

        raise UsageError(f"--torch-compile compiles the modules of --backend torch; --backend {backend} runs its own "
                         "engines, and the eager comparison stays eager (time torch.compile with --backend torch)")
    if not compare_eager and backend != "torch" and eager_dtype != "fp32":  # ignored too: a table without it
        from .errors import UsageError

        raise UsageError(f"--eager-dtype {eager_dtype} is the precision of the PyTorch eager comparison, which "
                         f"--no-eager leaves out; give one of them (or time torch in {eager_dtype} with --backend "
                         "torch)")
    export = ExportDir.open(export_dir, model=model_dir)
    steps, guidance_scale = export.family.request_settings(export.info, steps, guidance_scale)  # infer's
    if image is not None and mask is None and (height is None or width is None):
        f = export.info.vae_scale_factor  # image-to-image keeps the image's size (rounded as diffusers does)
        height, width = height or image.size[1] // f * f, width or image.size[0] // f * f
    settings = dict(prompt="a photograph of an astronaut riding a horse", negative_prompt="", steps=steps,
                    guidance_scale=guidance_scale, seed=0,
                    height=export.ranges.opt_size if height is None else height,
                    width=export.ranges.opt_size if width is None else width, batch_size=batch_size,
                    scheduler=scheduler,
                    **({"image": image, "mask": mask, "strength": strength} if image is not None else {}))
    if image is None:
        export.family.check_text_to_image(export.info)
    check_request(export.ranges, steps, guidance_scale, _geometry(export, settings))
    limits.check_schedule(scheduler, export.info.scheduler_config, steps)
    if json_path is not None:
        check_report_output("--json", json_path, export, model_dir, inputs)
    if compare_eager or backend == "torch":
        export.source_model()  # PyTorch eager runs the source model: find it before timing the engines
    device = limits.device("--device", device)
    if (cuda_graph or step_graph) and not device.startswith("cuda"):
        from .errors import UsageError

        raise UsageError(f"--{'step' if step_graph else 'cuda'}-graph needs a CUDA device (--device cuda)")
    thread_info = set_threads(threads)
    unet_option = {"unet": unet, "label": f"{backend} (INT8 UNet)"} if unet != "default" else {}  # sdexport quantize
    options: dict[str, Any] = dict(unet_option)
    if step_graph:  # whole steps captured by the pipeline (engines without graphs of their own); ONNX Runtime
        # opened for this one static shape
        options.update(step_graph=True, cuda_graph=False,
                       **({"static": _geometry(export, settings)} if backend == "ort" else {}))
    elif cuda_graph:  # ONNX Runtime: static shapes for this request + its own graph capture; torch: CudaGraphed
        options.update(cuda_graph=True, **({"static": _geometry(export, settings)} if backend == "ort" else {}))
    if backend == "torch":
        options.update(dtype=eager_dtype, **({"compile": True} if torch_compile else {}))
    if backend == "ort":
        options.update(threads=thread_info["threads"])
    if loras:
        from .lora import engine_options

        options.update(engine_options(backend))
    results = [run_backend(export, backend, device, settings, runs, warmup, say, loras=loras, **options)]
    if compare_eager and backend != "torch":
        results.append(run_backend(export, "torch", device, settings, runs, warmup, say, loras=loras,
                                   dtype=eager_dtype))
    if len(results) == 2:
        engine, eager = results
        engine["speedup_vs_eager"] = {
            k: round(eager["stages_ms"][k] / v, 3) if v else None for k, v in engine["stages_ms"].items()}
        engine["speedup_vs_eager"]["unet_step_median"] = round(
            eager["unet_step_ms"]["median_ms"] / engine["unet_step_ms"]["median_ms"], 3)
    from .pipeline import make_scheduler

    scheduler_used = type(make_scheduler(scheduler, export.info.scheduler_config)).__name__
    noise = noise_warnings(results, thread_info)
    for message in noise:
        say(f"warning: {message}")
    return {
        "export": str(export.root.resolve()), "model": export.manifest.data["model"].get("preset")
        or export.manifest.data["model"]["path"], "export_dtype": export.dtype, "device": device,
        "settings": {**{k: v for k, v in settings.items() if k not in ("prompt", "image", "mask")},
                     "scheduler": scheduler or export.info.scheduler_config["_class_name"],
                     "scheduler_class": scheduler_used},
        "mode": "inpainting" if mask is not None else "image-to-image" if image is not None else "text-to-image",
        "results": results, "threads": thread_info, "noise_warnings": noise,
        "machine": machine(), "versions": versions(), "command": " ".join(["sdexport"] + sys.argv[1:]),
        "timer": "CUDA events" if device.startswith("cuda") else "time.perf_counter",
    }


def _geometry(export: ExportDir, settings: dict[str, Any]):
    from .components import Geometry

    return Geometry(settings["batch_size"], settings["height"], settings["width"],
                    guidance=export.family.guidance(export.info, settings["guidance_scale"]).cfg)


def format_table(report: dict[str, Any]) -> str:
    """The per-stage table TensorRT users know, engine next to eager."""
    results = report["results"]
    s = report["settings"]
    steps = results[0]["unet_steps"]
    head = (f"{report['model']} ({report['export_dtype']} export{', ' + report['mode'] if report.get('mode', 'text-to-image') != 'text-to-image' else ''}) on {report['device']}: "
            f"{s['height']}x{s['width']}, batch {s['batch_size']}, {s['steps']} steps, "
            f"guidance {s['guidance_scale']}, median of {results[0]['runs']} runs ({report['timer']})")
    cols = [r["label"] for r in results] + (["speed-up"] if len(results) == 2 else [])
    rows = [("CLIP text encoder", "text_encoder"), (f"UNet x {steps}", "unet_total"),
            ("VAE decode", "vae_decoder"), ("Pipeline total", "pipeline_total")]
    if "vae_encoder" in results[0]["stages_ms"]:  # image-to-image / inpainting
        rows.insert(0, ("VAE encode (image)", "vae_encoder"))
    if "image_preprocess" in results[0]["stages_ms"]:  # the image (and mask) resized and scaled (not in older reports)
        rows.insert(0, ("Image preprocessing", "image_preprocess"))
    width = max(22, *(len(c) + 2 for c in cols))
    lines = [head, "", f"{'stage':<22}" + "".join(f"{c:>{width}}" for c in cols)]
    for title, key in rows:
        vals = [f"{r['stages_ms'][key]:.2f} ms" for r in results]
        if len(results) == 2:
            vals.append(f"{results[0]['speedup_vs_eager'][key]:.2f}x")
        lines.append(f"{title:<22}" + "".join(f"{v:>{width}}" for v in vals))
    vals = [f"{r['images_per_second']:.3f}" for r in results]
    if len(results) == 2:
        vals.append(f"{results[0]['images_per_second'] / results[1]['images_per_second']:.2f}x")
    lines.append(f"{'Images / second':<22}" + "".join(f"{v:>{width}}" for v in vals))
    lines.append("")
    for r in results:
        u = r["unet_step_ms"]
        mem = r["memory"]
        mem_text = (f"device peak +{mem['device_used_increase_mib']} MiB, torch peak {mem['torch_allocator_peak_mib']} MiB"
                    if "device_used_increase_mib" in mem else f"RSS peak {mem['process_rss_peak_mib']} MiB "
                    f"(+{mem['process_rss_increase_mib']})")
        what = "step (graphed: UNet + guidance + scheduler)" if r.get("loop") == "step-graph" else "UNet step"
        lines.append(f"{r['label']}: {what} median {u['median_ms']:.3f} ms, p90 {u['p90_ms']:.3f} ms (n={u['n']}); "
                     f"loop overhead {r['loop_overhead_ms']:.2f} ms ({r['loop_overhead_pct']:.2f}%); {mem_text}")
    t = report.get("threads")
    if t:
        lines.append(f"threads: torch {t['torch_intra_op']}, onnxruntime {t['onnxruntime_intra_op']} "
                     f"({t['usable_cores']} usable cores)")
    for r in results:
        if r.get("lora_switch"):
            sw = r["lora_switch"]
            lines.append(f"{r['label']}: LoRA switch median {sw['switch_ms_median']:.1f} ms (diffusers fuse "
                         f"{sw['fuse_ms_median']:.1f}, of which files {sw['files_ms_median']:.1f} and base weights "
                         f"{sw['base_ms_median']:.1f}; + engines {sw['apply_ms_median']:.1f}); first {sw['first_ms']:.1f} ms")
    for r in results:
        for w in r.get("warnings", []):
            lines.append(f"{r['label']}: warning: {w}")
    for w in report.get("noise_warnings", []):
        lines.append(f"warning: {w}")
    if len(results) == 2:
        lines.append(f"UNet per-step speed-up vs eager: {results[0]['speedup_vs_eager']['unet_step_median']:.2f}x")
    return "\n".join(lines)
