"""How long a LoRA switch takes on loaded ONNX Runtime engines, split as bench reports it (files read, base
weights read, deltas added, weights applied), for one or more source trees side by side in one run.

    python3 benchmarks/lora_switch_probe.py EXPORT LORA_A LORA_B [--tree DIR ...] [--device cpu|cuda] [--out DIR]

Each tree (default: this checkout) runs in its own process: open the engines (the plain export, as switches
need), switch A, B, A, B, A, B at scale 0.8 and keep the median of the last four (the first two open the
sessions over sdexport's buffers and check each weight once); the first switch (reading the base weights from
the export, opening the sessions) is reported apart. On the CPU the engines write into their buffers
(SDEXPORT_ORT_LIVE_WEIGHTS=1), as CUDA does by default. Trees alternate twice, so a slower machine state hits
both. Make the LoRAs with benchmarks/make_lora.py; compare an older commit with `git worktree add DIR COMMIT`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
from sdexport.backends import load_engines
from sdexport.pipeline import Pipeline
from sdexport.runtime import ExportDir
export_dir, a, b, device = sys.argv[1:5]
export = ExportDir.open(export_dir)
engines = load_engines(export, "ort", components=["text_encoder", "unet", "vae_decoder"], device=device,
                       variant="plain")
pipe = Pipeline(engines, export, device=device)
rows = [pipe.set_loras([f"{f}:0.8"]) for f in (a, b, a, b, a, b)]
print(json.dumps(rows))
"""


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("lora_a")
    parser.add_argument("lora_b")
    parser.add_argument("--tree", action="append", help="source tree to run (repeatable; default: this checkout)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    trees = [Path(t).resolve() for t in (args.tree or [Path(__file__).resolve().parent.parent])]
    env = {**os.environ, "SDEXPORT_ORT_LIVE_WEIGHTS": "1"}
    later: dict[str, list[dict]] = {str(t): [] for t in trees}
    first: dict[str, list[dict]] = {str(t): [] for t in trees}
    for _ in range(args.rounds):
        for tree in trees:
            proc = subprocess.run([sys.executable, "-c", CHILD, str(Path(args.export).resolve()),
                                   str(Path(args.lora_a).resolve()), str(Path(args.lora_b).resolve()), args.device],
                                  cwd=tree, env=env, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            rows = json.loads(proc.stdout.strip().splitlines()[-1])
            later[str(tree)] += rows[2:]
            first[str(tree)].append(rows[0])
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "device": args.device,
              "cpu_count": os.cpu_count(), "trees": {}}
    for tree in trees:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree,
                                    capture_output=True, text=True).stdout.strip())
        rows = later[str(tree)]
        med = {k: round(median([r[k] for r in rows]), 1) for k in rows[0]}
        med["deltas_ms"] = round(med["fuse_ms"] - med["files_ms"] - med["base_ms"], 1)
        opening = {k: round(median([r[k] for r in first[str(tree)]]), 1) for k in ("switch_ms", "base_ms", "apply_ms")}
        result["trees"][str(tree)] = {"commit": commit + ("+changes" if dirty else ""), "switches": len(rows),
                                      "median_ms": med, "first_switch_median_ms": opening}
        print(f"{tree} ({commit}{'+changes' if dirty else ''}): later {json.dumps(med)}; first {json.dumps(opening)}")
    if len(trees) > 1:
        first, last = (result["trees"][str(t)]["median_ms"]["switch_ms"] for t in (trees[0], trees[-1]))
        result["switch_ratio_first_to_last"] = round(first / last, 2)
        print(f"switch: {first} ms -> {last} ms ({first / last:.2f}x)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "lora_switch_probe.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
