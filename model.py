"""
A GPT whose residual connections can reach back over earlier blocks.

The switch is `GPTConfig.residual_mode`; all of its wiring lives in `GPT.forward_blocks` below
(mode 6's in the one helper it calls, `GPT.attention_residuals`). With L blocks m = 0..L-1,
h_0 = token + position embedding, h_m the input of block m, a_m the input of its MLP sublayer:

  mode 0 standard     a_m = h_m + Attn(ln_1(h_m))              h_{m+1} = a_m + MLP(ln_2(a_m))
  mode 1 mlp_mean     a_m as mode 0                   h_{m+1} = mean(a_0..a_m) + MLP(ln_2(a_m))
  mode 2 attn_mean    a_m = mean(h_0..h_m) + Attn(ln_1(h_m))   h_{m+1} as mode 0
  mode 3 mlp_learned  a_m as mode 0                   h_{m+1} = sum_i w_{m,i} a_i + MLP(ln_2(a_m))
                      w_m = softmax(theta_m), theta_m of length m+1, zero at init (= mode 1), or
                      current_logit on i = m (large: near mode 0)
  mode 4 attn_learned a_m = sum_i u_{m,i} h_i + Attn(ln_1(h_m))   h_{m+1} as mode 0
                      u_m = softmax(phi_m), phi_m of length m+1, as theta_m at init (= mode 2)
  mode 5 dwa          DenseFormer (Pagliardini et al. 2024): y_{m+1} = a + MLP(ln_2(a)) with
                      a = x_m + Attn(ln_1(x_m)), then x_{m+1} = sum_{j<=m+1} alpha_{m,j} y_j, with
                      y_0 = x_0 = h_0; the head reads x_L. alpha_m one-hot on j = m+1 (= mode 0)
  mode 6 attn_res     Attention Residuals (Kimi team 2026), no residual sum: sublayer k = 2m is
                      block m's f_k = Attn(ln_1(.)), k = 2m+1 its MLP(ln_2(.)). Sources s_0 = h_0,
                      s_{k+1} = f_k(z_k); sublayer k (k = 2L: the head) reads, per position,
                      z_k = sum_{i<=k} softmax_i(q_k . r(s_i)) s_i, r(v) = v / sqrt(mean(v^2)+1e-6);
                      q_k = 0 at init: z_k = mean(s_0..s_k)
  mode 7 x0_mix       h_m <- lambda_m h_m + mu_m h_0 at the entry of every block, then mode 0
                      (modded-nanogpt's x0 lambdas); (lambda_m, mu_m) = (1, 0) at init (= mode 0)
  modes 8, 9          n = hc_streams residual streams H (B, T, n, C), n copies of h_0 at first.
                      Sublayer k reads x_k = sum_i r_i H_i; H'_i = sum_j M_ij H_j + w_i f_k(x_k);
                      the head reads ln_f(mean_i H_i) (the papers sum: the mean makes init exact)
  mode 8 hyper        Hyper-Connections (Zhu et al. 2025), dynamic: with Hn = LayerNorm(H) (no
                      gain), r = A_m + s_a tanh(Hn W_m), M^T = A_r + s_a tanh(Hn W_r),
                      w = B + s_b tanh(Hn W_b); A_m one-hot on stream k mod n, A_r = I, B = 1,
                      W = 0, s = 0.01 at init (= mode 0 exactly). Unlike the paper: W gets no
                      weight decay, and the output projections no sqrt(n) init scaling
  mode 9 mhc          manifold-constrained HC (DeepSeek 2025): with v = RMSNorm(vec H) (no gain),
                      r = sigmoid(a_pre v P_pre + b_pre), w = 2 sigmoid(a_post v P_post + b_post),
                      M = SK(exp(a_res v P_res + b_res)), SK: mhc_iters column-then-row
                      normalisations (doubly stochastic); P = 0, b = 0 but b_pre = +-1 (+1 on
                      stream k mod n: b = 0 keeps the streams equal for ever) and b_res =
                      current_logit I (0: M = 1/n; large: M near I), a = 0.01 at init: w = 1,
                      every stream h + f(c h) (= mode 0 but for LayerNorm's eps), any current_logit

MODES, below, holds what the rest of the code knows of each mode: its name, its mixing parameters
(one optimizer group, no weight decay: configure_optimizers) and the labels of its reports
(mixing_weights). Otherwise nanoGPT's model: GPT-2 module names, tied embeddings, scaled init of
the residual projections, flash attention (scaled_dot_product_attention).
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

@dataclass(frozen=True)
class Mode:
    """What the code outside GPT.forward_blocks (reports, compare.py, bench.py, the tests) knows of
    a residual mode."""
    name: str  # a config file may say residual_mode = "mlp_learned" instead of 3
    params: tuple = ()  # its mixing parameters (Block's or GPT's attribute names), None elsewhere
    mixing: str = None  # what one row of its learned mixing holds, for reports; None: no mixing
    column: str = None  # what a column of its heatmap is
    row: str = "block"  # what a row is: "block" m, "z" for a sublayer input z_k, or "sublayer" k


MODES = (  # residual_mode -> Mode; the wiring of each is in GPT.forward_blocks
    Mode("standard"),
    Mode("mlp_mean"),
    Mode("attn_mean"),
    Mode("mlp_learned", ("layer_logits",), "layer weights, softmax(theta_m) over blocks 0..m "
         "(block 0 has none)", "block i whose a_i is mixed in"),
    Mode("attn_learned", ("layer_logits",), "layer weights, softmax(phi_m) over blocks 0..m "
         "(block 0 has none)", "block i whose h_i is mixed in"),
    Mode("dwa", ("dwa_weights",), "DWA weights alpha_m over y_0..y_{m+1}",
         "y_j (y_0 = h_0, y_{m+1}: block m's output)"),
    Mode("attn_res", ("attn_query", "mlp_query", "final_query"), "routing weights of z_k over "
         "s_0..s_k, mean over the eval windows", "source s_i (s_0 = h_0)", row="z"),
    Mode("x0_mix", ("x0_lambdas",), "(lambda_m, mu_m): h_m <- lambda_m h_m + mu_m h_0",
         "lambda_m, mu_m"),
    Mode("hyper", ("hc_static", "hc_dynamic", "hc_scales"), "A_r of sublayer k, mean over the "
         "eval windows (raw: its static part)", "A_r[i, j], row-major", row="sublayer"),
    Mode("mhc", ("mhc_proj", "mhc_bias", "mhc_alpha"), "H_res of sublayer k, mean over the eval "
         "windows (raw: SK(exp(b_res)), its static part)", "H_res[i, j], row-major",
         row="sublayer"),
)
MIXING_PARAMS = {p for mode in MODES for p in mode.params}  # one optimizer group, no decay


def parse_residual_mode(value):
    """A mode's number or its name from MODES -> int; anything else is a ValueError."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(MODES):
        return value
    names = [mode.name for mode in MODES]
    if isinstance(value, str) and value.strip() in names:
        return names.index(value.strip())
    valid = ", ".join(f"{i} ({name})" for i, name in enumerate(names))
    raise ValueError(f"unknown residual_mode {value!r}; valid values are {valid}")


