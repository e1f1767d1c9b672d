"""Whether `torch.compile` with freezing closes the gap to ONNX Runtime on a CPU: PVT-small (random weights, seed 0)
eager (this package, its CPU acceleration on), compiled, and exported to ONNX and run by ONNX Runtime on the same
threads, timed in alternating rounds in one process at batch 1 (224x224), batch 16 (224x224) and one 800x1216 image.

    python benchmarks/probes/compiled_vs_onnxruntime.py > benchmarks/probes/compiled_vs_onnxruntime.log

The compile is `torch.compile(model, dynamic=True)` with inductor's `freezing` set in its config while compiling:
freezing folds the weights into the graph and packs them for oneDNN (with a symbolic batch size inductor takes
oneDNN's products for float32; with a static one it takes MKL's, which measured slower on AMD EPYC). Passed as
`options={"freezing": True}` it is not applied. `--cpp_wrapper` adds inductor's C++ wrapper. One JSON line per case:
the first call's seconds (the compile for that shape), the largest logit difference from eager, median ms per forward
of each, and the speed of each relative to ONNX Runtime (median of per-round ratios; above 1 is faster).
"""

import argparse
import json
import os
import statistics
import time

import onnxruntime
import torch
import torch._inductor.config as inductor_config
from batch1_vs_onnxruntime import alternating  # this folder: the probes run as scripts
from modeling_pvt.scripts.machine import describe_machine

from modeling_pvt import PvtConfig, PvtForImageClassification
from modeling_pvt.hub.onnx_export import export_program
from modeling_pvt.runtime import configure_allocator

CASES = ((1, 224, 224, 5), (16, 224, 224, 1), (1, 800, 1216, 1))  # batch, height, width, calls per round


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--cpp_wrapper", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configure_allocator()
    torch.manual_seed(0)
    model = PvtForImageClassification(PvtConfig.from_preset("small")).eval()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    model_bytes = export_program(model).model_proto.SerializeToString()
    session = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    inductor_config.freezing = True
    inductor_config.cpp_wrapper = args.cpp_wrapper
    compiled = torch.compile(model, dynamic=True)
    print(json.dumps({"machine": describe_machine("cpu"), "onnxruntime": onnxruntime.__version__}), flush=True)
    for batch, height, width, calls in CASES:
        pixel_values = torch.randn(batch, 3, height, width)
        inputs = {"pixel_values": pixel_values.numpy()}
        start = time.perf_counter()
        with torch.no_grad():
            compiled_logits = compiled(pixel_values).logits
        first_call = time.perf_counter() - start
        with torch.inference_mode():
            eager_logits = model(pixel_values).logits

        def eager(pixel_values=pixel_values):
            with torch.inference_mode():
                return model(pixel_values)

        def compiled_forward(pixel_values=pixel_values):
            with torch.no_grad():
                return compiled(pixel_values)

        seconds = alternating(
            {
                "eager": eager,
                "compiled": compiled_forward,
                "onnxruntime": lambda inputs=inputs: session.run(None, inputs),
            },
            args.rounds,
            calls,
        )
        ort = seconds["onnxruntime"]
        record = {
            "case": f"batch {batch} {height}x{width}",
            "first_call_s": round(first_call, 1),
            "max_abs_logit_difference": (compiled_logits - eager_logits).abs().max().item(),
            "ms": {name: round(statistics.median(times) * 1e3, 1) for name, times in seconds.items()},
            "speed_vs_onnxruntime": {
                name: round(statistics.median(o / t for t, o in zip(seconds[name], ort)), 3)
                for name in ("eager", "compiled")
            },
            "load_average": [round(value, 2) for value in os.getloadavg()],
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
