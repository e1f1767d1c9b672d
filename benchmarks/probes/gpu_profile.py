"""Where PVT-small's time goes on a GPU: training steps (bf16 autocast, fused AdamW) at batch 8 and 64 for both
implementations, CPU-side profile of a batch-8 step, and the CUDA kernels of our bf16 forward at batch 256.
Behind the README's GPU paragraph.

    python benchmarks/probes/gpu_profile.py > benchmarks/probes/gpu_profile_h200.log
"""

import time

import torch
from modeling_pvt.scripts.benchmark import build_pair
from torch.profiler import ProfilerActivity, profile


def train_step(model, optimizer, pixel_values, labels) -> None:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(pixel_values, labels=labels).loss
    loss.backward()
    optimizer.step()


def seconds(function, repeats: int = 20) -> float:
    for _ in range(3):
        function()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def time_training(name: str, model, batch: int) -> None:
    pixel_values = torch.randn(batch, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    model.cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step = seconds(lambda: train_step(model, optimizer, pixel_values, labels))
    print(f"train b{batch} {name}: step {step * 1e3:.1f} ms")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        forward = seconds(lambda: model(pixel_values, labels=labels).loss)
    print(f"   fwd-only {name}: {forward * 1e3:.1f} ms")


def main() -> None:
    ours, stock = build_pair("small", 224)
    for batch in (8, 64):
        for name, model in (("stock", stock), ("ours", ours)):
            time_training(name, model, batch)

    pixel_values = torch.randn(8, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (8,), device="cuda")
    for name, model in (("ours", ours), ("stock", stock)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            for _ in range(3):
                train_step(model, optimizer, pixel_values, labels)
        print("=====", name, "train b8 by CPU time")
        print(profiler.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))

    ours = ours.to(dtype=torch.bfloat16).eval()
    pixel_values = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for _ in range(2):
            ours(pixel_values)
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            for _ in range(3):
                ours(pixel_values)
    print("===== ours eval b256 bf16 by CUDA time")
    print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=80))


if __name__ == "__main__":
    main()
