# Peak RSS of one calibration batch (2 rows, 512 px) of sd15-random's FP32 UNet on ORT CPU:
# mode plain (session, no augmentation), all (ORT's calibrator over every Conv/MatMul/Gemm in+out), wanted.
import sys, resource, time, numpy as np, onnx, onnxruntime as ort
sys.path.insert(0, "/work/main")
from sdexport.quantize import _Reader
from onnxruntime.quantization.calibrate import MinMaxCalibrater
mode, src, npz = sys.argv[1], "/tmp/sd15r-e32/unet/model.onnx", "/tmp/q/calib512.npz"
d = np.load(npz)
feed = {k: d[k][:2] for k in d.files if k in ("sample", "timestep", "encoder_hidden_states")}
print({k: v.shape for k, v in feed.items()})
t0 = time.time()
if mode.startswith("plain"):
    so = ort.SessionOptions()
    if mode == "plain-noopt":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    s.run(None, feed)
else:
    c = MinMaxCalibrater(src, ["Conv", "MatMul", "Gemm"], "/tmp/qm/aug.onnx", symmetric=True, use_external_data_format=True)
    if mode == "wanted":
        g = onnx.load(src, load_external_data=False).graph
        w = {i.name for i in g.initializer}
        import re
        ex = re.compile(r"/attn\d*/MatMul(_\d+)?$")
        wanted = {i for n in g.node if n.op_type in ("Conv", "MatMul", "Gemm") and not ex.search(n.name) for i in n.input[:2] if i not in w}
        orig = c.select_tensors_to_calibrate
        c.select_tensors_to_calibrate = lambda m: ({t for t in orig(m)[0] if t in wanted}, orig(m)[1])
    c.augment_graph(); c.execution_providers = ["CPUExecutionProvider"]; c.create_inference_session()
    c.collect_data(_Reader([feed])); r = c.compute_data()
    print(len(r.data) if hasattr(r, "data") else len(r), "tensors")
print(mode, "peak RSS GiB", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), "s", round(time.time() - t0, 1))
