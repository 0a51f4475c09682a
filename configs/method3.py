# Method 3: method 1 with learned softmax weights over the blocks so far, zero logits at init (= method 1).
residual_mode = 3  # mlp_learned
out_dir = "out/method3"
