"""Where does fused_params spend its time on the GPU host? (LoRA switch of issue 11; 7-10 s there, 1.1 s on a 2-core VM)"""
import cProfile, pstats, time, sys, os, io
sys.path.insert(0, os.getcwd())
import torch
from sdexport.models import ModelInfo, write_preset
from sdexport.lora import fused_params, open_loras
print("threads", torch.get_num_threads(), "cpus", os.cpu_count(), flush=True)
if not os.path.isdir("/tmp/lp/sd15"):
    write_preset("sd15-random", "/tmp/lp/sd15")
if not os.path.isfile("/tmp/lp/a.safetensors"):
    os.system(f"{sys.executable} benchmarks/make_lora.py /tmp/lp/sd15 /tmp/lp/a.safetensors --seed 1 > /dev/null 2>&1")
info = ModelInfo.open("/tmp/lp/sd15")
loras = open_loras(["/tmp/lp/a.safetensors:0.8"])
for where in ("cpu", "cuda"):
    mods = {p: info.load_torch(p, device=where) for p in ("unet", "text_encoder")}
    base = lambda part, name: mods[part].get_parameter(name).detach().float().cpu()
    for threads in ((torch.get_num_threads(), 4) if where == "cpu" else (torch.get_num_threads(),)):
        torch.set_num_threads(threads)
        for i in range(2):
            t0 = time.perf_counter()
            pr = cProfile.Profile(); pr.enable()
            out = fused_params(info, loras, ["unet", "text_encoder"], base=base)
            pr.disable()
            print(f"== {where} threads={threads} run {i}: {time.perf_counter() - t0:.2f} s", flush=True)
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18); print(s.getvalue()[-5000:])
    torch.set_num_threads(os.cpu_count())
