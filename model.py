"""
A GPT whose residual connections can reach back over earlier blocks.

The switch is `GPTConfig.residual_mode`, and all of its wiring lives in `GPT.forward_blocks` below.
With L blocks m = 0..L-1, h_0 = token + position embedding, h_m the input of block m:

  mode 0 standard     a_m = h_m + Attn(ln_1(h_m))               h_{m+1} = a_m + MLP(ln_2(a_m))
  mode 1 mlp_mean     a_m as mode 0                             h_{m+1} = mean(a_0..a_m) + MLP(ln_2(a_m))
  mode 2 attn_mean    a_m = mean(h_0..h_m) + Attn(ln_1(h_m))    h_{m+1} as mode 0
  mode 3 mlp_learned  a_m as mode 0                             h_{m+1} = sum_i w_{m,i} a_i + MLP(ln_2(a_m))
                      with w_m = softmax(theta_m), theta_m of length m+1, zero at init (= mode 1)

Otherwise this is nanoGPT's model: GPT-2 module names, tied embeddings, scaled init of the residual
projections, flash attention through scaled_dot_product_attention.
"""
import functools
import inspect
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

RESIDUAL_MODES = {"standard": 0, "mlp_mean": 1, "attn_mean": 2, "mlp_learned": 3}


def parse_residual_mode(value):
    """0..3 or a name from RESIDUAL_MODES -> int; anything else is a ValueError."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value in RESIDUAL_MODES.values():
        return value
    if isinstance(value, str) and value.strip() in RESIDUAL_MODES:
        return RESIDUAL_MODES[value.strip()]
    valid = ", ".join(f"{i} ({name})" for name, i in RESIDUAL_MODES.items())
    raise ValueError(f"unknown residual_mode {value!r}; valid values are {valid}")


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_hidden: int = None  # MLP width; None means 4 * n_embd (the original experiment used 2048 at 768)
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2
    residual_mode: int = 0  # see the module docstring; names from RESIDUAL_MODES work too

    def __post_init__(self):
        self.residual_mode = parse_residual_mode(self.residual_mode)
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
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
            mask = torch.ones(T, n_past + T, dtype=torch.bool, device=x.device).tril(diagonal=n_past)
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
    """The sublayers of block m. How they are wired into the residual stream is GPT.forward_blocks'."""

    def __init__(self, config, index):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        if config.residual_mode == 3 and index > 0:
            # theta_m: one logit per block 0..index. Zero at init, so softmax gives mode 1's uniform mean.
            # Block 0 has none: its only weight is 1.
            self.layer_logits = nn.Parameter(torch.zeros(index + 1))
        else:
            self.layer_logits = None


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, m) for m in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings
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
        start = kv_cache[0][0].size(2) if kv_cache and kv_cache[0] else 0  # positions already cached
        assert start + T <= self.config.block_size, f"{start + T} positions > block_size {self.config.block_size}"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # h_0: (B, T, C)
        x = self.forward_blocks(x, kv_cache)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def forward_blocks(self, x, kv_cache=None):
        """The residual stream through every block: this is where the residual modes differ.
        x: (B, T, C) = h_0. Returns h_L: (B, T, C)."""
        mode = self.config.residual_mode
        running_sum = 0.0  # modes 1 and 2: sum of the states so far, so the mean costs one add a block
        mlp_inputs = []  # mode 3: a_0..a_m. No copies: ln_2 keeps each of them alive for backward anyway
        for m, block in enumerate(self.transformer.h):
            cache = kv_cache[m] if kv_cache is not None else None
            # attention sublayer: x is h_m
            if mode == 2:  # a_m = mean(h_0..h_m) + Attn(ln_1(h_m))
                running_sum = running_sum + x
                x = running_sum / (m + 1) + block.attn(block.ln_1(x), cache)
            else:  # a_m = h_m + Attn(ln_1(h_m))
                x = x + block.attn(block.ln_1(x), cache)
            # MLP sublayer: x is a_m
            mlp_out = block.mlp(block.ln_2(x))
            if mode == 1:  # h_{m+1} = mean(a_0..a_m) + MLP(ln_2(a_m))
                running_sum = running_sum + x
                x = running_sum / (m + 1) + mlp_out
            elif mode == 3:  # h_{m+1} = sum_i w_{m,i} a_i + MLP(ln_2(a_m))
                mlp_inputs.append(x)
                x = self.weighted_sum(block, mlp_inputs) + mlp_out
            else:  # h_{m+1} = a_m + MLP(ln_2(a_m))
                x = x + mlp_out
        return x

    @staticmethod
    def weighted_sum(block, states):
        """sum_i softmax(theta_m)_i * states[i], one scaled add at a time: stacking the states would
        materialise an (m+1, B, T, C) tensor per block, and keep it for backward."""
        if block.layer_logits is None:  # block 0: its only weight is 1
            return states[0]
        w = torch.softmax(block.layer_logits, dim=0).unbind()  # m+1 scalars
        total = w[0] * states[0]
        for w_i, state in zip(w[1:], states[1:]):
            total = torch.addcmul(total, w_i, state)  # total + w_i * state in one op, no temporary
        return total

    def layer_logits(self):
        """The raw theta_m of every block (the Parameters themselves), None where a block has none."""
        return [block.layer_logits for block in self.transformer.h]

    @torch.no_grad()
    def layer_weights(self):
        """The normalised weights softmax(theta_m) of every block as 1-D float tensors, None where a
        block has no learnable weights."""
        return [None if t is None else torch.softmax(t.float(), dim=0).cpu() for t in self.layer_logits()]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, layer_weight_lr_mult=1.0):
        """AdamW with weight decay on the >= 2-D weights only (matmuls, embeddings). The layer-weight
        logits get no decay, since decay pulls mode 3 back towards mode 1, and their own learning-rate
        multiplier. Each group carries 'lr_mult': the training loop sets lr = base lr * lr_mult."""
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        logits = [p for name, p in params.items() if name.endswith("layer_logits")]
        decay = [p for name, p in params.items() if p.dim() >= 2]
        no_decay = [p for name, p in params.items() if p.dim() < 2 and not name.endswith("layer_logits")]
        groups = [
            {"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
        ]
        if logits:
            groups.append({"params": logits, "weight_decay": 0.0, "lr_mult": layer_weight_lr_mult})
        for g in groups:
            g["lr"] = learning_rate * g["lr_mult"]
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, seq_len=None):
        """Forward + backward FLOPs per trained token: 6 per matmul weight (2 forward, 4 backward)
        plus attention's QK^T and AV, 12 * L * C * T, counted over the full context as in PaLM's
        appendix B. The residual mixing is O(L * C) per token and left out."""
        cfg = self.config
        T = seq_len or cfg.block_size
        matmul_weights = sum(p.numel() for name, p in self.named_parameters()
                             if p.dim() == 2 and "wpe" not in name)  # lm_head counted once (tied with wte)
        return 6 * matmul_weights + 12 * cfg.n_layer * cfg.n_embd * T

    def estimate_mfu(self, tokens_per_second, peak_flops, seq_len=None):
        """Model FLOPs utilisation: achieved FLOP/s over the peak FLOP/s passed in."""
        return tokens_per_second * self.flops_per_token(seq_len) / peak_flops

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_cache=True, generator=None, vocab_size=None):
        """Yields each new token, (B, 1), as soon as it is sampled. idx: (B, T) prompt.
        vocab_size: sample only ids below it (the tokenizer's vocabulary; the embedding table is padded).
        temperature 0 is greedy. With use_cache, every step feeds only the newest token and reuses the
        keys and values of earlier ones (valid in every mode: the mixing runs across depth at one position).
        Past block_size the context window slides: when it is full, its older half is dropped and the
        rest is run again from position 0 (the position embeddings are absolute, so the cache cannot be
        kept). Without the cache the same window is recomputed every step, so both paths agree exactly."""
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
            next_token = sample_next(logits[:, -1, :vocab_size], temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat((idx, next_token), dim=1)
            yield next_token

    def generate(self, idx, max_new_tokens, **kwargs):
        """(B, T) prompt -> (B, T + max_new_tokens); keyword arguments as generate_stream."""
        new = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + new, dim=1)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits: (B, V) -> (B, 1) token ids: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the first token always
        logits = logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# -----------------------------------------------------------------------------
# Peak FLOP/s for MFU

# Dense bf16/fp16 tensor-core peaks, FLOP/s, matched against torch.cuda.get_device_name(). fp32 runs
# use TF32, which is half of that on these parts.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "A10": 125e12, "L40S": 362e12,
    "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12,
}


@functools.lru_cache(maxsize=None)
def measure_cpu_matmul_flops(dtype=torch.float32, n=1024, repeats=5):
    """This CPU's matmul peak in FLOP/s: the best of a few square matmuls at the current thread count."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best


def peak_flops(device, dtype):
    """The peak to measure MFU against: a table for common GPUs, a measurement on CPU, else None."""
    device = torch.device(device)
    if device.type == "cpu":
        return measure_cpu_matmul_flops(dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops if dtype in (torch.bfloat16, torch.float16) else flops / 2
    return None
