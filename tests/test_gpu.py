"""The CUDA paths, skipped (not passed) without a GPU: a compiled bf16 training step in every mode,
and cached against uncached generation on the GPU. `python bench.py gpu` measures the rest."""
import pytest
import torch

from model import GPT, GPTConfig, MODES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def gpu_model(mode):
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=320,
                         residual_mode=mode)).cuda()


@pytest.mark.parametrize("mode", range(len(MODES)))
def test_a_compiled_bf16_training_step_in_every_mode(mode):
    torch._dynamo.reset()  # dynamo's compile limit is per code object, shared by every model
    model = gpu_model(mode)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cuda")
    compiled = torch.compile(model, fullgraph=True)  # a graph break or a fallback fails the test
    x = torch.randint(0, 320, (4, 65), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = compiled(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("mode", range(len(MODES)))
def test_cached_generation_equals_uncached_on_the_gpu(mode):
    model = gpu_model(mode).eval()
    prompt = torch.randint(0, 257, (2, 5), device="cuda")
    kwargs = dict(temperature=0, vocab_size=257)
    cached = model.generate(prompt, 80, use_cache=True, **kwargs)  # past block_size: the window slides
    assert torch.equal(cached, model.generate(prompt, 80, use_cache=False, **kwargs))
