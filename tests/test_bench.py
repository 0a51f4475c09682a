"""bench.py's own machinery and harness/hardware.py, on the CPU: what a first GPU run relies on."""
import contextlib

import pytest
import torch

import bench
from harness import configurator, hardware
from model import GPT, GPTConfig, MODES


def tiny(mode, **kw):
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, residual_mode=mode)
    return GPT(GPTConfig(**{**args, **kw}))


def test_generation_runs_on_the_models_device(monkeypatch):
    """The prompt and the sampler's generator are made on the model's device: a CUDA model once got
    CPU ones. A model on the meta device shows where they are made; meta has no generators, so the
    generator is recorded instead of made."""
    made_on = []

    class Recorder:
        def __init__(self, device="cpu"):
            made_on.append(torch.device(device))

        def manual_seed(self, seed):
            return self

    monkeypatch.setattr(torch, "Generator", Recorder)
    model = tiny(0).to("meta")
    run = bench.generation(model, 32, 4, use_cache=True)
    assert run.args[0].device.type == "meta"  # the prompt
    assert made_on == [torch.device("meta")] and isinstance(run.keywords["generator"], Recorder)


def test_generation_samples_on_the_cpu():
    out = bench.generation(tiny(3).eval(), 32, 5, use_cache=True)()
    assert out.shape == (1, 6)


def test_a_compile_past_dynamos_limit_fails_instead_of_running_eager(monkeypatch):
    """Dynamo compiles one code object (GPT.forward, shared by every model in the process) a limited
    number of times, then silently runs it eager. Under bench.strict_compile the next compile raises:
    a row labelled "compiled" cannot be eager."""
    for key in ("recompile_limit", "fail_on_recompile_limit_hit"):  # restored after the test
        monkeypatch.setattr(torch._dynamo.config, key, getattr(torch._dynamo.config, key))
    torch._dynamo.reset()
    bench.strict_compile(limit=2)
    x = torch.zeros(1, 4, dtype=torch.long)
    configs = [dict(n_layer=2), dict(n_layer=3), dict(n_layer=4)]  # each a new graph of GPT.forward
    for kw in configs[:2]:
        torch.compile(tiny(0, **kw), backend="eager")(x)
    with pytest.raises(Exception, match="recompile_limit|cache_size_limit|[Rr]ecompil"):
        torch.compile(tiny(0, **configs[2]), backend="eager")(x)
    torch._dynamo.reset()


def test_every_mode_is_benchmarked():
    assert [mode for _, cls, mode in bench.MODEL_VARIANTS if cls is GPT] == list(range(len(MODES)))


@pytest.mark.parametrize("mode", [mode for _, cls, mode in bench.MODEL_VARIANTS if cls is bench.NaiveGPT])
def test_a_naive_variant_computes_what_its_mode_does(mode):
    """The naive rows are a contrast in speed and memory only: the same logits and gradients."""
    torch.manual_seed(0)
    model = tiny(mode, n_layer=3).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # mixing away from its init, where modes coincide
    naive = bench.NaiveGPT(model.config).double()
    naive.load_state_dict(model.state_dict())
    idx = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    (logits, loss), (naive_logits, naive_loss) = model(idx, idx), naive(idx, idx)
    assert (logits - naive_logits).abs().max().item() < 1e-10
    loss.backward()
    naive_loss.backward()
    for (name, p), q in zip(model.named_parameters(), naive.parameters()):
        assert (p.grad - q.grad).abs().max().item() < 1e-10, name


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", None), ("NVIDIA L4", 121e12), ("NVIDIA L40", None)])
def test_gpu_peaks_are_looked_up_by_exact_name(monkeypatch, name, peak):
    """A PCIe or NVL H100 has a lower peak than the SXM part, and an L40 is not an L4: substrings matched them."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    flops, source = hardware.peak_flops("cuda", torch.bfloat16)
    assert flops == peak and (source == name if peak else "set peak_flops" in source)
    if peak:
        assert hardware.peak_flops("cuda", torch.float32)[0] == peak / 2  # TF32


class Failing(torch.nn.Module):
    def __init__(self, error):
        super().__init__()
        self.error, self.weight = error, torch.nn.Parameter(torch.ones(1))

    def forward(self, x, y):
        raise self.error


def test_the_compile_trial_falls_back_on_a_compiler_error_but_lets_out_of_memory_through(capsys):
    model = Failing(RuntimeError("no C++ compiler"))
    x = torch.zeros(1, 2, dtype=torch.long)
    assert hardware.compile_or_eager(model, x, x, contextlib.nullcontext()) is model
    assert "torch.compile is unavailable here (RuntimeError: no C++ compiler)" in capsys.readouterr().out
    with pytest.raises(torch.OutOfMemoryError):  # not reported as "torch.compile is unavailable"
        hardware.compile_or_eager(Failing(torch.OutOfMemoryError("CUDA out of memory")), x, x,
                                  contextlib.nullcontext())
    torch._dynamo.reset()


def test_a_cuda_device_is_made_the_current_one(monkeypatch):
    """device=cuda:1 in one process once left GPU 0 current: its RNG state went into the checkpoint, and its
    memory and capability were read. The resolver now sets it, and under DDP picks the local rank's GPU."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(str(device)))
    assert configurator.resolve_device("cuda:1") == "cuda:1" and current == ["cuda:1"]
    assert configurator.resolve_device("auto") == "cuda:0" and current[-1] == "cuda:0"
    assert configurator.resolve_device("cuda", ddp_rank=3) == "cuda:3" and current[-1] == "cuda:3"
    assert configurator.resolve_device("cpu") == "cpu" and len(current) == 3
