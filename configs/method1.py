# Method 1: at each MLP sublayer, the uniform mean of the MLP inputs of all blocks so far.
residual_mode = 1  # mlp_mean
out_dir = "out/method1"
