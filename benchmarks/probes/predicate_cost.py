"""What the CPU acceleration's predicate costs on every layer call, against a PVT-small forward at batch 1.

    python benchmarks/probes/predicate_cost.py > benchmarks/probes/predicate_cost.log

`cpu_acceleration.fast_path_applies` runs once per `PvtLayer` call in inference. Two cases: a layer shape whose
measurement kept the reference code (the predicate returns early and the layer's own code runs), and one that runs a
route (every check runs). The forward is timed with the acceleration off, so the share is of the reference code.
"""

import time

import torch

from modeling_pvt import PvtConfig, PvtForImageClassification, cpu_acceleration


def microseconds_per_call(function, calls: int = 20_000) -> float:
    for _ in range(200):
        function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    torch.set_num_threads(2)
    model = PvtForImageClassification(PvtConfig.from_preset("small")).eval()
    layer = model.pvt.encoder.block[0][0]
    hidden_states = torch.randn(1, 56 * 56, layer.layer_norm_1.normalized_shape[0])
    key = cpu_acceleration._route_key(layer, hidden_states)
    layers = sum(len(stage) for stage in model.pvt.encoder.block)
    with torch.inference_mode():
        costs = {}
        for route in ("reference", "fused"):
            cpu_acceleration.measured_routes[key] = (route, {})
            costs[route] = microseconds_per_call(lambda: cpu_acceleration.fast_path_applies(layer, hidden_states))
        model.set_cpu_acceleration(False)
        pixel_values = torch.randn(1, 3, 224, 224)
        forward_ms = min(microseconds_per_call(lambda: model(pixel_values), calls=10) for _ in range(5)) / 1e3
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, 2 threads")
    print(f"PVT-small forward at batch 1, 224x224, acceleration off: {forward_ms:.1f} ms ({layers} layers)")
    for route, cost in costs.items():
        share = layers * cost / 1e3 / forward_ms
        print(f"predicate, layer shape kept {route!r}: {cost:.1f} us per call, {share:.2%} of the forward, all layers")


if __name__ == "__main__":
    main()