def optional_param(on, value):
    return nn.Parameter(value) if on else None


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_hidden: int = 0  # MLP width; 0: 4 * n_embd (the original experiment: 2048 at 768)
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2
    norm_eps: float = 1e-5  # LayerNorm's eps (torch's default); it matters where a sublayer's
    # input is small, as mode 6's mean over 2L+1 sources is at GPT-2's 0.02 init
    residual_mode: int = 0  # see the module docstring; names from MODES work too
    hc_streams: int = 4  # modes 8, 9: n, the number of residual streams
    mhc_iters: int = 20  # mode 9: Sinkhorn-Knopp iterations
    current_logit: float = 0.0  # modes 3, 4: theta_m, phi_m start at this on block m's own state,
    # 0 elsewhere. 0: uniform, the mode starts as mode 1 or 2; large: near the standard residual.
    # Mode 9: b_res's diagonal (each stream's own logit); large: H_res near I, as HC's A_r

    def __post_init__(self):
        self.residual_mode = parse_residual_mode(self.residual_mode)
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd
        if self.hc_streams < 1 or self.mhc_iters < 1:
            raise ValueError(f"hc_streams and mhc_iters must be at least 1, got {self.hc_streams} "
                             f"and {self.mhc_iters}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be a number above 0, got {self.norm_eps}")
        if not math.isfinite(self.current_logit):
            raise ValueError(f"current_logit must be a finite number, got {self.current_logit}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        """x: (B, T, C) normed input. cache: None, or this block's list [k, v] of earlier positions
        (empty before the first call), which is extended in place for generation."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            if cache:  # prepend the keys and values of the positions seen before
                k = torch.cat([cache[0], k], dim=2)  # (B, nh, P+T, hs)
                v = torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        n_past = k.size(2) - T
        dropout_p = self.dropout if self.training else 0.0
        if n_past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:  # one new position sees every cached one: no mask to build
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:  # new position t may see every cached position and the new ones up to t
            mask = torch.ones(T, n_past + T, dtype=torch.bool, device=x.device).tril(n_past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C), heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """The sublayers of block m. No forward here: how they are wired into the residual stream, in
    every mode, is GPT.forward_blocks below."""

    def __init__(self, config, index):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, config.norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, config.norm_eps, bias=config.bias)
        self.mlp = MLP(config)
        # the mixing parameters, None outside their mode; at init each mode is the one it extends
        mode, C = config.residual_mode, config.n_embd
        # theta_m (mode 3) or phi_m (mode 4) over blocks 0..m; none in block 0: its only weight is 1
        own = torch.arange(index + 1).eq(index).float()  # block m's own state, a_m or h_m
        self.layer_logits = optional_param(mode in (3, 4) and index > 0, config.current_logit * own)
        # alpha_m over y_0..y_{m+1}, one-hot on y_{m+1}: x_{m+1} = y_{m+1}, the standard residual
        self.dwa_weights = optional_param(mode == 5, torch.arange(index + 2).eq(index + 1).float())
        # q_{2m} and q_{2m+1}; q_0 is inert (z_0 has the one source h_0), kept: one query per z_k
        self.attn_query = optional_param(mode == 6, torch.zeros(C))
        self.mlp_query = optional_param(mode == 6, torch.zeros(C))
        self.x0_lambdas = optional_param(mode == 7, torch.tensor([1.0, 0.0]))  # (lambda_m, mu_m)
        # modes 8, 9: one set per sublayer, [0] attention, [1] MLP. Mode 8's static [A_m | A_r | B]
        # (n, n + 2), its W_m | W_r | W_b (C, n + 2), and (s_a, s_b)
        n = config.hc_streams
        a_m = torch.eye(n)[[2 * index % n, (2 * index + 1) % n]]  # (2, n), one-hot on k mod n
        static = torch.cat([a_m[:, :, None], torch.eye(n).expand(2, n, n), torch.ones(2, n, 1)], 2)
        self.hc_static = optional_param(mode == 8, static)
        self.hc_dynamic = optional_param(mode == 8, torch.zeros(2, C, n + 2))
        self.hc_scales = optional_param(mode == 8, torch.full((2, 2), 0.01))
        # mode 9's P_pre | P_post | P_res (n C, 2n + n^2), b likewise, (a_pre, a_post, a_res). b_pre
        # is 1 on stream k mod n and -1 elsewhere, after A_m: b = 0 keeps the streams equal for ever
        self.mhc_proj = optional_param(mode == 9, torch.zeros(2, n * C, 2 * n + n * n))
        b_res = config.current_logit * torch.eye(n).flatten().expand(2, -1)  # 0: H_res = 1/n
        bias = torch.cat([2 * a_m - 1, torch.zeros(2, n), b_res], 1)  # b_pre = +-1, b_post = 0
        self.mhc_bias = optional_param(mode == 9, bias)
        self.mhc_alpha = optional_param(mode == 9, torch.full((2, 3), 0.01))


