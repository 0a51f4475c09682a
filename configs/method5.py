# Mode 5: DenseFormer's depth-weighted average of every earlier block output (Pagliardini et al. 2024).
residual_mode = 5  # dwa
out_dir = "out/method5"
