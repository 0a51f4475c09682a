"""model.py against an independent, straightforward reference: explicit lists of states, explicit means
and softmaxes, attention written out with a mask. Float64 so that equality can be tight."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, RESIDUAL_MODES, parse_residual_mode

MODES = [0, 1, 2, 3]


def tiny_config(mode, **kw):
    args = dict(n_layer=4, n_head=2, n_embd=16, mlp_hidden=24, block_size=16, vocab_size=37,
                dropout=0.0, bias=True, residual_mode=mode)
    args.update(kw)
    return GPTConfig(**args)


def make_model(mode, seed=0, random_logits=True, **kw):
    torch.manual_seed(seed)
    model = GPT(tiny_config(mode, **kw)).double().eval()
    if random_logits:
        with torch.no_grad():
            for t in model.layer_logits():
                if t is not None:
                    t.normal_(0, 1.5)
    return model


# ---------------------------------------------------------------- the reference, written from the equations

def ref_layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + ln.eps) * ln.weight
    return y + ln.bias if ln.bias is not None else y


def ref_attention(x, attn, n_head):
    B, T, C = x.shape
    hs = C // n_head
    qkv = x @ attn.c_attn.weight.T + attn.c_attn.bias
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    out = torch.zeros_like(x)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for h in range(n_head):
        sl = slice(h * hs, (h + 1) * hs)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(hs)
        scores = scores.masked_fill(~causal, float("-inf"))
        out[..., sl] = torch.softmax(scores, dim=-1) @ v[..., sl]
    return out @ attn.c_proj.weight.T + attn.c_proj.bias


def ref_mlp(x, mlp):
    hid = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
    hid = 0.5 * hid * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hid + 0.044715 * hid ** 3)))
    return hid @ mlp.c_proj.weight.T + mlp.c_proj.bias


def reference_logits(model, idx):
    cfg = model.config
    T = idx.size(1)
    h = model.transformer.wte.weight[idx] + model.transformer.wpe.weight[:T]  # h_0
    hs, as_ = [], []  # h_0..h_m (attention inputs), a_0..a_m (MLP inputs)
    for m, block in enumerate(model.transformer.h):
        hs.append(h)
        attn_out = ref_attention(ref_layer_norm(h, block.ln_1), block.attn, cfg.n_head)
        if cfg.residual_mode == 2:
            a = torch.stack(hs).mean(0) + attn_out
        else:
            a = h + attn_out
        as_.append(a)
        mlp_out = ref_mlp(ref_layer_norm(a, block.ln_2), block.mlp)
        if cfg.residual_mode == 1:
            h = torch.stack(as_).mean(0) + mlp_out
        elif cfg.residual_mode == 3:
            if m == 0:
                w = torch.ones(1, dtype=a.dtype)
            else:
                theta = block.layer_logits.detach()
                w = torch.exp(theta) / torch.exp(theta).sum()
            h = sum(w[i] * as_[i] for i in range(m + 1)) + mlp_out
        else:
            h = a + mlp_out
    h = ref_layer_norm(h, model.transformer.ln_f)
    return h @ model.transformer.wte.weight.T


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("mode", MODES)
def test_logits_match_reference(mode):
    model = make_model(mode)
    idx = torch.randint(0, 37, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(idx)
        expected = reference_logits(model, idx)
    assert logits.shape == (3, 11, 37)
    assert (logits - expected).abs().max().item() < 1e-10


def test_modes_really_differ():
    """Guards the reference test against a model that ignores the switch."""
    idx = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(2))
    outs = [make_model(mode)(idx)[0] for mode in MODES]
    for i in range(len(MODES)):
        for j in range(i + 1, len(MODES)):
            assert (outs[i] - outs[j]).abs().max().item() > 1e-4, (i, j)


def test_mode3_at_init_equals_mode1():
    idx = torch.randint(0, 37, (2, 13), generator=torch.Generator().manual_seed(3))
    m1 = make_model(1, seed=5, random_logits=False)
    m3 = make_model(3, seed=5, random_logits=False)
    assert all(t is None or torch.all(t == 0) for t in m3.layer_logits())
    with torch.no_grad():
        assert (m1(idx)[0] - m3(idx)[0]).abs().max().item() < 1e-12


@pytest.mark.parametrize("mode", [1, 3])
def test_block0_is_standard_residual(mode):
    """With one block, modes 1 and 3 must be exactly the standard residual."""
    idx = torch.randint(0, 37, (2, 7), generator=torch.Generator().manual_seed(4))
    std = make_model(0, seed=6, n_layer=1)
    other = make_model(mode, seed=6, n_layer=1)
    assert other.layer_logits() == [None]
    with torch.no_grad():
        assert torch.equal(std(idx)[0], other(idx)[0])


@pytest.mark.parametrize("mode", MODES)
def test_causality(mode):
    model = make_model(mode)
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 37, (2, 12), generator=g)
    changed = idx.clone()
    changed[:, 8:] = torch.randint(0, 37, (2, 4), generator=g)
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_gradients_reach_every_layer_logit():
    model = make_model(3)
    idx = torch.randint(0, 37, (2, 10), generator=torch.Generator().manual_seed(8))
    _, loss = model(idx, targets=idx.roll(-1, dims=1))
    loss.backward()
    for m, theta in enumerate(model.layer_logits()):
        if m == 0:
            assert theta is None
            continue
        assert theta.grad is not None and theta.grad.shape == (m + 1,)
        assert torch.all(theta.grad != 0), (m, theta.grad)


def test_layer_weights_shape_and_sum():
    model = make_model(3)
    weights = model.layer_weights()
    assert len(weights) == 4 and weights[0] is None
    for m in range(1, 4):
        assert weights[m].shape == (m + 1,)
        assert abs(weights[m].sum().item() - 1) < 1e-6
        expected = torch.softmax(model.layer_logits()[m].detach().float(), 0)
        assert torch.allclose(weights[m], expected)
    assert make_model(1).layer_weights() == [None] * 4


@pytest.mark.parametrize("n_layer", [1, 4, 12])
def test_mode3_parameter_count(n_layer):
    m1 = GPT(tiny_config(1, n_layer=n_layer))
    m3 = GPT(tiny_config(3, n_layer=n_layer))
    extra = m3.num_params() - m1.num_params()
    assert extra == n_layer * (n_layer + 1) // 2 - 1  # 77 at 12 layers


@pytest.mark.parametrize("bad", [4, -1, "mean", 1.5, None, True])
def test_unknown_mode_raises(bad):
    with pytest.raises(ValueError, match="valid values"):
        GPTConfig(residual_mode=bad)


def test_mode_names():
    assert [parse_residual_mode(n) for n in RESIDUAL_MODES] == [0, 1, 2, 3]
    assert parse_residual_mode("3") == 3
    assert GPTConfig(residual_mode="mlp_learned").residual_mode == 3


def test_optimizer_groups():
    model = make_model(3)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", layer_weight_lr_mult=10.0)
    decay, no_decay, logits = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    assert logits["weight_decay"] == 0.0 and logits["lr"] == pytest.approx(1e-2)
    assert {id(p) for p in logits["params"]} == {id(t) for t in model.layer_logits() if t is not None}
    n_grouped = sum(len(g["params"]) for g in opt.param_groups)
    assert n_grouped == len(list(model.parameters()))  # every parameter exactly once (tied counted once)


def test_flops_per_token_by_hand():
    model = GPT(tiny_config(0))
    C, H, V, L, T = 16, 24, 37, 4, 16
    per_layer = 3 * C * C + C * C + 2 * C * H
    assert model.flops_per_token() == 6 * (L * per_layer + V * C) + 12 * L * C * T
    assert model.estimate_mfu(1000.0, 1e9) == pytest.approx(1000.0 * model.flops_per_token() / 1e9)


@pytest.mark.parametrize("mode", MODES)
def test_autocast_bf16_close_to_fp32(mode):
    torch.manual_seed(0)
    model = GPT(tiny_config(mode)).eval()
    idx = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref, _ = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = model(idx)
    assert torch.allclose(low.float(), ref, atol=5e-2)


@pytest.mark.parametrize("mode", MODES)
def test_compiled_loss_equals_eager(mode):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(tiny_config(mode, n_layer=3))
    with torch.no_grad():
        for t in model.layer_logits():
            if t is not None:
                t.normal_()
    idx = torch.randint(0, 37, (2, 16), generator=torch.Generator().manual_seed(10))
    targets = idx.roll(-1, dims=1)
    _, eager_loss = model(idx, targets)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: the mixing must not break the graph
    _, compiled_loss = compiled(idx, targets)
    assert abs(compiled_loss.item() - eager_loss.item()) < 1e-4
    compiled_loss.backward()  # the compiled backward runs too
    assert all(p.grad is not None for p in model.parameters())
