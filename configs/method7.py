# Mode 7: a control that mixes the embedding h_0 into every block's input (modded-nanogpt's x0 lambdas).
residual_mode = 7  # x0_mix
out_dir = "out/method7"
