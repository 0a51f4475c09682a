"""
The hardware around the model: the peak FLOP/s that MFU is measured against (a table for GPUs, a
measured matmul on CPU), and the torch.compile trial that falls back to eager.
"""
import functools
import time

import torch

# Dense bf16/fp16 tensor-core peaks, FLOP/s, by the exact name torch.cuda.get_device_name() gives:
# an H100 PCIe or NVL has a lower peak than the SXM part, an L40 is not an L4. fp32 runs use TF32,
# half of that. A GPU missing here gets no MFU unless peak_flops is set.
GPU_PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA A10": 125e12,
    "NVIDIA L4": 121e12, "NVIDIA L40S": 362e12, "NVIDIA GeForce RTX 4090": 165e12,
    "NVIDIA GeForce RTX 3090": 71e12, "Tesla V100-SXM2-16GB": 125e12,
    "Tesla V100-SXM2-32GB": 125e12, "Tesla T4": 65e12,
}


@functools.lru_cache(maxsize=None)
def measure_cpu_matmul_flops(dtype=torch.float32, n=1024, repeats=5):
    """This CPU's matmul peak in FLOP/s: the best of a few square matmuls at this thread count.
    Own generator: a draw from the global one would shift every later dropout mask of training."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best


def peak_flops(device, dtype):
    """-> (the peak FLOP/s to measure MFU against, where it came from), or (None, why not): an
    exact GPU name from the table, or a measurement on CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return measure_cpu_matmul_flops(dtype), "measured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if name in GPU_PEAK_FLOPS:
            flops = GPU_PEAK_FLOPS[name]
            return (flops if dtype in (torch.bfloat16, torch.float16) else flops / 2), name
        return None, f"{name} is not in the table: set peak_flops"
    return None, f"no peak known for {device.type}: set peak_flops"


def compile_or_eager(model, x, y, autocast, verbose=True):
    """torch.compile, tried on one real step: compilation is lazy, so a missing compiler or an
    unsupported platform only shows up then. On failure: a one-line notice, and the eager model."""
    if verbose:
        print("compiling the model (torch.compile, tried on one step: seconds on a GPU, a minute "
              "or more on a CPU) ...", flush=True)
    compiled = torch.compile(model)
    # the trial step leaves no trace: the same random numbers after it (fork_rng), no gradients
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        try:
            with autocast:
                _, loss = compiled(x, y)
            loss.backward()
            return compiled
        except torch.OutOfMemoryError:  # not a compiler problem: eager would run out too
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:160]
            print(f"train.py: torch.compile is unavailable here ({type(e).__name__}: {first}); "
                  "training without it: compile off (set compile=false to skip the attempt)", flush=True)
            return model
        finally:
            model.zero_grad(set_to_none=True)
