"""Load test of `sdexport serve` (issue 12): latency p50/p90/p99 and images/s at concurrency 1, 2, 4, 8 (+16).

For each server configuration (``--gpus 0 --gpus 0,1``: one run on GPU 0, one on GPUs 0 and 1; default: one
run on ``--device``) it starts ``sdexport serve EXPORT`` on free loopback ports, waits for its ready line, and
at each concurrency level C runs C closed-loop clients (each sends its next request when the previous one is
answered) until ``--requests-per-client`` x C requests are answered; a first round of C requests is not timed.
Every request has its own prompt and seed and sends all eight inputs (Triton batches only requests with the
same set of inputs). ``--time-limit-s`` bounds the whole run: past it no request is sent and the levels not
reached are recorded as skipped. Loopback only: the server is started here and listens on 127.0.0.1.

Baselines (``--baseline``, the default), run before any server on the same device: ``sdexport bench
--batch-size 1`` (the pipeline time of ``infer``) and ``--batch-size N`` (N: the concurrency compared against,
8 or the export's maximum). The summary holds the issue's targets: at concurrency 1 the server adds at most 5%
or 10 ms to the pipeline time; at concurrency N its images/s reach 90% of bench's; with 2 GPUs throughput at the
highest concurrency is 1.8x one GPU's. A benchmark reports; it asserts nothing.

Writes OUT/serve_load.json (machine, versions, commit, command, every request's latency) and OUT/serve_load.md.

usage: python benchmarks/serve_load.py EXPORT [--backend ort] [--device cpu|cuda] [--gpus 0 --gpus 0,1]
           [--steps 30] [--size PX] [--concurrency 1,2,4,8] [--requests-per-client 4] [--time-limit-s 1800]
           [--out DIR] [--no-baseline] [--serve-arg=--step-graph ...] [--url 127.0.0.1:PORT]
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_bench import environment, header, log  # noqa: E402  (machine, versions, commit, command; the subprocess env)


def sdexport(*args) -> list[str]:
    return [sys.executable, "-m", "sdexport", *[str(a) for a in args]]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now (tests/test_serve.py starts its servers with them too)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def baseline(args, batch: int, out: Path) -> dict:
    """``sdexport bench`` at this batch size, engines only (no eager), same settings as the requests."""
    path = out / f"bench_b{batch}.json"
    cmd = sdexport("bench", args.export, "--backend", args.backend, "--device", args.device, "--steps", args.steps,
                   "--batch-size", batch, "--runs", args.bench_runs, "--warmup", 1, "--no-eager", "--json", path,
                   "--guidance-scale", args.guidance_scale, "--scheduler", args.scheduler,
                   *(["--height", args.size, "--width", args.size] if args.size else []),
                   *(["--step-graph"] if "--step-graph" in args.serve_arg else []))
    log(" ".join(map(str, cmd)))
    run = subprocess.run(cmd, env=environment(), capture_output=True, text=True)
    if run.returncode:
        return {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"}
    report = json.loads(path.read_text())
    figures = report["results"][0]
    return {"batch_size": batch, "pipeline_total_ms": figures["stages_ms"]["pipeline_total"],
            "images_per_second": figures["images_per_second"], "command": " ".join(map(str, cmd))}


class Running:
    """A server started elsewhere (``--url``, loopback only): measured, not started or stopped."""

    def __init__(self, url: str):
        host, _, port = url.rpartition(":")
        if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
            raise SystemExit(f"--url {url}: loopback only (127.0.0.1:PORT)")
        self.http, self.grpc, self.cmd = int(port), None, ["(running server)", url]

    def stop(self) -> None:
        return None


def _by_device(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(str(r.get("device")), []).append(r)
    return out


class Server:
    def __init__(self, args, gpus: str | None, log_path: Path):
        self.http, self.grpc, self.metrics = free_ports(3)
        device = ["--device", "cuda", "--gpus", gpus] if gpus else ["--device", args.device]
        self.cmd = sdexport("serve", args.export, "--backend", args.backend, *device, "--address", "127.0.0.1",
                            "--http-port", self.http, "--grpc-port", self.grpc, "--metrics-port", self.metrics,
                            "--max-queue-size", max(64, 2 * max(args.levels)), "--warmup-steps", args.steps,
                            *(["--warmup", f"{args.size}x{args.size}"] if args.size else []),
                            # the requests' scheduler is the server's default: the warm-up captures their step graphs
                            *([] if any(a.startswith("--scheduler") for a in args.serve_arg)
                              else ["--scheduler", args.scheduler]), *args.serve_arg)
        log(" ".join(map(str, self.cmd)))
        self.proc = subprocess.Popen(self.cmd, env=environment(), stdout=subprocess.PIPE, stderr=log_path.open("w"),
                                     text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(args.startup_timeout_s)
        if not lines or not lines[0].startswith("ready:"):
            self.proc.kill()
            raise SystemExit(f"server not ready (exit {self.proc.poll()}); see {log_path}")
        log(lines[0].strip())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


STAGES = ("total_ms", "text_encoder_ms", "unet_total_ms", "vae_decoder_ms", "denoise_loop_ms", "other_ms")


def run_level(server: Server, args, concurrency: int, deadline: float) -> dict:
    """C closed-loop clients; one untimed round, then requests_per_client x C timed requests."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from sdexport.serve import client_inputs

    module = grpcclient if args.protocol == "grpc" else httpclient
    url = f"127.0.0.1:{server.grpc if args.protocol == 'grpc' else server.http}"
    total = args.requests_per_client * concurrency
    issued = [0]  # requests handed out so far (both rounds)
    lock = threading.Lock()
    records: list[dict] = []
    errors: list[str] = []
    native = json.loads((Path(args.export) / "manifest.json").read_text())["ranges"]["opt_size"]

    def inputs(i: int):
        return client_inputs(module, prompt=f"a photograph of an astronaut riding a horse, variation {i}",
                             negative_prompt="", seed=i, steps=args.steps, guidance_scale=args.guidance_scale,
                             height=args.size or native, width=args.size or native, scheduler=args.scheduler)

    def client_loop(timed: list[bool], count: int):
        c = module.InferenceServerClient(url)
        while time.monotonic() < deadline:
            with lock:
                if issued[0] >= count:
                    return
                i = issued[0]
                issued[0] += 1
            t0 = time.perf_counter()
            try:
                result = c.infer("sdexport", inputs(i))
                latency = (time.perf_counter() - t0) * 1e3
                t = json.loads(result.as_numpy("timings")[0, 0])
                with lock:
                    records.append({"latency_ms": latency, "end": time.perf_counter(), "start": t0,
                                    "images_in_call": t["images_in_call"], "pipeline_ms": t["total_ms"],
                                    "device": t.get("device"), "timed": timed[0],
                                    "stages_ms": {k: t[k] for k in STAGES if k in t}, "loop": t.get("loop")})
            except Exception as exc:  # noqa: BLE001 -- counted and reported
                with lock:
                    errors.append(str(exc)[:300])

    for timed, count in (([False], concurrency), ([True], concurrency + total)):
        threads = [threading.Thread(target=client_loop, args=(timed, count)) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    timed = [r for r in records if r["timed"]]
    if not timed:
        return {"concurrency": concurrency, "skipped": "time limit", "errors": errors}
    lat = [r["latency_ms"] for r in timed]
    wall = max(r["end"] for r in timed) - min(r["start"] for r in timed)
    return {"concurrency": concurrency, "requests": len(timed), "errors": len(errors), "error_samples": errors[:3],
            "complete": len(timed) == total, "height": args.size or native, "width": args.size or native,
            "latency_ms": {"p50": round(percentile(lat, 50), 2), "p90": round(percentile(lat, 90), 2),
                           "p99": round(percentile(lat, 99), 2), "mean": round(statistics.fmean(lat), 2)},
            "images_per_second": round(len(timed) / wall, 4),
            "mean_images_per_call": round(statistics.fmean(r["images_in_call"] for r in timed), 3),
            "server_pipeline_ms_p50": round(percentile([r["pipeline_ms"] for r in timed], 50), 2),
            # what the server adds around its pipeline call: queueing/batching wait, HTTP/gRPC, the backend IPC
            "outside_pipeline_ms_p50": round(percentile([r["latency_ms"] - r["pipeline_ms"] for r in timed], 50), 2),
            # per model instance (its GPU): whether each one computes as fast as a single instance does
            "per_device": {d: {"requests": len(rs), "images_per_call_mean": round(statistics.fmean(
                               r["images_in_call"] for r in rs), 3),
                               "pipeline_ms_per_image_p50": round(percentile(
                                   [r["pipeline_ms"] / r["images_in_call"] for r in rs], 50), 2)}
                           for d, rs in _by_device(timed).items()},
            "latencies_ms": [round(x, 2) for x in lat],
            # each timed request's pipeline call: where a slow call spent its time
            "requests_detail": [{"latency_ms": round(r["latency_ms"], 2), "images_in_call": r["images_in_call"],
                                 "device": r["device"], "loop": r["loop"], **{k: round(v, 2) for k, v in r["stages_ms"].items()}}
                                for r in timed]}


def targets(result: dict) -> dict:
    """The issue's three targets, where the runs exist to compute them."""
    out = {}
    runs = result["runs"]
    if not runs:
        return out
    first = {lvl["concurrency"]: lvl for lvl in runs[0]["levels"] if "latency_ms" in lvl}
    b1, bn = result["baselines"].get("1"), result["baselines"].get(str(result["compare_concurrency"]))
    if b1 and "pipeline_total_ms" in b1 and 1 in first:
        added = first[1]["latency_ms"]["p50"] - b1["pipeline_total_ms"]
        limit = max(10.0, 0.05 * b1["pipeline_total_ms"])
        out["c1_added_latency"] = {"added_ms": round(added, 2), "pct": round(100 * added / b1["pipeline_total_ms"], 2),
                                   "limit_ms": round(limit, 2), "met": added <= limit}
    n = result["compare_concurrency"]
    if bn and "images_per_second" in bn and n in first:
        ratio = first[n]["images_per_second"] / bn["images_per_second"]
        out[f"c{n}_throughput_vs_bench"] = {"ratio": round(ratio, 3), "limit": 0.9, "met": ratio >= 0.9}
    if len(runs) >= 2:
        top = max(lvl["concurrency"] for lvl in runs[0]["levels"] if "images_per_second" in lvl)
        per = [{lvl["concurrency"]: lvl for lvl in r["levels"] if "images_per_second" in lvl}.get(top) for r in runs]
        if all(per):
            ratio = per[-1]["images_per_second"] / per[0]["images_per_second"]
            out["multi_gpu_scaling"] = {"concurrency": top, "gpus": [r["gpus"] for r in runs], "ratio": round(ratio, 3),
                                        "limit": 1.8, "met": ratio >= 1.8}
    return out


def stage_split(requests: list[dict]) -> dict | None:
    """The pipeline calls behind a level's requests (the requests of one call share its timings) and where their
    time went: the stage that grows with the call is the one to look at (session 6: the VAE). Only calls whose
    timings have every stage shown (run_level keeps what a server gives); None without any."""
    calls = list({(r["device"], r["total_ms"], r["images_in_call"]): r for r in requests
                  if all(k in r for k in STAGES if k != "denoise_loop_ms")}.values())
    if not calls:
        return None

    def med(key, per_image=False):
        return statistics.median(c[key] / (c["images_in_call"] if per_image else 1) for c in calls)

    return {"calls": len(calls), "unet_ms_per_image": med("unet_total_ms", True),
            "vae_ms_per_image": med("vae_decoder_ms", True), "text_ms": med("text_encoder_ms"),
            "other_ms": med("other_ms"),
            "vae_share": sum(c["vae_decoder_ms"] for c in calls) / max(sum(c["total_ms"] for c in calls), 1e-9)}


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"# sdexport serve load test ({result['date']})", "",
             f"- machine: {m.get('gpu', m.get('processor'))}, {m.get('cpu_count')} CPU cores; commit "
             f"{result['commit']}", f"- command: `{result['command']}`",
             f"- export {s['export']}, backend {s['backend']}, {s['steps']} steps, guidance {s['guidance_scale']}, "
             f"{s['protocol']}; {s['requests_per_client']} timed requests per client", ""]
    for name, b in sorted(result["baselines"].items(), key=lambda kv: int(kv[0])):
        if "error" in b:
            lines.append(f"- bench batch {name}: failed ({b['error']})")
        else:
            lines.append(f"- bench batch {name}: pipeline {b['pipeline_total_ms']:.1f} ms, "
                         f"{b['images_per_second']:.3f} images/s")
    for run in result["runs"]:
        exit_code = run.get("exit_code", "pending")
        lines += ["", f"## {run['label']}" + (f" (server exit {exit_code})" if exit_code is not None else ""), "",
                  "| concurrency | requests | errors | p50 ms | p90 ms | p99 ms | images/s | images per call "
                  "| pipeline p50 ms | outside pipeline p50 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
        for lvl in run["levels"]:
            if "latency_ms" not in lvl:
                lines.append(f"| {lvl['concurrency']} | skipped ({lvl.get('skipped')}) | | | | | | | | |")
                continue
            la = lvl["latency_ms"]
            lines.append(f"| {lvl['concurrency']} | {lvl['requests']} | {lvl['errors']} | {la['p50']:.1f} | "
                         f"{la['p90']:.1f} | {la['p99']:.1f} | {lvl['images_per_second']:.3f} | "
                         f"{lvl['mean_images_per_call']:.2f} | {lvl['server_pipeline_ms_p50']:.1f} | "
                         f"{lvl['outside_pipeline_ms_p50']:.1f} |")
        per_device = [(lvl["concurrency"], d, v) for lvl in run["levels"] for d, v in lvl.get("per_device", {}).items()]
        if len({d for _, d, _ in per_device}) > 1:
            lines += ["", "| concurrency | instance (GPU) | requests | images per call | pipeline ms per image p50 |",
                      "|---|---|---|---|---|"]
            lines += [f"| {c} | {d} | {v['requests']} | {v['images_per_call_mean']:.2f} | "
                      f"{v['pipeline_ms_per_image_p50']:.1f} |" for c, d, v in per_device]
        stages = [(lvl["concurrency"], split) for lvl in run["levels"]
                  if (split := stage_split(lvl.get("requests_detail") or []))]
        if stages:
            lines += ["", "Where each call's time went (per pipeline call, medians; per image: divided by the call's "
                      "images):", "", "| concurrency | calls | UNet ms per image | VAE ms per image | text ms | "
                      "other ms | VAE share of pipeline time |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {c} | {v['calls']} | {v['unet_ms_per_image']:.1f} | {v['vae_ms_per_image']:.1f} | "
                      f"{v['text_ms']:.1f} | {v['other_ms']:.1f} | {v['vae_share']:.0%} |" for c, v in stages]
    if result["targets"]:
        lines += ["", "## Targets (issue 12)", ""]
        for name, t in result["targets"].items():
            detail = ", ".join(f"{k} {v}" for k, v in t.items() if k != "met")
            lines.append(f"- {name}: {'met' if t['met'] else 'MISSED'} ({detail})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export")
    parser.add_argument("--backend", default="ort", choices=["ort", "trt", "torch", "inductor"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--gpus", action="append", default=None, help="one server configuration (repeatable)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: native)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="default: the model's (SD 7.5, SDXL 5.0): what the server warms its step graphs for")
    parser.add_argument("--scheduler", default="euler")
    parser.add_argument("--concurrency", default=None, help="levels (default 1,2,4,8; 1,2,4,8,16 with 2+ GPUs)")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--time-limit-s", type=float, default=1800)
    parser.add_argument("--startup-timeout-s", type=float, default=900)
    parser.add_argument("--protocol", default="http", choices=["http", "grpc"])
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--bench-runs", type=int, default=3)
    parser.add_argument("--compare-concurrency", type=int, default=8, help="compared with bench at this batch size")
    parser.add_argument("--serve-arg", action="append", default=[], help="passed to sdexport serve (repeatable)")
    parser.add_argument("--out", default=None, help="directory for serve_load.json/.md (default: a temp dir)")
    parser.add_argument("--url", default=None, help="measure a running server at 127.0.0.1:HTTP_PORT instead")
    args = parser.parse_args()
    if args.guidance_scale is None:  # the server's default, which its warm-up captures step graphs for
        from sdexport.runtime import ExportDir

        export = ExportDir.open(args.export)
        args.guidance_scale = export.family.request_defaults(export.info)["guidance_scale"]
    if args.url and (args.gpus or args.protocol != "http"):
        parser.error("--url measures one running server over HTTP (no --gpus, no --protocol grpc)")
    multi = any("," in g for g in args.gpus or [])
    args.levels = [int(c) for c in (args.concurrency or ("1,2,4,8,16" if multi else "1,2,4,8")).split(",")]
    out = Path(args.out or tempfile.mkdtemp(prefix="serve_load-"))
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.time_limit_s
    manifest = json.loads((Path(args.export) / "manifest.json").read_text())
    compare = min(args.compare_concurrency, manifest["ranges"]["max_images"])

    result = {**header(), "settings": {"export": str(Path(args.export).resolve()), "backend": args.backend,
                                       "steps": args.steps, "size": args.size, "guidance_scale": args.guidance_scale,
                                       "scheduler": args.scheduler, "protocol": args.protocol,
                                       "requests_per_client": args.requests_per_client,
                                       "time_limit_s": args.time_limit_s, "serve_args": args.serve_arg},
              "compare_concurrency": compare, "baselines": {}, "runs": []}
    from importlib import metadata

    for dist in ("nvidia-pytriton", "tritonclient", "numpy"):
        result["versions"][dist] = metadata.version(dist)

    def save():
        result["targets"] = targets(result)
        (out / "serve_load.json").write_text(json.dumps(result, indent=2))
        (out / "serve_load.md").write_text(markdown(result))

    if not args.no_baseline:
        for batch in sorted({1, compare}):
            result["baselines"][str(batch)] = baseline(args, batch, out)
            log(f"bench batch {batch}: {result['baselines'][str(batch)]}")
            save()
    for gpus in args.gpus or [None]:
        label = f"GPUs {gpus}" if gpus else (f"server at {args.url}" if args.url else args.device)
        server = (Running(args.url) if args.url else
                  Server(args, gpus, out / f"server-{(gpus or args.device).replace(',', '-')}.log"))
        run = {"label": label, "gpus": gpus, "command": " ".join(map(str, server.cmd)), "levels": []}
        result["runs"].append(run)
        try:
            for level in args.levels:
                stats = run_level(server, args, level, deadline)
                run["levels"].append(stats)
                log(f"{label} concurrency {level}: " + json.dumps({k: v for k, v in stats.items()
                                                                     if k != "latencies_ms"}))
                save()
        finally:
            run["exit_code"] = server.stop()
            save()
    print(markdown(result))
    log(f"wrote {out / 'serve_load.json'} and {out / 'serve_load.md'}")


if __name__ == "__main__":
    main()
