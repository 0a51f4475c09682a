# Method 0 of the original experiment: the standard pre-norm residual. The model, data and budget are
# train.py's defaults, the original's (12 layers, n_embd 768, 12 heads, MLP 2048, 5 epochs).
#   python train.py configs/method0.py                   # a GPU run
#   python train.py configs/method0.py configs/cpu.py    # the small CPU version
residual_mode = 0  # standard
out_dir = "out/method0"
