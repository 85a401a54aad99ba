"""Which form the FP16 text encoder's Softmax has on this host (the form test failed on the H100 host)."""
import collections, subprocess, sys, onnx, tempfile, os
from pathlib import Path
tmp = Path(tempfile.mkdtemp())
env = dict(os.environ)
subprocess.run([sys.executable, "-m", "sdexport", "preset", "tiny", "-o", str(tmp / "m")], check=True, env=env)
subprocess.run([sys.executable, "-m", "sdexport", "export", str(tmp / "m"), "-o", str(tmp / "e"), "--dtype", "fp16",
                "--components", "text_encoder"], check=True, env=env)
for dtype_dir in ("e",):
    m = onnx.load(str(tmp / dtype_dir / "text_encoder" / "model.onnx"))
    typed = onnx.shape_inference.infer_shapes(m).graph
    dt = {v.name: v.type.tensor_type.elem_type for v in [*typed.value_info, *typed.input, *typed.output]}
    made = {o: n for n in m.graph.node for o in n.output}
    reads = collections.defaultdict(list)
    for n in m.graph.node:
        for i in n.input:
            reads[i].append(n)
    for n in m.graph.node:
        if n.op_type != "Softmax":
            continue
        print("Softmax", n.name, "out dtype", dt.get(n.output[0]))
        def up(t, depth):
            node = made.get(t)
            if node is None or depth > 4:
                return
            print("  " * depth, node.op_type, node.name, [dt.get(i) for i in node.input], "->", dt.get(node.output[0]))
            for i in node.input:
                up(i, depth + 1)
        up(n.input[0], 1)
        print("  after:", [(a.op_type, [c.op_type for c in reads[a.output[0]]]) for a in reads[n.output[0]]])
        break
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__)
