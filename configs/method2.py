# Method 2: at each attention sublayer, the uniform mean of the attention inputs of all blocks so far.
residual_mode = 2  # attn_mean
out_dir = "out/method2"
