"""Turn the JSON of benchmarks/gpu.sh into the committed Markdown report and chart.

usage: python benchmarks/report.py RESULTS_DIR      (writes RESULTS_DIR/README.md, and fourway.png or
                                                     sdxl-throughput.png; the charts need matplotlib:
                                                     pip install matplotlib)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGET_VS_EAGER = 3.5
TARGET_E2E_S = 0.40
SPEED_RATIO = 1.15  # issue 14: the fastest sdexport engine vs torch.compile + CUDA graph, per UNet step
SDXL_E2E_S = 1.1  # issue 14: a 30-step 1024x1024 SDXL image end to end
COMPILED = "FP16 torch.compile + CUDA graph"


def load(d: Path, name: str):
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def peer_row(ok):
    """torch.compile + CUDA graph: the row every speed target is measured against."""
    return next((r for r in ok if COMPILED in r["label"]), None)


def fastest_engine(ok):
    engines = [r for r in ok if "engine" in r["label"]]
    return min(engines, key=lambda r: r["unet_step_ms"]["median_ms"]) if engines else None


def speed_targets(rows, title, e2e_limit=None):
    """Issue 14's per-step target on one table: the fastest engine row against torch.compile + CUDA graph."""
    ok = [r for r in rows if "error" not in r]
    compiled, best = peer_row(ok), fastest_engine(ok)
    if not compiled or not best:
        return [f"- {title}: not measured (no torch.compile row or no engine row)"]
    ratio = compiled["unet_step_ms"]["median_ms"] / best["unet_step_ms"]["median_ms"]
    image = compiled["stages_ms"]["pipeline_total"] / best["stages_ms"]["pipeline_total"]
    lines = [f"- {title}: fastest engine `{best['label']}` {best['unet_step_ms']['median_ms']:.2f} ms/step vs "
             f"{compiled['unet_step_ms']['median_ms']:.2f} ms/step for torch.compile + CUDA graph: **{ratio:.3f}x** "
             f"per step (target {SPEED_RATIO}x: {'met' if ratio >= SPEED_RATIO else 'MISSED'}), {image:.3f}x per "
             f"image; PSNR vs FP32 eager {best.get('psnr_vs_fp32_eager_db')} dB (torch.compile's: "
             f"{compiled.get('psnr_vs_fp32_eager_db')} dB)"]
    if e2e_limit:
        e2e = best["stages_ms"]["pipeline_total"] / 1e3
        lines.append(f"- {title}: 30-step image end to end {e2e:.3f} s (target < {e2e_limit} s: "
                     f"{'met' if e2e < e2e_limit else 'MISSED'})")
    return lines


def throughput_targets(batch_rows):
    """Issue 14: images/s of the fastest engine at least torch.compile's at every batch."""
    by_batch: dict[int, dict[str, float]] = {}
    for r in batch_rows:
        if "error" not in r:
            by_batch.setdefault(r["batch"], {})[r["label"]] = r["images_per_second"]
    lines = []
    for b, rows in sorted(by_batch.items()):
        comp = rows.get(COMPILED)
        engines = {k: v for k, v in rows.items() if "engine" in k}
        if comp is None or not engines:
            continue
        label, best = max(engines.items(), key=lambda kv: kv[1])
        lines.append(f"- batch {b}: `{label}` {best:.2f} images/s vs torch.compile {comp:.2f}: {best / comp:.2f}x "
                     f"({'met' if best >= comp else 'MISSED'})")
    return lines


