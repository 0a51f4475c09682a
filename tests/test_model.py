"""model.py against an independent, straightforward reference: explicit lists of states, explicit
means and softmaxes, attention written out with a mask. Float64 so that equality can be tight."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, MODES, parse_residual_mode

ALL_MODES = list(range(len(MODES)))  # every mode model.py has, a new one included
LEARNED = [m for m in ALL_MODES if MODES[m].params]  # the modes with mixing parameters
# the modes reference_logits below implements, from their equations: a new mode adds its own
REFERENCE_MODES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def tiny_config(mode, **kw):
    args = dict(n_layer=4, n_head=2, n_embd=16, mlp_hidden=24, block_size=16, vocab_size=37,
                dropout=0.0, bias=True, residual_mode=mode)
    args.update(kw)
    return GPTConfig(**args)


def mixing_params(model):
    """The parameters MODES names for the model's mode (test_mixing_parameter_count checks, by
    counting every parameter, that they are all the mode adds)."""
    return {name: p for name, p in model.named_parameters()
            if name.rsplit(".", 1)[-1] in model.mode.params}


def perturb_mixing(model, std=0.7, seed=11):
    """Random mixing parameters around their init: softmax logits, alphas, queries, lambdas."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mixing_params(model).values():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def make_model(mode, seed=0, random_mixing=True, **kw):
    torch.manual_seed(seed)
    model = GPT(tiny_config(mode, **kw)).double().eval()
    return perturb_mixing(model) if random_mixing else model