class X0Mix(torch.autograd.Function):
    """Mode 7's lambda * h + mu * h_0, lambda_mu = (lambda, mu). Autograd's own products keep h for
    lambda's gradient: one more (B, T, C) tensor a block, compiled too. This keeps the output, which
    ln_1 needs anyway, and takes sum(g * h) as (sum(g * out) - mu * sum(g * h_0)) / lambda."""

    @staticmethod
    def forward(ctx, h, h_0, lambda_mu):
        out = lambda_mu[0] * h + lambda_mu[1] * h_0
        ctx.save_for_backward(out, h_0, lambda_mu)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, h_0, lambda_mu = ctx.saved_tensors
        lam, mu = lambda_mu.unbind()
        grad_mu = (grad * h_0).sum()
        grad_lam = ((grad * out).sum() - mu * grad_mu) / lam
        return lam * grad, mu * grad, torch.stack([grad_lam, grad_mu]).to(lambda_mu.dtype)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config, self.mode = config, MODES[config.residual_mode]  # mode: its row in MODES
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, m) for m in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, config.norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings
        self.final_query = optional_param(config.residual_mode == 6, torch.zeros(config.n_embd))
        # mode 6: final_query is the head's q_{2L}. Its routing record (record_routing) is kept in
        # plain tensors, not buffers: DDP would broadcast rank 0's buffers over the other ranks'.
        self.recording_routing, self.routing_sums, self.routing_count = False, None, None
        self.apply(self._init_weights)
        # GPT-2's scaled init: every block adds two projections to the residual stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count; position embeddings are left out by default, token embeddings count
        once because they are tied to lm_head."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, kv_cache=None):
        """idx, targets: (B, T) token ids (targets -1 are ignored). kv_cache: None, or one list per
        block for generation (see generate). Returns logits (B, T, vocab) for every position and the
        mean cross-entropy loss, or None without targets."""
        B, T = idx.size()
        start = kv_cache[0][0].size(2) if kv_cache and kv_cache[0] else 0  # positions cached
        assert start + T <= self.config.block_size, f"{start + T} positions > block_size"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # h_0
        x = self.forward_blocks(x, kv_cache)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def forward_blocks(self, x, kv_cache=None):
        """The residual stream through every block: this is where the residual modes differ.
        x: (B, T, C) = h_0. Returns what ln_f reads: h_L (x_L in mode 5, z_{2L} in mode 6)."""
        mode = self.config.residual_mode
        if mode == 6:  # no residual sum at all: every sublayer input is routed
            return self.attention_residuals(x, kv_cache)
        if mode in (8, 9):  # n residual streams
            return self.hyper_connections(x, kv_cache)
        h_0, running_sum = x, 0.0  # modes 1 and 2: the sum of the states so far, one add a block
        # mode 3: a_0..a_m; mode 4: h_0..h_m; mode 5: y_0..y_{m+1}. No copies: ln_1 or ln_2 keeps
        # each alive for backward anyway (but mode 5's y_{m+1}: alpha's gradient needs it)
        states = [x] if mode == 5 else []
        for m, block in enumerate(self.transformer.h):
            cache = kv_cache[m] if kv_cache is not None else None
            if mode == 7:  # h_m <- lambda_m h_m + mu_m h_0; block 0: h_0 <- (lambda_0 + mu_0) h_0
                x = X0Mix.apply(x, h_0, block.x0_lambdas) if m else block.x0_lambdas.sum() * x
            # attention sublayer: x is h_m
            if mode == 2:  # a_m = mean(h_0..h_m) + Attn(ln_1(h_m))
                running_sum = running_sum + x
                x = running_sum / (m + 1) + block.attn(block.ln_1(x), cache)
            elif mode == 4:  # a_m = sum_i softmax(phi_m)_i h_i + Attn(ln_1(h_m))
                states.append(x)
                attn_out = block.attn(block.ln_1(x), cache)
                x = self.weighted_sum(block.layer_logits, states, softmax=True) + attn_out
            else:  # a_m = h_m + Attn(ln_1(h_m))
                x = x + block.attn(block.ln_1(x), cache)
            # MLP sublayer: x is a_m
            mlp_out = block.mlp(block.ln_2(x))
            if mode == 1:  # h_{m+1} = mean(a_0..a_m) + MLP(ln_2(a_m))
                running_sum = running_sum + x
                x = running_sum / (m + 1) + mlp_out
            elif mode == 3:  # h_{m+1} = sum_i softmax(theta_m)_i a_i + MLP(ln_2(a_m))
                states.append(x)
                x = self.weighted_sum(block.layer_logits, states, softmax=True) + mlp_out
            elif mode == 5:  # y_{m+1} = a_m + MLP(ln_2(a_m)), x_{m+1} = sum_j alpha_{m,j} y_j
                states.append(x + mlp_out)
                x = self.weighted_sum(block.dwa_weights, states)
            else:  # h_{m+1} = a_m + MLP(ln_2(a_m))
                x = x + mlp_out
        return x

    def attention_residuals(self, x, kv_cache=None):
        """Mode 6, x: (B, T, C) = h_0 -> z_{2L}. Each source s_i is scored against all 2L+1 queries
        once, as it arrives, as (s_i Q^T) / rms(s_i): that matmul saves only s_i for backward, which
        the weighted sums keep anyway, where r(s_i) would be a second copy."""
        blocks, n = self.transformer.h, 2 * self.config.n_layer
        queries = torch.stack([q for b in blocks for q in (b.attn_query, b.mlp_query)]
                              + [self.final_query])  # q_0..q_{2L}: (2L+1, C)
        record = self.recording_routing and not self.training and not torch.is_grad_enabled()
        if record:
            self.routing_count += x.size(0) * x.size(1)
        sources, scores, s = [], [], x  # s_0..s_k, and q_j . r(s_i) for every j: (B, T, 2L+1) each
        for k in range(n + 1):
            sources.append(s)
            scores.append((s @ queries.T) * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))
            w = torch.softmax(torch.stack([sc[..., k] for sc in scores], -1), -1)  # (B, T, k+1)
            if record:
                self.routing_sums[k, :k + 1] += w.sum((0, 1)).to(self.routing_sums.dtype)
            z = self.weighted_sum(w, sources)  # z_k
            if k < n:
                block = blocks[k // 2]
                if k % 2 == 0:  # block m's attention
                    cache = kv_cache[k // 2] if kv_cache is not None else None
                    s = block.attn(block.ln_1(z), cache)
                else:  # its MLP
                    s = block.mlp(block.ln_2(z))
        return z

    def hyper_connections(self, x, kv_cache=None):
        """Modes 8 and 9, x: (B, T, C) = h_0 -> mean_i H_i. Backward keeps H (B, T, n, C) once a
        block, at its entry: the reads (maps, x_k, its LayerNorm) and the stream between the two
        sublayers are recomputed from it in backward (checkpoint), which costs little next to the
        sublayers and keeps neither x_k nor a second H."""
        n = self.config.hc_streams
        H = x.unsqueeze(-2).expand(*x.shape[:-1], n, x.size(-1))  # (B, T, n, C), n copies
        # without gradients (eval, generation) nothing is kept: a checkpoint would only cost ~25 us
        run = checkpoint if torch.is_grad_enabled() else lambda f, *args, use_reentrant: f(*args)
        record = self.recording_routing and not self.training and not torch.is_grad_enabled()
        if record:
            self.routing_count += x.size(0) * x.size(1)
        for m, block in enumerate(self.transformer.h):
            cache = kv_cache[m] if kv_cache is not None else None
            x, M_a, w_a = run(self.hyper_read, H, 2 * m, record, use_reentrant=False)
            y_a = block.attn(x, cache)  # (B, T, C)
            attn_write = (M_a, w_a, y_a)  # H_{2m+1} = M_a H + w_a y_a, rebuilt where it is read
            x, M_m, w_m = run(self.hyper_read, H, 2 * m + 1, record, *attn_write,
                              use_reentrant=False)
            y_m = block.mlp(x)
            H = run(hyper_write, H, *attn_write, M_m, w_m, y_m, use_reentrant=False)
        return H.mean(-2)

    def hyper_read(self, H, k, record, *earlier):
        """Sublayer k's normed input ln(x_k), x_k = sum_i r_i H_i, and its (M, w); `earlier`: the
        (M, w, y) that turn H into sublayer k's own stream first."""
        H = hyper_write(H, *earlier)
        block, mode = self.transformer.h[k // 2], self.config.residual_mode
        r, M, w = self.stream_maps(H, k)
        if record:  # A_r = M^T (mode 8), H_res = M (mode 9): (n, n) summed over positions
            self.routing_sums[k] += (M.mT if mode == 8 else M).sum((0, 1)).flatten()
        with torch.autocast(H.device.type, enabled=False):  # fp32, as mode 0's ln input
            x = (r.to(H.dtype).unsqueeze(-2) @ H).squeeze(-2)  # (B, T, C)
        return (block.ln_1 if k % 2 == 0 else block.ln_2)(x), M, w

    def stream_maps(self, H, k):
        """Sublayer k's (r, M, w) from the streams H, with its own parameters (modes 8, 9)."""
        maps = self.hyper_maps if self.config.residual_mode == 8 else self.mhc_maps
        return maps(H, *(getattr(self.transformer.h[k // 2], p)[k % 2] for p in self.mode.params))

    def hyper_maps(self, H, static, W, scales):
        """Mode 8: (r, M, w) = (A_m(H), A_r(H)^T, B(H)), (B, T, n), (B, T, n, n), (B, T, n).
        static: [A_m | A_r | B] (n, n + 2); W: [W_m | W_r | W_b] (C, n + 2); scales: (s_a, s_b)."""
        n = H.size(-2)
        d = torch.tanh(F.layer_norm(H, H.shape[-1:], eps=self.config.norm_eps) @ W)  # (B,T,n,n+2)
        r = static[:, 0] + scales[0] * d[..., 0]  # (B, T, n): stream i's weight, from H_i
        A_r = static[:, 1:n + 1] + scales[0] * d[..., 1:n + 1]  # (B, T, n, n): row i from H_i
        return r, A_r.mT, static[:, n + 1] + scales[1] * d[..., n + 1]

    def mhc_maps(self, H, proj, bias, alpha):
        """Mode 9: (r, M, w) = (H_pre, H_res, H_post), (B, T, n), (B, T, n, n), (B, T, n).
        proj: [P_pre | P_post | P_res] (n C, 2n + n^2); bias likewise; alpha: the three a's."""
        n, flat = H.size(-2), H.flatten(-2)  # (B, T, n C)
        v_proj = F.rms_norm(flat, flat.shape[-1:], eps=1e-6) @ proj  # (B, T, 2n + n^2)
        logits = v_proj * alpha[[0] * n + [1] * n + [2] * n * n] + bias
        M = sinkhorn(logits[..., 2 * n:].to(H.dtype).unflatten(-1, (n, n)), self.config.mhc_iters)
        return torch.sigmoid(logits[..., :n]), M, 2 * torch.sigmoid(logits[..., n:2 * n])

    @staticmethod
    def weighted_sum(weights, states, softmax=False):
        """sum_i weights[..., i] * states[i], weights (n,), or (B, T, n) per position, softmax-ed
        first if asked; None is the single weight 1. One scaled add at a time: stacking the states
        would materialise an (n, B, T, C) tensor, and keep it for backward."""
        if weights is None:
            return states[0]
        weights = torch.softmax(weights, dim=-1) if softmax else weights
        w = weights.unsqueeze(-1).unbind(-2)  # n weights, each (1,) or (B, T, 1): broadcasts over C
        total = w[0] * states[0]
        for w_i, state in zip(w[1:], states[1:]):
            total = torch.addcmul(total, w_i, state)  # total + w_i * state in one op, no temporary
        return total

    def record_routing(self, on=True):
        """Modes 6, 8, 9: while on, each forward in eval mode without gradients adds its routing
        weights to routing_sums (mode 6: (2L+1, 2L+1), row k z_k's weights over s_0..s_k; modes 8,
        9: (2L, n^2), row k sublayer k's A_r or H_res) and its positions to routing_count;
        mixing_weights() averages them. Turning it on starts from zero; training never records, nor
        does any other mode. Under DDP each rank holds its own sums: all_reduce both first."""
        cfg, like = self.config, self.lm_head.weight
        self.recording_routing = on and cfg.residual_mode in (6, 8, 9)
        if self.recording_routing:
            shape = (2 * cfg.n_layer + 1,) * 2 if cfg.residual_mode == 6 else (
                2 * cfg.n_layer, cfg.hc_streams ** 2)  # modes 8, 9: sublayer k's matrix, flat
            self.routing_sums = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.routing_count = torch.zeros((), dtype=like.dtype, device=like.device)

    @torch.no_grad()
    def mixing_weights(self):
        """The learned residual mixing for reports: None in modes 0-2, else {"rows", "raw"}, lists
        of 1-D float CPU tensors (None where there is nothing); rows[r] is row r of a heatmap.
        Modes 3, 4: rows[m] = softmax(theta_m) over a_0..a_m / softmax(phi_m) over h_0..h_m,
        raw[m] the logits (None for block 0). Mode 5: rows[m] = raw[m] = alpha_m over y_0..y_{m+1}.
        Mode 7: rows[m] = raw[m] = (lambda_m, mu_m). Mode 6: rows[k] = z_k's routing weights over
        s_0..s_k averaged over the recorded positions (record_routing; row 2L: the head), else
        None; raw[k] = q_k. Modes 8, 9: rows[k] = sublayer k's A_r / H_res, flat, averaged likewise;
        raw[k] its static part, A_r / SK(exp(b_res))."""
        mode, blocks = self.config.residual_mode, self.transformer.h

        def cpu(t):
            return None if t is None else t.detach().float().cpu()
        if mode in (3, 4):
            raw = [cpu(b.layer_logits) for b in blocks]
            return {"rows": [None if t is None else t.softmax(0) for t in raw], "raw": raw}
        if mode in (5, 7):
            raw = [cpu(b.dwa_weights if mode == 5 else b.x0_lambdas) for b in blocks]
            return {"rows": raw, "raw": raw}
        if not self.mode.params:  # modes 0-2
            return None
        count = 0 if self.routing_count is None else self.routing_count.item()
        mean = cpu(self.routing_sums / count) if count else None
        if mode == 6:
            rows = None if mean is None else [row[:k + 1] for k, row in enumerate(mean)]
            raw = [q for b in blocks for q in (b.attn_query, b.mlp_query)] + [self.final_query]
        else:  # modes 8, 9
            n = self.config.hc_streams
            rows = None if mean is None else list(mean)
            raw = [b.hc_static[j][:, 1:n + 1] if mode == 8 else
                   sinkhorn(b.mhc_bias[j][2 * n:].view(n, n), self.config.mhc_iters)
                   for b in blocks for j in (0, 1)]
        return {"rows": rows, "raw": [cpu(t).flatten() for t in raw]}

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type,
                             mixing_lr_mult=1.0):
        """AdamW with weight decay on the >= 2-D weights only (matmuls, embeddings). Every mixing
        parameter (MIXING_PARAMS) goes in one group, "mixing", without decay (it would pull them to
        zero, away from the mode each starts as) and with its own learning-rate multiplier. Each
        group has a 'name' and 'lr_mult': the training loop sets lr = base lr * lr_mult."""
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        mixing = [name for name in params if name.rsplit(".", 1)[-1] in MIXING_PARAMS]
        rest = [p for name, p in params.items() if name not in mixing]
        groups = [("decay", [p for p in rest if p.dim() >= 2], weight_decay, 1.0),
                  ("no_decay", [p for p in rest if p.dim() < 2], 0.0, 1.0),
                  ("mixing", [params[name] for name in mixing], 0.0, mixing_lr_mult)]
        groups = [dict(name=name, params=ps, weight_decay=wd, lr_mult=mult, lr=learning_rate * mult)
                  for name, ps, wd, mult in groups if ps or name != "mixing"]  # no empty "mixing"
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if fused and device_type in ("cuda", "cpu") else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def flops_per_token(self, seq_len=None):
        """Forward + backward FLOPs per trained token: 6 per matmul weight (2 forward, 4 backward)
        plus attention's QK^T and AV, 12 * L * C * T, counted over the full context as in PaLM's
        appendix B. The residual mixing is O(L * C) per token and left out."""
        cfg = self.config
        T = seq_len or cfg.block_size
        matmul_weights = sum(p.numel() for name, p in self.named_parameters()  # lm_head once (tied)
                             if p.dim() == 2 and "wpe" not in name)
        return 6 * matmul_weights + 12 * cfg.n_layer * cfg.n_embd * T

    def estimate_mfu(self, tokens_per_second, peak_flops, seq_len=None):
        """Model FLOPs utilisation: achieved FLOP/s over the peak FLOP/s passed in."""
        return tokens_per_second * self.flops_per_token(seq_len) / peak_flops

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_cache=True, generator=None, vocab_size=None):
        """Yields each new token, (B, 1), as soon as it is sampled. idx: (B, T) prompt.
        vocab_size: sample only ids below it (the tokenizer's vocabulary; the embedding table is
        padded). temperature 0 is greedy. With use_cache, every step feeds only the newest token
        and reuses the keys and values of earlier ones (valid in every mode: the mixing runs across
        depth at one position). Past block_size the context window slides: when it is full, its
        older half is dropped and the rest is run again from position 0 (the position embeddings
        are absolute, so the cache cannot be kept). Without the cache the same window is recomputed
        every step, so both paths agree exactly."""
        block_size = self.config.block_size
        start = max(0, idx.size(1) - block_size)  # the context window is idx[:, start:]
        kv_cache = None
        for _ in range(max_new_tokens):
            if idx.size(1) - start > block_size:  # window full: slide, keeping the newest half
                start = idx.size(1) - block_size // 2
                kv_cache = None
            if use_cache and kv_cache is not None:
                logits, _ = self(idx[:, -1:], kv_cache=kv_cache)  # only the newest position
            else:
                kv_cache = [[] for _ in self.transformer.h] if use_cache else None
                logits, _ = self(idx[:, start:], kv_cache=kv_cache)  # the whole window (prefill)
            next_token = sample_next(logits[:, -1, :vocab_size], temperature, top_k, top_p,
                                     generator)
            idx = torch.cat((idx, next_token), dim=1)
            yield next_token

    def generate(self, idx, max_new_tokens, **kwargs):
        """(B, T) prompt -> (B, T + max_new_tokens); keyword arguments as generate_stream."""
        new = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + new, dim=1)


def hyper_write(H, *writes):
    """Modes 8, 9: the streams after each sublayer's (M, w, y) in turn, (B, T, n, C):
    H'_i = sum_j M_ij H_j + w_i y. Outside autocast: the streams stay fp32, as mode 0's sum does."""
    with torch.autocast(H.device.type, enabled=False):
        for M, w, y in zip(writes[::3], writes[1::3], writes[2::3]):
            H = M.to(H.dtype) @ H + w.unsqueeze(-1) * y.unsqueeze(-2)
    return H


def sinkhorn(logits, iters):
    """(..., n, n) logits -> SK(exp(logits)): `iters` column-then-row normalisations, as mHC: rows
    sum to 1 (each new stream is a convex mix of the old) and columns nearly. Each column's max
    comes off first: its scale cancels in the first normalisation, and exp cannot overflow."""
    M = (logits - logits.amax(-2, keepdim=True)).exp()
    for _ in range(iters):
        M = M / M.sum(-2, keepdim=True)
        M = M / M.sum(-1, keepdim=True)
    return M


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits: (B, V) -> (B, 1) ids: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # the first one stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