def sdxl_section(sdxl):
    rows = sdxl.get("results", [])
    st = sdxl.get("settings", {})
    md = [f"## SDXL ({st.get('height')}x{st.get('width')}, {st.get('steps')} steps, guidance "
          f"{st.get('guidance_scale')} (UNet batch 2), {st.get('scheduler')}; `sdxl-random`: SDXL base 1.0 "
          "architecture, random weights)", "",
          "| configuration | UNet ms/step (median / p90) | text encoders ms | UNet x N ms | VAE ms | image s | "
          "device mem +MiB | PSNR vs FP32 eager |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['label']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        sm, u = r["stages_ms"], r["unet_step_ms"]
        te = sum(v for k, v in sm.items() if k.startswith("text_encoder"))
        md.append(f"| {r['label']} | {u['median_ms']:.2f} / {u['p90_ms']:.2f} | {te:.2f} | {sm['unet_total']:.1f} | "
                  f"{sm.get('vae_decoder', 0):.2f} | {sm['pipeline_total'] / 1e3:.3f} | "
                  f"{r['memory'].get('device_used_increase_mib', '-')} | {r.get('psnr_vs_fp32_eager_db', '-')} |")
    vae = sdxl.get("vae_decoder_1024")
    if isinstance(vae, dict) and "fp32" in vae:
        md += ["", f"VAE decoder alone at 1024 px (PyTorch eager): FP32 {vae['fp32'].get('median_ms')} ms, FP16 "
               f"{vae['fp16'].get('median_ms')} ms; FP16 vs FP32 output rel-L2 {vae['fp16_vs_fp32'].get('rel_l2')} "
               f"(config force_upcast keeps it FP32: {vae.get('keep_fp32')})"]
    return md + [""]


def fourway_table(rows, steps):
    ok = [r for r in rows if "error" not in r]
    base = next((r for r in ok if r["label"].startswith("FP32 eager (TF32 off)")), None)
    eager16 = next((r for r in ok if r["label"].startswith("FP16 eager (SDPA)")), None)
    lines = [f"### {steps} steps, 512x512, batch 1, guidance 7.5 (UNet batch 2), Euler",
             "",
             "| configuration | UNet ms/step (median / p90) | CLIP ms | UNet x N ms | VAE ms | image s | "
             "vs FP32 eager | UNet step vs FP16 eager | loop overhead | device mem +MiB | PSNR vs FP32 eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:120]} | | | | | | | | | |")
            continue
        if r.get("warnings"):
            lines.append(f"| {r['label']} | warning: {'; '.join(r['warnings'])[:160]} | | | | | | | | | |")
        st, u = r["stages_ms"], r["unet_step_ms"]
        e2e = st["pipeline_total"] / 1e3
        vs32 = base["stages_ms"]["pipeline_total"] / st["pipeline_total"] if base else None
        vs16 = eager16["unet_step_ms"]["median_ms"] / u["median_ms"] if eager16 else None
        lines.append(f"| {r['label']} | {u['median_ms']:.2f} / {u['p90_ms']:.2f} | {st['text_encoder']:.2f} | "
                     f"{st['unet_total']:.1f} | {st['vae_decoder']:.2f} | {e2e:.3f} | {fmt(vs32)}x | {fmt(vs16)}x | "
                     f"{r['loop_overhead_pct']:.2f}% | {r['memory'].get('device_used_increase_mib', '-')} | "
                     f"{r.get('psnr_vs_fp32_eager_db', '-')} |")
    lines += ["", "Step-graph rows (`loop: step-graph`): each denoising step (UNet, guidance, scheduler update) is one "
              "CUDA graph replay, so their \"UNet ms/step\" is the whole step and their loop overhead is what is "
              "left between replays. PSNR: the row's image against FP32 eager's for the same prompt and seed "
              "(random weights: a consistency check of the engine, not image quality)."]
    return lines, ok, eager16


def targets(ok, eager16):
    compiled, best = peer_row(ok), fastest_engine(ok)
    if not best or not eager16:
        return []
    step = best["unet_step_ms"]["median_ms"]
    vs_eager = eager16["unet_step_ms"]["median_ms"] / step
    out = [f"Fastest sdexport engine path: **{best['label']}**, {step:.2f} ms/step.", ""]
    out.append(f"- at least {TARGET_VS_EAGER}x faster than eager FP16 per step: **{vs_eager:.2f}x** -> "
               + ("met" if vs_eager >= TARGET_VS_EAGER else
                  f"missed by {100 * (1 - vs_eager / TARGET_VS_EAGER):.1f}% "
                  f"(needs {eager16['unet_step_ms']['median_ms'] / TARGET_VS_EAGER:.2f} ms/step)"))
    if compiled:
        c = compiled["unet_step_ms"]["median_ms"]
        out.append(f"- no slower than torch.compile + CUDA graph ({c:.2f} ms/step): "
                   + ("met" if step <= c else f"missed: {step / c:.3f}x its time ({step - c:+.2f} ms/step)"))
    e2e = best["stages_ms"]["pipeline_total"] / 1e3
    out.append(f"- 50-step 512x512 image under {TARGET_E2E_S:.2f} s: **{e2e:.3f} s** -> "
               + ("met" if e2e < TARGET_E2E_S else f"missed by {e2e - TARGET_E2E_S:.3f} s"))
    out.append(f"- sampler loop's own time at most 1% of pipeline time: **{best['loop_overhead_pct']:.2f}%** -> "
               + ("met" if best["loop_overhead_pct"] <= 1.0 else "missed"))
    fastest = min(ok, key=lambda r: r["stages_ms"]["pipeline_total"])
    out += ["", f"Fastest configuration overall (any backend): **{fastest['label']}**, "
                f"{fastest['unet_step_ms']['median_ms']:.2f} ms/step, {fastest['stages_ms']['pipeline_total'] / 1e3:.3f} s "
                f"per image, loop overhead {fastest['loop_overhead_pct']:.2f}%."]
    return out


def sweep_rows(rows, key: str, per_second: bool) -> list[str]:
    out = []
    for r in rows:
        if "error" in r:
            out.append(f"| {r[key]} | {r['label']} | failed | |" + (" |" if per_second else ""))
            continue
        ips = f" {r['images_per_second']:.2f} |" if per_second else ""
        out.append(f"| {r[key]} | {r['label']} | {r['stages_ms']['pipeline_total'] / 1e3:.3f} |{ips} "
                   f"{r['unet_step_ms']['median_ms']:.2f} |")
    return out


def int8_section(int8) -> list[str]:
    md = ["## INT8 UNet accuracy (issue 4): `sdexport validate` on the INT8 UNet of sd15-random", ""]
    md += [f"- {k}: {v['seconds']} s, {'ok' if v['ok'] else 'FAILED: ' + v.get('error', '')[:300]}"
           for k, v in int8.get("steps", {}).items()]
    md.append(f"- calibration: {int8.get('calibration_settings')}")
    q = (int8.get("quantize") or {}).get("precision") or {}
    if q:
        md.append(f"- quantizer: {q.get('quantizer')}, method {q.get('calibration_method')}, "
                  f"{q.get('quantized_nodes')} quantized nodes, {q.get('qdq_nodes')} Q/DQ nodes, rest "
                  f"{q.get('high_precision_dtype')}; size {int8['quantize'].get('size_bytes', 0) / 2**20:.0f} MiB")
    rep = (int8.get("validate") or {}).get("int8")
    if rep:
        md += [f"- measures: {rep.get('measures')}; reference: {rep.get('reference')}; FP16: {rep.get('fp16_reference')}",
               f"- thresholds (fail the run): {rep.get('thresholds')}", "",
               "| UNet output at | INT8 rel-L2 vs FP32 | INT8 max abs | FP16 rel-L2 vs FP32 | pass |",
               "|---|---|---|---|---|"]
        for row in rep.get("unet", []):
            f16 = row.get("fp16") or {}
            md.append(f"| t~{row['target_timestep']} | {row['int8']['rel_l2_err']:.3e} | {row['int8']['max_abs_err']:.3e} | "
                      f"{format(f16['rel_l2_err'], '.3e') if f16 else '-'} | {row['pass']} |")
        md += ["", "| case | final-latent rel-L2 INT8 | image PSNR INT8 dB | SSIM INT8 | final-latent rel-L2 FP16 | "
               "PSNR FP16 dB | pass |", "|---|---|---|---|---|---|---|"]
        for row in rep.get("pipeline", []):
            i8, f16 = row.get("int8", {}), row.get("fp16") or {}
            md.append(f"| seed {row.get('seed')} | {fmt(i8.get('final_latent', {}).get('rel_l2_err'), 4)} | "
                      f"{fmt(i8.get('image_psnr_db'), 1)} | {fmt(i8.get('image_ssim'), 4)} | "
                      f"{fmt(f16.get('final_latent', {}).get('rel_l2_err'), 4)} | {fmt(f16.get('image_psnr_db'), 1)} | "
                      f"{row.get('pass')} |")
        md.append(f"\nINT8 report: **{'PASSED' if rep.get('passed') else 'FAILED'}** "
                  f"({rep.get('seconds', '-')} s)")
    md.append("")
    return md


def load_static(d: Path) -> list[dict]:
    """The sdxl-static stage's JSON, one per process (one batch size each): DIR/sdxl-static.json and
    DIR/*/sdxl-static.json, merged (each row keeps its own commit, command and date)."""
    found = [d / "sdxl-static.json"] + sorted(d.glob("*/sdxl-static.json"))
    return [json.loads(p.read_text()) for p in found if p.is_file()]


def static_section(runs: list[dict], path: Path) -> list[str]:
    """Issue 14's throughput where one batch size is served: the static packages vs torch.compile compiled first
    at that size, per batch, with the engine measured before and after the peer (the drift check)."""
    md = ["## SDXL images/s where one batch size is served (sdxl-static)", "",
          "Each batch size ran in its own process: the static Inductor packages for exactly that many images "
          "(UNet FP16, VAE FP32) with step graphs, then torch.compile + CUDA graph compiled first at that size, "
          "then the engine again. 1024x1024, 30 Euler steps, guidance 5.0, 3 timed runs after one warm-up each.", "",
          "| batch | sdexport images/s (before / after the peer) | torch.compile images/s | ratio | UNet ms/step "
          "(sdexport / torch.compile) | VAE ms | text encoders ms | PSNR sdexport vs torch.compile | commit |",
          "|---|---|---|---|---|---|---|---|---|"]
    bars = []
    for run in sorted(runs, key=lambda r: min((row["batch"] for row in r.get("batch", [])), default=0)):
        rows = [r for r in run.get("batch", []) if "error" not in r]
        for b in sorted({r["batch"] for r in rows}):
            at = [r for r in rows if r["batch"] == b]
            peer = next((r for r in at if "torch.compile" in r["label"]), None)
            engines = [r for r in at if "engine" in r["label"]]
            if not peer or not engines:
                continue
            first = engines[0]
            ratio = first["images_per_second"] / peer["images_per_second"]
            again = engines[1]["images_per_second"] if len(engines) > 1 else None
            md.append(
                f"| {b} | {first['images_per_second']:.3f} / {fmt(again, 3)} | {peer['images_per_second']:.3f} | "
                f"**{ratio:.3f}x** ({'met' if ratio >= 1 else 'MISSED'}) | {first['unet_step_ms']['median_ms']:.2f} / "
                f"{peer['unet_step_ms']['median_ms']:.2f} | {first['stages_ms']['vae_decoder']:.0f} / "
                f"{peer['stages_ms']['vae_decoder']:.0f} | {first['stages_ms']['text_encoder']:.1f} / "
                f"{peer['stages_ms']['text_encoder']:.1f} | {first.get('psnr_vs_peer', '-')} dB | "
                f"{str(run.get('commit'))[:8]} |")
            bars.append((b, first["images_per_second"], peer["images_per_second"]))
    md.append("")
    if bars and throughput_chart(bars, path):
        md += [f"![SDXL images/s per batch size]({path.name})", ""]
    return md


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None where matplotlib is not installed (no chart then)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def throughput_chart(bars, path: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(bars))
    ax.bar([i - 0.2 for i in x], [b[1] for b in bars], width=0.4, label="sdexport: Inductor AOT static + step graph")
    ax.bar([i + 0.2 for i in x], [b[2] for b in bars], width=0.4, label="torch.compile + CUDA graph")
    for i, (_, engine, peer) in enumerate(bars):
        ax.text(i, max(engine, peer) * 1.01, f"{engine / peer:.3f}x", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(x), [f"batch {b[0]}" for b in bars])
    ax.set_ylabel("images/s (SDXL, 1024 px, 30 steps)")
    ax.set_ylim(0, max(max(b[1], b[2]) for b in bars) * 1.15)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def chart(rows, path: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    ok = [r for r in rows if "error" not in r]
    labels = [r["label"] for r in ok]
    unet = [r["stages_ms"]["unet_total"] / 1e3 for r in ok]
    rest = [(r["stages_ms"]["pipeline_total"] - r["stages_ms"]["unet_total"]) / 1e3 for r in ok]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(ok) + 1.5))
    ax.barh(labels, unet, label="UNet x 50")
    ax.barh(labels, rest, left=unet, label="CLIP + VAE + loop")
    ax.axvline(TARGET_E2E_S, color="k", linestyle="--", linewidth=1, label=f"target {TARGET_E2E_S} s")
    ax.invert_yaxis()
    ax.set_xlabel("seconds per 512x512 image, 50 steps (SD 1.5 architecture, random weights)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(d: Path) -> None:
    prep, four, sweep, trt, prof, int8, sdxl = (load(d, n) for n in ("prepare", "fourway", "sweep", "trt", "profile",
                                                                     "int8", "sdxl"))
    static = load_static(d)
    head = four or prep or sdxl or (static[0] if static else None)
    m, v = head["machine"], head["versions"]
    md = [f"# GPU results: {m.get('gpu')} ({d.name})", "",
          f"- device: {m.get('gpu')}, compute capability {m.get('compute_capability')}, driver {m.get('driver')}, "
          f"CUDA {m.get('cuda')}, {m.get('cpu_count')} CPUs",
          "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
          f"- commit: {head.get('commit')}; date {head.get('date')}",
          "- command: `benchmarks/gpu.sh` stages (see each JSON's `command`); model: "
          + ("`sd15-random` (exact SD 1.5 architecture" if (four or prep or sweep) else
             "`sdxl-random` (exact SDXL base 1.0 architecture")
          + ", random weights: timings are real, images are noise)",
          "- timing: CUDA events on torch's stream; median of the timed runs after one warm-up; "
          "UNet ms/step = median and p90 over every UNet call of the timed runs", ""]
    notes = d / "NOTES.md"
    if notes.is_file():  # findings about this run written after it (kept beside the raw JSON)
        md += [notes.read_text().strip(), ""]
    if four:
        md += ["## The four-way table and the peers", "",
               "Rows 1-4 of the write-ups' table map to: FP32 eager (TF32 off), FP16 eager, FP32 engine, "
               "FP16 engine. TensorRT cannot run on this GPU (TensorRT-RTX refuses compute capability 9.0 and "
               "NVIDIA's `tensorrt` cannot be installed here), so the engines are ONNX Runtime's CUDA EP.", ""]
        for steps in ("50", "30"):
            if steps in four["results"]:
                lines, ok, eager16 = fourway_table(four["results"][steps], steps)
                md += lines + [""]
                if steps == "50":
                    md += ["### Targets (issue 5), 50 steps", ""] + targets(ok, eager16) + [""]
        if chart(four["results"].get("50", []), d / "fourway.png"):
            md += ["![50-step seconds per image](fourway.png)", ""]
    if four or sweep or sdxl:
        md += ["## Speed targets (issue 14; ratios from rows measured in the same run)", ""]
        for steps in ("50", "30"):
            if four and steps in four["results"]:
                md += speed_targets(four["results"][steps], f"SD 1.5, 512x512, {steps} steps")
        if sdxl:
            md += speed_targets(sdxl.get("results", []), "SDXL, 1024x1024, 30 steps", e2e_limit=SDXL_E2E_S)
        if sweep:
            md += throughput_targets(sweep.get("batch", []))
        md.append("")
    if sdxl:
        md += sdxl_section(sdxl)
    if static:
        md += static_section(static, d / "sdxl-throughput.png")
    if prof:
        md += ["## Where the time goes (one UNet step, batch 2, 64x64 latent)", "", prof.get("note", ""), ""]
        for label, err in (prof.get("vs_fp32") or {}).items():
            md.append(f"- {label} output vs PyTorch FP32 (TF32 off), same inputs: rel-L2 {err['rel_l2']:.2e}, "
                      f"max abs {err['max_abs']:.2e}")
        md.append("")
        for label, p in prof.items():
            if isinstance(p, dict) and "top" in p:
                md += [f"**{label}**: {p['kernel_ms_per_step']:.2f} ms of kernels per step", "",
                       "| kernel | ms/step | share | calls |", "|---|---|---|---|"]
                md += [f"| `{t['kernel'][:90]}` | {t['ms_per_step']:.3f} | {t['share_pct']}% | {t['calls_per_step']} |"
                       for t in p["top"][:10]] + [""]
    if sweep:
        md += ["## Batch and resolution sweep (30 steps, Euler, guidance 7.5)", "",
               "| images per call | configuration | image s (batch) | images/s | UNet ms/step |", "|---|---|---|---|---|"]
        md += sweep_rows(sweep.get("batch", []), "batch", per_second=True)
        md += ["", "| side px | configuration | image s | UNet ms/step |", "|---|---|---|---|"]
        md += sweep_rows(sweep.get("resolution", []), "size", per_second=False)
        md.append("")
    if trt:
        md += ["## TensorRT-RTX engines built on this machine (FP16 export, dynamic profiles)", ""]
        engines = (trt.get("engines") or {}).get("engines", {})
        if engines:
            md += ["| component | file | MiB | build s | targets |", "|---|---|---|---|---|"]
            for name, e in engines.items():
                md.append(f"| {name} | `{e.get('file')}` | {e.get('size_bytes', 0) / 2**20:.0f} | "
                          f"{e.get('build_seconds')} | {', '.join(map(str, e.get('compute_capabilities', [])))} |")
        if trt.get("build_error"):
            md.append(f"Build failed: {trt['build_error']}")
        if trt.get("run_refused"):
            md += ["", f"Running them here was refused, as expected: `{trt['run_refused']}`"]
        md.append("")
    if int8:
        md += int8_section(int8)
    if prep:
        md += ["## Preparation (export) times", "", "| step | seconds | ok |", "|---|---|---|"]
        md += [f"| {k} | {s['seconds']} | {s['ok']}{' ' + s.get('error', '')[:100] if not s['ok'] else ''} |"
               for k, s in prep["steps"].items()] + [""]
        for key in ("e32_sizes_mib", "e16_sizes_mib", "e32_ort_cuda"):
            if key in prep:
                md.append(f"- {key}: {prep[key]}")
        md.append("")
    (d / "README.md").write_text("\n".join(md) + "\n")
    print(d / "README.md")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
