"""PVT-small's non-overlapping strided convolutions (4 patch embeddings, the spatial reductions of stages 1-3), each
timed as `F.conv2d` and as the same function written as one product on patches (reshape + `addmm`), in alternating
rounds at batch 1 and 16. Prints both medians, their ratio and the largest difference.

    OMP_NUM_THREADS=2 python benchmarks/probes/strided_conv_vs_product.py
"""

import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

SHAPES = [  # name, input channels, height, width, output channels, kernel = stride
    ("patch1", 3, 224, 224, 64, 4),
    ("sr1", 64, 56, 56, 64, 8),
    ("patch2", 64, 56, 56, 128, 2),
    ("sr2", 128, 28, 28, 128, 4),
    ("patch3", 128, 28, 28, 320, 2),
    ("sr3", 320, 14, 14, 320, 2),
    ("patch4", 320, 14, 14, 512, 2),
]


def as_product(x: torch.Tensor, weight_2d: torch.Tensor, bias: torch.Tensor, k: int) -> torch.Tensor:
    n, c, h, w = x.shape
    patches = x.reshape(n, c, h // k, k, w // k, k).permute(0, 2, 4, 1, 3, 5).reshape(-1, c * k * k)
    return torch.addmm(bias, patches, weight_2d.t())


def as_convolution(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int) -> torch.Tensor:
    return F.conv2d(x, weight, bias, stride=k).flatten(2).transpose(1, 2).reshape(-1, weight.shape[0])


def mean_ms(function, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}, capability {torch.backends.cpu.get_cpu_capability()}")
    for name, c, h, w, out, k in SHAPES:
        for batch in (1, 16):
            x, weight, bias = torch.randn(batch, c, h, w), torch.randn(out, c, k, k) * 0.05, torch.randn(out)
            weight_2d = weight.reshape(out, -1)
            routes = {
                "conv": partial(as_convolution, x, weight, bias, k),
                "product": partial(as_product, x, weight_2d, bias, k),
            }
            times = {route: [] for route in routes}
            with torch.inference_mode():
                error = (routes["conv"]() - routes["product"]()).abs().max().item()
                for _ in range(15):
                    for route, function in routes.items():
                        times[route].append(mean_ms(function, 5))
            conv, product = statistics.median(times["conv"]), statistics.median(times["product"])
            print(f"{name:7s} batch {batch:<3d} conv {conv:7.3f} ms  product {product:7.3f} ms  "
                  f"conv/product {conv / product:5.2f}  max diff {error:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
