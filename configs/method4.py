# Mode 4: method 2 with learned softmax weights over the attention inputs of the blocks so far.
residual_mode = 4  # attn_learned
out_dir = "out/method4"
