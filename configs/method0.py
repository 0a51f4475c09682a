# Method 0 of the original experiment: the standard Transformer.
# The four method configs differ only in residual_mode (and out_dir). The model is the original's
# 12 layers, n_embd 768, 12 heads, MLP 2048, here with GPT-2 BPE on the default corpus (the Python
# standard library, prepared on first use), trained for 5 epochs like the original.
#   python train.py configs/method0.py                   # a GPU run
#   python train.py configs/method0.py configs/cpu.py    # the small CPU version
residual_mode = 0  # standard
out_dir = "out/method0"

dataset = "pystdlib"
n_layer = 12
n_head = 12
n_embd = 768
mlp_hidden = 2048
block_size = 1024
dropout = 0.0

batch_size = 8
gradient_accumulation_steps = 4  # 32 windows = 32,768 tokens per iteration
max_epochs = 5.0
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 100
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 200
eval_iters = 20  # 160 fixed validation windows
log_interval = 10
ckpt_interval = 200
