# Overlay: turns any method config into a CPU run that visibly learns in about 5 minutes on 2 cores.
#   python train.py configs/method3.py configs/cpu.py
# Put it after the method config: it keeps that config's residual_mode and only shrinks the run.
# The model has the original's depth, 12 blocks, since depth is what the residual modes act on, and
# its shape ratios (MLP = 8/3 * n_embd, like 2048 at 768), made narrow to keep the cost per token of
# the earlier 6-block, 192-wide overlay (0.97x its tokens/s, measured side by side). Bytes instead
# of GPT-2 BPE: a 257-token vocabulary keeps the embedding and the output layer small.
dataset = "pystdlib_byte"  # the Python standard library as UTF-8 bytes, prepared on first use
out_dir = out_dir + "_cpu"  # noqa: F821 (set by the config before this one, or train.py's default)

n_layer = 12
n_head = 4
n_embd = 128
mlp_hidden = 344
block_size = 128

batch_size = 16
gradient_accumulation_steps = 1  # 2,048 tokens per iteration
max_epochs = 0.0  # the budget is max_iters: 1000 x 2,048 = 2M tokens, a small part of one epoch
max_iters = 1000
learning_rate = 2e-3  # small models take a larger step
min_lr = 2e-4
warmup_iters = 50

eval_interval = 200
eval_iters = 16  # 256 fixed validation windows
log_interval = 50
ckpt_interval = 500

device = "cpu"
dtype = "float32"  # bf16 autocast is no faster than fp32 at these sizes (see `python bench.py train`)
compile = False  # on 2 cores, compiling takes ~30-60 s and gains a few percent: not worth it here
