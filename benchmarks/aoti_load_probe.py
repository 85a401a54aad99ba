"""Does an AOTInductor package load in a fresh process, and what must come first? (issue 14, validate on CUDA)

    python benchmarks/aoti_load_probe.py PACKAGE.pt2 [--out DIR]

On an H100 (torch 2.11+cu130) `sdexport validate --backend inductor --device cuda` died with SIGSEGV inside
torch._inductor.aoti_load_package, while bench/infer loaded the same packages. Each case below loads the
package in a new interpreter after one prelude and reports the exit status and the last line printed.
Writes aoti_load_probe.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PRELUDES = {
    "nothing": "pass",
    "torch.cuda.init()": "torch.cuda.init()",
    "a CUDA tensor": "torch.zeros(1, device='cuda')",
    "import onnxruntime": "import onnxruntime",
    "onnxruntime.preload_dlls()": "import onnxruntime; getattr(onnxruntime, 'preload_dlls', lambda: None)()",
    "import onnx": "import onnx",
    "torch.cuda.init(), run_single_threaded=False": "torch.cuda.init()",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("package")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, prelude in PRELUDES.items():
        single = "run_single_threaded=False" not in name
        code = (f"import torch\n{prelude}\n"
                f"m = torch._inductor.aoti_load_package({args.package!r}, run_single_threaded={single}, device_index=0)\n"
                "print('loaded', flush=True)\n")
        try:
            proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True,
                                  text=True, timeout=120)
            tail = (proc.stdout + proc.stderr).strip().splitlines()
            row = {"prelude": name, "returncode": proc.returncode,
                   "last_lines": [l for l in tail if "Warning" not in l][-4:]}
        except subprocess.TimeoutExpired:
            row = {"prelude": name, "returncode": None, "last_lines": ["timed out after 120 s"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "aoti_load_probe.json").write_text(json.dumps(  # after each case: a killed run keeps its rows
            {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
             "package": args.package, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
