"""Kernel-level probes behind the README's account of the CPU MFU gap (2 threads, fp32, oneDNN products).

    python benchmarks/probes/cpu_kernels.py > benchmarks/probes/cpu_kernels.log

1. PVT-small's product shapes with and without the exact GELU fused in, against a 2048^3 product.
2. The folded attention products (one image's queries x heads*keys): as they are, padded to multiples of 8/16/64,
   and batched over images through `baddbmm`/`bmm` instead of a loop of oneDNN products.
3. The spatial-reduction convolutions batched and image by image (why running stages per image is slower).
4. A LayerNorm and a position-embedding addition on a stage-1 batch in isolation (cache-resident rates).
"""

import time

import torch
import torch.nn.functional as F


def seconds(function, repeats: int = 20) -> float:
    for _ in range(3):
        function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def onednn(inputs, weight, bias=None, post="none"):
    return torch.ops.mkldnn._linear_pointwise(inputs, weight, bias, post, [], "none" if post == "gelu" else "")


def product_rate(rows: int, inner: int, outer: int, post: str = "none") -> float:
    inputs, weight, bias = torch.randn(rows, inner), torch.randn(outer, inner), torch.randn(outer)
    return 2 * rows * inner * outer / seconds(lambda: onednn(inputs, weight, bias, post)) / 1e9


def folded_products(batch: int, tokens: int, width: int, keys: int) -> str:
    flops = 2 * batch * tokens * width * keys
    queries = torch.randn(batch, tokens, width)
    rates = []
    for size in sorted({keys + (-keys) % multiple for multiple in (1, 8, 16, 64)}):
        score_weights = torch.randn(batch, size, width)
        loop = seconds(lambda w=score_weights: [onednn(queries[i], w[i]) for i in range(batch)])
        rates.append(f"{size}: {flops / loop / 1e9:.0f}")
    score_weights, score_bias = torch.randn(batch, keys, width), torch.randn(batch, 1, keys)
    batched = seconds(lambda: torch.baddbmm(score_bias, queries, score_weights.transpose(1, 2)))
    probabilities, value_weights = torch.randn(batch, tokens, keys), torch.randn(batch, keys, width)
    value_weights_t = value_weights.transpose(1, 2).contiguous()
    value_loop = seconds(lambda: [onednn(probabilities[i], value_weights_t[i]) for i in range(batch)])
    value_bmm = seconds(lambda: torch.bmm(probabilities, value_weights))
    return (
        f"  {batch} x {tokens} tokens, width {width}, {keys} keys: scores loop by padded size {', '.join(rates)}; "
        f"scores baddbmm {flops / batched / 1e9:.0f}; values loop {flops / value_loop / 1e9:.0f}, "
        f"bmm {flops / value_bmm / 1e9:.0f}"
    )


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"reference 2048^3 product: {product_rate(2048, 2048, 2048):.0f} GFLOP/s")

    print("\n1. MLP products (rows, in -> out): plain and with the exact GELU fused, GFLOP/s")
    for rows, inner, outer in ((3136, 64, 512), (1568, 128, 1024), (1568, 320, 1280), (800, 512, 2048)):
        plain, gelu = product_rate(rows, inner, outer), product_rate(rows, inner, outer, "gelu")
        ratio = gelu / plain
        print(f"  {rows:5d} x {inner:4d} -> {outer:4d}: plain {plain:4.0f}, with GELU {gelu:4.0f} ({ratio:.0%})")
        print(f"  {rows:5d} x {outer:4d} -> {inner:4d}: plain {product_rate(rows, outer, inner):4.0f}")

    print("\n2. folded attention products, useful GFLOP/s (scores: tokens x width -> heads*keys; values: back)")
    for shape in ((1, 3136, 64, 49), (2, 784, 128, 98), (8, 196, 320, 245)):
        print(folded_products(*shape))

    print("\n3. spatial-reduction convolutions, batch 16: batched vs image by image (ms)")
    with torch.inference_mode():
        for channels, ratio, side in ((64, 8, 56), (128, 4, 28), (320, 2, 14)):
            conv = torch.nn.Conv2d(channels, channels, ratio, ratio)
            maps = torch.randn(16, channels, side, side).contiguous(memory_format=torch.channels_last)
            whole = seconds(lambda c=conv, m=maps: c(m))
            per_image = seconds(lambda c=conv, m=maps: [c(m[i : i + 1]) for i in range(16)])
            times = f"{whole * 1e3:.2f} vs {per_image * 1e3:.2f} ({per_image / whole:.1f}x)"
            print(f"  {channels} channels, ratio {ratio}: {times}")

        print("\n4. stage-1 batch (16 x 3136 x 64) memory passes in isolation (ms)")
        tokens, positions = torch.randn(16, 3136, 64), torch.randn(1, 3136, 64)
        weight, bias = torch.ones(64), torch.zeros(64)
        print(f"  LayerNorm {seconds(lambda: F.layer_norm(tokens, (64,), weight, bias)) * 1e3:.2f}")
        print(f"  add {seconds(lambda: tokens + positions) * 1e3:.2f}")
        print(f"  add in place {seconds(lambda: tokens.add_(positions)) * 1e3:.2f}")


if __name__ == "__main__":
    main()