def tokens(shape, seed):
    return torch.randint(0, 37, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------- the reference, written from the equations

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


def ref_f_attn(block, x, n_head):  # Attn(ln_1(x))
    return ref_attention(ref_layer_norm(x, block.ln_1), block.attn, n_head)


def ref_f_mlp(block, x):  # MLP(ln_2(x))
    return ref_mlp(ref_layer_norm(x, block.ln_2), block.mlp)


def ref_softmax(theta):
    return torch.exp(theta) / torch.exp(theta).sum()


def ref_embed(model, idx):
    return model.transformer.wte.weight[idx] + model.transformer.wpe.weight[:idx.size(1)]  # h_0


def ref_head(model, h):
    return ref_layer_norm(h, model.transformer.ln_f) @ model.transformer.wte.weight.T


def reference_logits(model, idx):
    cfg = model.config
    assert cfg.residual_mode in REFERENCE_MODES, "add the new mode's equations to reference_logits"
    if cfg.residual_mode == 6:
        return reference_attn_res(model, idx)[0]
    if cfg.residual_mode in (8, 9):
        return reference_hyper(model, idx)[0]
    h0 = h = ref_embed(model, idx)
    hs, as_, ys = [], [], [h0]  # h_0..h_m (attention inputs), a_0..a_m (MLP inputs), y_0..y_{m+1}
    for m, block in enumerate(model.transformer.h):
        if cfg.residual_mode == 7:
            lam, mu = block.x0_lambdas.detach()
            h = lam * h + mu * h0
        hs.append(h)
        attn_out = ref_f_attn(block, h, cfg.n_head)
        if cfg.residual_mode == 2:
            a = torch.stack(hs).mean(0) + attn_out
        elif cfg.residual_mode == 4:
            u = ref_softmax(block.layer_logits.detach()) if m else torch.ones(1, dtype=h.dtype)
            a = sum(u[i] * hs[i] for i in range(m + 1)) + attn_out
        else:
            a = h + attn_out
        as_.append(a)
        mlp_out = ref_f_mlp(block, a)
        if cfg.residual_mode == 1:
            h = torch.stack(as_).mean(0) + mlp_out
        elif cfg.residual_mode == 3:
            w = ref_softmax(block.layer_logits.detach()) if m else torch.ones(1, dtype=a.dtype)
            h = sum(w[i] * as_[i] for i in range(m + 1)) + mlp_out
        elif cfg.residual_mode == 5:
            ys.append(a + mlp_out)
            alpha = block.dwa_weights.detach()
            assert alpha.shape == (m + 2,)
            h = sum(alpha[j] * ys[j] for j in range(m + 2))
        else:
            h = a + mlp_out
    return ref_head(model, h)


def reference_attn_res(model, idx, plain_mean=False):
    """Mode 6 from its equations: logits, and the weights of z_0..z_{2L}, (B, T, k+1) each."""
    blocks, n_head = model.transformer.h, model.config.n_head
    queries = [q for b in blocks for q in (b.attn_query, b.mlp_query)] + [model.final_query]
    queries = [q.detach() for q in queries]
    sources, weights = [ref_embed(model, idx)], []
    for k, q in enumerate(queries):
        r = [s / torch.sqrt((s ** 2).mean(-1, keepdim=True) + 1e-6) for s in sources]
        logits = torch.stack([(r_i * q).sum(-1) for r_i in r], dim=-1)  # (B, T, k+1)
        w = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
        weights.append(w)
        if plain_mean:
            z = torch.stack(sources).mean(0)
        else:
            z = sum(w[..., i:i + 1] * s for i, s in enumerate(sources))
        if k < 2 * len(blocks):
            block = blocks[k // 2]
            sources.append(ref_f_attn(block, z, n_head) if k % 2 == 0 else ref_f_mlp(block, z))
    return ref_head(model, z), weights


def reference_hyper(model, idx):
    """Modes 8 and 9 from their equations, stream by stream (H: a list of n (B, T, C) tensors):
    logits, and each sublayer's A_r (mode 8) or H_res (mode 9), (B, T, n, n)."""
    cfg, blocks, n = model.config, model.transformer.h, model.config.hc_streams
    H, mats = [ref_embed(model, idx)] * n, []
    for k in range(2 * cfg.n_layer):
        block, j = blocks[k // 2], k % 2
        if cfg.residual_mode == 8:
            static, W, (s_a, s_b) = (getattr(block, p)[j].detach() for p in MODES[8].params)
            Hn = [(h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True)
                                                              + cfg.norm_eps) for h in H]
            d = [torch.tanh(hn @ W) for hn in Hn]  # stream i's (B, T, n + 2): W_m | W_r | W_b
            read = torch.stack([static[i, 0] + s_a * d[i][..., 0] for i in range(n)], -1)
            A_r = torch.stack([torch.stack([static[i, 1 + c] + s_a * d[i][..., 1 + c] for c in range(n)], -1)
                               for i in range(n)], -2)  # (B, T, n, n), row i from stream i
            write = torch.stack([static[i, n + 1] + s_b * d[i][..., n + 1] for i in range(n)], -1)
            carry = [[A_r[..., i, c] for i in range(n)] for c in range(n)]  # H'_c = sum_i A_r[i, c] H_i
            mats.append(A_r)
        else:
            proj, bias, (a_pre, a_post, a_res) = (getattr(block, p)[j].detach() for p in MODES[9].params)
            v = torch.cat(H, -1)
            v = v / torch.sqrt((v ** 2).mean(-1, keepdim=True) + 1e-6)
            read = 1 / (1 + torch.exp(-(a_pre * (v @ proj[:, :n]) + bias[:n])))
            write = 2 / (1 + torch.exp(-(a_post * (v @ proj[:, n:2 * n]) + bias[n:2 * n])))
            res = torch.exp(a_res * (v @ proj[:, 2 * n:]) + bias[2 * n:]).unflatten(-1, (n, n))
            for _ in range(cfg.mhc_iters):  # Sinkhorn-Knopp: columns, then rows, sum to 1
                res = res / res.sum(-2, keepdim=True)
                res = res / res.sum(-1, keepdim=True)
            carry = [[res[..., i, c] for c in range(n)] for i in range(n)]  # H'_i = sum_c res[i, c] H_c
            mats.append(res)
        x = sum(read[..., i, None] * H[i] for i in range(n))
        y = ref_f_attn(block, x, cfg.n_head) if j == 0 else ref_f_mlp(block, x)
        H = [sum(carry[o][i][..., None] * H[i] for i in range(n)) + write[..., o, None] * y
             for o in range(n)]
    return ref_head(model, sum(H) / n), mats


# ------------------------------------------------------- tests

@pytest.mark.parametrize("mode", ALL_MODES)
def test_logits_match_reference(mode):
    model = make_model(mode)
    idx = tokens((3, 11), 1)
    with torch.no_grad():
        logits, _ = model(idx)
        expected = reference_logits(model, idx)
    assert logits.shape == (3, 11, 37)
    assert (logits - expected).abs().max().item() < 1e-10


def test_modes_really_differ():
    """Guards the reference test against a model that ignores the switch."""
    idx = tokens((2, 9), 2)
    outs = [make_model(mode)(idx)[0] for mode in ALL_MODES]
    for i in ALL_MODES:
        for j in range(i + 1, len(ALL_MODES)):
            assert (outs[i] - outs[j]).abs().max().item() > 1e-4, (i, j)


@pytest.mark.parametrize("mode, base", [(3, 1), (4, 2), (5, 0), (7, 0), (8, 0)])
def test_learned_mode_at_init_equals_its_base(mode, base):
    idx = tokens((2, 13), 3)
    plain = make_model(base, seed=5, random_mixing=False)
    learned = make_model(mode, seed=5, random_mixing=False)
    with torch.no_grad():
        assert (plain(idx)[0] - learned(idx)[0]).abs().max().item() < 1e-12
        perturb_mixing(learned)  # and the mixing parameters really are used
        assert (plain(idx)[0] - learned(idx)[0]).abs().max().item() > 1e-6


@pytest.mark.parametrize("mode, bound", [(6, 1.0), (9, 1e-2)])
def test_at_init_mode_is_mode0_but_for_layernorm_eps(mode, bound):
    """Mode 6 at init reads z_k = mean(s_0..s_k) = h / (k + 1), mode 9 reads sum_i H_pre,i H_i = c h
    (then H_res = 1/n and H_post = 1 keep the streams equal): h's scale changes, which LayerNorm
    drops but for its eps. So with eps -> 0 both are mode 0; at the default eps mode 9 is within
    `bound` (0.0040 at configs/cpu.py's shape), while mode 6's 1/(k + 1) pushes var(z_k) toward eps."""
    idx = tokens((2, 9), 15)
    with torch.no_grad():
        gaps = [(make_model(mode, seed=5, random_mixing=False, norm_eps=eps)(idx)[0]
                 - make_model(0, seed=5, random_mixing=False, norm_eps=eps)(idx)[0]).abs().max().item()
                for eps in (1e-5, 1e-30)]
    assert gaps[1] < 1e-12 and 1e-4 < gaps[0] < bound
    with pytest.raises(ValueError, match="norm_eps must be a number above 0"):
        GPTConfig(norm_eps=0.0)


def test_sinkhorn_is_doubly_stochastic():
    """20 iterations: rows sum to 1 (the last step), columns within 1e-6 for logits of std 0.5, n >= 3.
    SK slows as the matrix leaves uniform: at std 1, 1% of 4 x 4 matrices miss 1e-6 (by up to 1.4e-3),
    and n = 2 is the slowest."""
    from model import sinkhorn
    g = torch.Generator().manual_seed(3)
    for n in (3, 4, 8):
        logits = 0.5 * torch.randn(2000, n, n, generator=g)
        M = sinkhorn(logits, 20)
        assert M.min().item() > 0
        assert (M.sum(-1) - 1).abs().max().item() < 1e-6 and (M.sum(-2) - 1).abs().max().item() < 1e-6
        assert (sinkhorn(4 * logits, 20).sum(-1) - 1).abs().max().item() < 1e-6
        shifted = logits.double() + 50 * torch.randn(2000, 1, n, generator=g, dtype=torch.float64)
        assert (sinkhorn(shifted, 20) - M).abs().max().item() < 1e-6  # a column's shift: no change
    assert torch.equal(sinkhorn(torch.zeros(4, 4), 20), torch.full((4, 4), 0.25))


def test_mode9_streams_part_at_their_first_step():
    """The n streams start equal. With b = 0 everything is symmetric in the streams: the columns of P_pre and
    P_post get the same gradient, H_res's none (its entries sum to n), so the streams would stay equal for ever.
    b_pre = +1 on stream k mod n, -1 elsewhere breaks the tie, after HC's one-hot A_m, and leaves the start as
    it was (test_at_init_mode_is_mode0_but_for_layernorm_eps)."""
    idx = tokens((2, 9), 16)
    for tied in (True, False):
        model = make_model(9, random_mixing=False)
        if tied:
            with torch.no_grad():
                for block in model.transformer.h:
                    block.mhc_bias.zero_()
        model(idx, targets=idx.roll(-1, dims=1))[1].backward()
        n = model.config.hc_streams
        for block in model.transformer.h[:-1]:  # the last block's MLP writes to the head's mean
            proj, bias = block.mhc_proj.grad, block.mhc_bias.grad  # (2, n C, 2n + n^2), (2, 2n + n^2)
            post = torch.cat([proj[:, :, n:2 * n], bias[:, None, n:2 * n]], 1)  # P_post and b_post
            spread = (post - post[..., :1]).abs().amax((1, 2)) / post.abs().amax((1, 2))
            if tied:
                assert spread.max().item() < 1e-12 and bias[:, 2 * n:].abs().max().item() < 1e-15
            else:
                assert spread.min().item() > 1e-4  # small: the uniform H_res passes the mean on


def test_mode9_current_logit_leans_H_res_to_the_identity():
    """b_res = c I: SK(exp(c I)) is already doubly stochastic, e^c / (e^c + n - 1) on the diagonal and
    1 / (e^c + n - 1) off it. Its rows sum to 1, so with the streams equal at init the logits do not move."""
    c = 3.0
    model = make_model(9, random_mixing=False, current_logit=c)
    n = model.config.hc_streams
    expected = (torch.ones(n, n) + (math.exp(c) - 1) * torch.eye(n)) / (math.exp(c) + n - 1)
    for raw in model.mixing_weights()["raw"]:
        assert raw.tolist() == pytest.approx(expected.flatten().tolist(), rel=1e-6)
    idx = tokens((2, 9), 16)
    with torch.no_grad():
        diff = model(idx)[0] - make_model(9, random_mixing=False)(idx)[0]
    assert diff.abs().max().item() < 1e-12


def test_mode6_zero_queries_route_the_plain_mean():
    model = make_model(6, random_mixing=False)
    assert all(torch.all(p == 0) for p in mixing_params(model).values())
    idx = tokens((2, 10), 4)
    with torch.no_grad():
        logits, _ = model(idx)
        expected, _ = reference_attn_res(model, idx, plain_mean=True)
    assert (logits - expected).abs().max().item() < 1e-12


@pytest.mark.parametrize("mode", [1, 3, 4])
def test_block0_is_standard_residual(mode):
    """With one block, modes 1, 3 and 4 must be exactly the standard residual."""
    idx = tokens((2, 7), 4)
    std = make_model(0, seed=6, n_layer=1)
    other = make_model(mode, seed=6, n_layer=1)
    assert other.transformer.h[0].layer_logits is None
    with torch.no_grad():
        assert torch.equal(std(idx)[0], other(idx)[0])


@pytest.mark.parametrize("mode", ALL_MODES)
def test_causality(mode):
    model = make_model(mode)
    idx = tokens((2, 12), 7)
    changed = idx.clone()
    changed[:, 8:] = tokens((2, 4), 17)
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("mode", LEARNED)
def test_gradients_reach_every_mixing_parameter(mode):
    model = make_model(mode)
    idx = tokens((2, 10), 8)
    _, loss = model(idx, targets=idx.roll(-1, dims=1))
    loss.backward()
    params = mixing_params(model)
    assert params
    for name, p in params.items():
        if name == "transformer.h.0.attn_query":  # q_0 weighs z_0's one source, s_0: weight 1
            assert torch.all(p.grad == 0)
            continue
        assert p.grad is not None and torch.all(p.grad != 0), (name, p.grad)


def test_layer_weights_shape_and_sum():
    model = make_model(3)
    weights = model.mixing_weights()["rows"]
    assert len(weights) == 4 and weights[0] is None
    for m in range(1, 4):
        assert weights[m].shape == (m + 1,)
        assert abs(weights[m].sum().item() - 1) < 1e-6
        expected = torch.softmax(model.transformer.h[m].layer_logits.detach().float(), 0)
        assert torch.allclose(weights[m], expected)
    assert make_model(1).mixing_weights() is None


@pytest.mark.parametrize("mode", ALL_MODES)
def test_mixing_weights(mode):
    model = make_model(mode)
    mix = model.mixing_weights()
    if mode not in LEARNED:
        assert mix is None
        return
    L, C = 4, 16
    if mode in (3, 4):
        assert mix["rows"][0] is None and mix["raw"][0] is None
        for m in range(1, L):
            assert torch.allclose(mix["rows"][m], torch.softmax(mix["raw"][m], 0))
            assert torch.equal(mix["raw"][m], model.transformer.h[m].layer_logits.detach().float())
    elif mode == 6:
        assert mix["rows"] is None  # nothing recorded
        assert [tuple(q.shape) for q in mix["raw"]] == [(C,)] * (2 * L + 1)
        assert torch.equal(mix["raw"][-1], model.final_query.detach().float())
        assert torch.equal(mix["raw"][3], model.transformer.h[1].mlp_query.detach().float())
    elif mode in (8, 9):
        assert mix["rows"] is None  # nothing recorded
        n, raw = model.config.hc_streams, mix["raw"]
        assert [tuple(r.shape) for r in raw] == [(n * n,)] * (2 * L)
        if mode == 8:
            assert torch.equal(raw[3], model.transformer.h[1].hc_static[1, :, 1:n + 1].detach().flatten().float())
        else:  # SK(exp(b_res)): doubly stochastic
            assert torch.allclose(raw[3].view(n, n).sum(0), torch.ones(n), atol=1e-6)
            assert torch.allclose(raw[3].view(n, n).sum(1), torch.ones(n), atol=1e-6)
        model.record_routing()
        idx = tokens((2, 7), 5)
        with torch.no_grad():
            model(idx)
        mats = reference_hyper(model, idx)[1]
        rows = model.mixing_weights()["rows"]
        assert len(rows) == 2 * L
        for k, row in enumerate(rows):
            assert torch.allclose(row, mats[k].mean((0, 1)).flatten().float(), atol=1e-6)
    elif mode in (5, 7):
        name = "dwa_weights" if mode == 5 else "x0_lambdas"
        shapes = [(m + 2,) if mode == 5 else (2,) for m in range(L)]
        assert [tuple(r.shape) for r in mix["rows"]] == shapes
        for m, block in enumerate(model.transformer.h):
            assert torch.equal(mix["rows"][m], getattr(block, name).detach().float())


# parameters each mode adds to mode 0, with L blocks of width C and n streams: 77, 77, 90, 25 C,
# 24 at 12 blocks; modes 8 and 9 per sublayer: [A_m | A_r | B], W_m | W_r | W_b, s_a, s_b, and
# P_pre | P_post | P_res, b likewise, a_pre, a_post, a_res
PARAM_COUNTS = {0: lambda L, C, n: 0, 1: lambda L, C, n: 0, 2: lambda L, C, n: 0,
                3: lambda L, C, n: L * (L + 1) // 2 - 1, 4: lambda L, C, n: L * (L + 1) // 2 - 1,
                5: lambda L, C, n: L * (L + 3) // 2, 6: lambda L, C, n: (2 * L + 1) * C,
                7: lambda L, C, n: 2 * L,
                8: lambda L, C, n: 2 * L * (n * (n + 2) + C * (n + 2) + 2),
                9: lambda L, C, n: 2 * L * ((n * C + 1) * (2 * n + n * n) + 3)}


@pytest.mark.parametrize("n_layer, n", [(1, 4), (4, 4), (12, 4), (4, 3)])
@pytest.mark.parametrize("mode", sorted(PARAM_COUNTS))
def test_mixing_parameter_count(mode, n_layer, n):
    L, C = n_layer, 16
    expected = PARAM_COUNTS[mode](L, C, n)
    plain = GPT(tiny_config(0, n_layer=n_layer))
    learned = GPT(tiny_config(mode, n_layer=n_layer, hc_streams=n))
    assert learned.num_params() - plain.num_params() == expected
    assert sum(p.numel() for p in mixing_params(learned).values()) == expected


@pytest.mark.parametrize("bad", [len(MODES), -1, "mean", 1.5, None, True])
def test_unknown_mode_raises(bad):
    with pytest.raises(ValueError, match="valid values"):
        GPTConfig(residual_mode=bad)


def test_mode_names():
    assert [parse_residual_mode(mode.name) for mode in MODES] == ALL_MODES
    names = ["standard", "mlp_mean", "attn_mean", "mlp_learned", "attn_learned", "dwa", "attn_res",
             "x0_mix", "hyper", "mhc"]  # a new mode comes after these
    assert [mode.name for mode in MODES[:len(names)]] == names
    assert parse_residual_mode("3") == 3 and parse_residual_mode(" 7") == 7
    assert GPTConfig(residual_mode="mlp_learned").residual_mode == 3
    assert GPTConfig(residual_mode="attn_res").residual_mode == 6


@pytest.mark.parametrize("mode", ALL_MODES)
def test_optimizer_groups(mode):
    model = make_model(mode)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", mixing_lr_mult=10.0)
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["decay", "no_decay"] + (["mixing"] if mode in LEARNED else [])
    decay, no_decay = groups["decay"], groups["no_decay"]
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["lr"] == no_decay["lr"] == pytest.approx(1e-3)
    if mode in LEARNED:
        mixing = groups["mixing"]
        assert mixing["weight_decay"] == 0.0 and mixing["lr_mult"] == 10.0
        assert mixing["lr"] == pytest.approx(1e-2)
        assert [id(p) for p in mixing["params"]] == [id(p) for p in mixing_params(model).values()]
    if mode in (3, 4):
        logits = {id(b.layer_logits) for b in model.transformer.h if b.layer_logits is not None}
        assert {id(p) for p in groups["mixing"]["params"]} == logits
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each once (tied: once)


def test_flops_per_token_by_hand():
    model = GPT(tiny_config(0))
    C, H, V, L, T = 16, 24, 37, 4, 16
    per_layer = 3 * C * C + C * C + 2 * C * H
    assert model.flops_per_token() == 6 * (L * per_layer + V * C) + 12 * L * C * T
    assert model.estimate_mfu(1000.0, 1e9) == pytest.approx(1000.0 * model.flops_per_token() / 1e9)


# ------------------------------------------------------- mode 6's routing record

def test_routing_record_is_the_mean_of_the_weights():
    model = make_model(6)
    batches = [tokens((2, 9), 20), tokens((3, 5), 21)]
    model.record_routing()
    with torch.no_grad():
        for idx in batches:
            model(idx)
    n = 2 * 4 + 1
    assert model.routing_count.item() == 2 * 9 + 3 * 5
    by_hand = torch.zeros(n, n, dtype=torch.float64)
    for idx in batches:
        for k, w in enumerate(reference_attn_res(model, idx)[1]):  # (B, T, k+1)
            by_hand[k, :k + 1] += w.sum((0, 1))
    by_hand /= 2 * 9 + 3 * 5
    mean = model.routing_sums / model.routing_count
    assert (mean - by_hand).abs().max().item() < 1e-12
    assert torch.equal(mean, mean.tril())  # z_k sees s_0..s_k only
    assert (mean.sum(1) - 1).abs().max().item() < 1e-12
    assert mean.diagonal().min().item() > 0
    assert (mean.tril() - 1 / n).abs().max().item() > 0.05  # the queries matter: not uniform
    rows = model.mixing_weights()["rows"]
    assert [len(r) for r in rows] == list(range(1, n + 1))
    assert all(torch.allclose(r, mean[k, :k + 1].float()) for k, r in enumerate(rows))


def test_routing_record_only_when_asked_and_only_in_eval_without_grad():
    model = make_model(6)
    idx = tokens((2, 6), 22)
    model(idx)  # not recording: nothing allocated
    assert model.routing_sums is None and model.mixing_weights()["rows"] is None
    model.record_routing()
    model(idx)  # gradients on
    model.train()
    with torch.no_grad():
        model(idx)  # training mode
    assert model.routing_count.item() == 0 and torch.all(model.routing_sums == 0)
    model.eval()
    with torch.no_grad():
        model(idx)
        assert model.routing_count.item() == 12
        model.record_routing(False)
        model(idx)
    assert model.routing_count.item() == 12  # stopped, and still readable
    assert model.mixing_weights()["rows"] is not None
    model.record_routing()  # starting again starts from zero
    assert model.routing_count.item() == 0


def test_zero_queries_route_uniformly():
    model = make_model(6, random_mixing=False)
    model.record_routing()
    with torch.no_grad():
        model(tokens((2, 5), 23))
    for k, row in enumerate(model.mixing_weights()["rows"]):
        assert torch.allclose(row, torch.full((k + 1,), 1 / (k + 1)))


# ------------------------------------------------------- generation: the cache, across depth mixing

def sharp_model(mode):
    """Larger weights than the init: sharper, more varied predictions. Not the token embeddings:
    tied to the head, large ones make greedy decoding repeat the last token."""
    model = make_model(mode, n_layer=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wte" not in name:
                p.mul_(8.0)
    return model


@pytest.mark.parametrize("mode", ALL_MODES)
def test_cached_logits_equal_full_forward(mode):
    """Prefill 5 positions, then 2 at once (the masked path), then one at a time."""
    model = sharp_model(mode)
    idx = tokens((2, 12), 1)
    cache = [[] for _ in range(3)]
    chunks = [(0, 5), (5, 7)] + [(t, t + 1) for t in range(7, 12)]
    with torch.no_grad():
        full, _ = model(idx)
        cached = torch.cat([model(idx[:, a:b], kv_cache=cache)[0] for a, b in chunks], dim=1)
    assert cache[0][0].size(2) == 12
    assert (cached - full).abs().max().item() < 1e-10


@pytest.mark.parametrize("mode", ALL_MODES)
def test_greedy_with_cache_equals_without_past_block_size(mode):
    model = sharp_model(mode)
    prompt = tokens((2, 5), 2)
    cached = model.generate(prompt, 40, temperature=0, use_cache=True)  # 45 tokens > block_size 16
    uncached = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert cached.shape == (2, 45) and torch.equal(cached, uncached)
    assert len(set(cached[0, 5:].tolist())) > 4  # not one token repeated


# ------------------------------------------------------- precision and compilation

@pytest.mark.parametrize("mode", ALL_MODES)
def test_autocast_bf16_close_to_fp32(mode):
    torch.manual_seed(0)
    model = perturb_mixing(GPT(tiny_config(mode)).eval())
    idx = tokens((2, 12), 9)
    head_input = []  # what ln_f reads: the residual stream stays fp32 under autocast, in every mode
    model.transformer.ln_f.register_forward_pre_hook(lambda module, args: head_input.append(args[0].dtype))
    with torch.no_grad():
        ref, _ = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = model(idx)
    assert torch.allclose(low.float(), ref, atol=5e-2)
    assert head_input == [torch.float32, torch.float32]


@pytest.mark.parametrize("mode", ALL_MODES)
def test_compiled_loss_equals_eager(mode):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = perturb_mixing(GPT(tiny_config(mode, n_layer=3)))
    idx = tokens((2, 16), 10)
    targets = idx.roll(-1, dims=1)
    _, eager_loss = model(idx, targets)
    # the mixing must not break the graph; aot_eager traces forward and backward like inductor
    # does, without its C++ build (test_train.py's compiled run covers inductor)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _, compiled_loss = compiled(idx, targets)
    assert abs(compiled_loss.item() - eager_loss.item()) < 1e-4
    compiled_loss.backward()  # the compiled backward runs too
    assert all(p.grad is not None for p in model.parameters())


def test_compiled_routing_record_equals_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = perturb_mixing(GPT(tiny_config(6, n_layer=2))).eval()
    idx = tokens((2, 16), 12)
    sums = []
    for m in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        model.record_routing()
        with torch.no_grad():
            m(idx)
            m(idx)
        assert model.routing_count.item() == 64
        sums.append(model.routing_sums.clone())
    assert torch.allclose(sums[0], sums[1], atol=1e-4)


def test_mode7_gradients_equal_plain_autograd():
    """X0Mix recovers h from its output in backward: the gradients must be autograd's own."""
    model = make_model(7)
    idx = tokens((2, 10), 13)
    _, loss = model(idx, targets=idx.roll(-1, dims=1))
    grads = torch.autograd.grad(loss, list(model.parameters()))

    def plain_forward_blocks(x, kv_cache=None):  # mode 0's wiring, with the mix written out
        h_0 = x
        for block in model.transformer.h:
            lam, mu = block.x0_lambdas.unbind()
            x = lam * x + mu * h_0
            x = x + block.attn(block.ln_1(x))
            x = x + block.mlp(block.ln_2(x))
        return x
    model.forward_blocks = plain_forward_blocks
    _, plain_loss = model(idx, targets=idx.roll(-1, dims=1))
    plain = torch.autograd.grad(plain_loss, list(model.parameters()))
    assert abs(loss.item() - plain_loss.item()) < 1e-12
    for g, p in zip(grads, plain):
        assert (g - p).abs().max().item() < 1e-10 * max(1.0, p.abs().max().item())


@pytest.mark.parametrize("mode, base", [(3, 1), (4, 2)])
def test_current_logit_starts_between_the_mean_and_the_standard_residual(mode, base):
    """theta_m = c on block m's own state, 0 elsewhere: softmax weights e^c / (e^c + m) and 1 / (e^c + m);
    c = 0 is the mean (mode 1 or 2), and a large c the standard residual, mode 0."""
    c = 3.0
    model = make_model(mode, random_mixing=False, current_logit=c)
    for m, w in enumerate(model.mixing_weights()["rows"][1:], 1):
        expected = [1 / (math.exp(c) + m)] * m + [math.exp(c) / (math.exp(c) + m)]
        assert w.tolist() == pytest.approx(expected, rel=1e-6)
    idx = tokens((2, 9), 14)
    with torch.no_grad():
        near = make_model(mode, seed=5, random_mixing=False, current_logit=80.0)(idx)[0]
        assert (near - make_model(0, seed=5, random_mixing=False)(idx)[0]).abs().max().item() < 1e-12
        mean = make_model(mode, seed=5, random_mixing=False, current_logit=0.0)(idx)[0]
        assert (mean - make_model(base, seed=5, random_mixing=False)(idx)[0]).abs().max().item() < 1e-12
    with pytest.raises(ValueError, match="current_logit must be a finite number"):
        GPTConfig(current_logit=float("inf"))
