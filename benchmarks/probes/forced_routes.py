"""Whole-forward effect of one CPU-acceleration route, forced for chosen stages, against the reference code.

    python benchmarks/probes/forced_routes.py ROUTE BATCH [STAGE_WIDTH ...] >> benchmarks/probes/forced_routes.log

Two PVT-small models on one set of weights, one with every layer whose width is in STAGE_WIDTH (all layers when none
is given) forced onto ROUTE, the other with the acceleration off; forwards timed interleaved (16 rounds, the order
alternating). It asks whether a route that the per-layer measurement finds faster also makes the whole forward faster.
"""

import statistics
import sys
import time

import torch

from modeling_pvt import PvtConfig, PvtForImageClassification, cpu_acceleration
from modeling_pvt.runtime import configure_allocator


class ForcedRoutes(dict):
    """`measured_routes` that answers ROUTE for the chosen widths and the reference code for the others."""

    def __init__(self, route: str, widths: set[int]):
        super().__init__()
        self.route, self.widths = route, widths

    def __contains__(self, key) -> bool:
        return True

    def get(self, key, default=None):
        return self[key]

    def __getitem__(self, key):
        return (self.route if not self.widths or key[0] in self.widths else "reference"), {}


def main() -> None:
    route, batch, widths = sys.argv[1], int(sys.argv[2]), {int(width) for width in sys.argv[3:]}
    configure_allocator()
    torch.manual_seed(0)
    accelerated = PvtForImageClassification(PvtConfig.from_preset("small")).eval()
    reference = PvtForImageClassification(accelerated.config).eval()
    reference.load_state_dict(accelerated.state_dict())
    reference.set_cpu_acceleration(False)
    cpu_acceleration.measured_routes = ForcedRoutes(route, widths)
    pixel_values = torch.randn(batch, 3, 224, 224)
    calls = max(1, 8 // batch)

    def seconds(model) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(calls):
                model(pixel_values)
        return (time.perf_counter() - start) / calls

    for model in (accelerated, reference, accelerated, reference):
        seconds(model)
    ratios = []
    for round_index in range(16):
        order = (accelerated, reference) if round_index % 2 else (reference, accelerated)
        timed = {id(model): seconds(model) for model in order}
        ratios.append(timed[id(reference)] / timed[id(accelerated)])
    print(
        f"{torch.backends.cpu.get_cpu_capability()}: {route} on widths {sorted(widths) or 'all'}, batch {batch}: "
        f"reference/forced median {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
