# Mode 8: Hyper-Connections, n residual streams mixed by learned, input-dependent matrices (Zhu et al. 2025).
residual_mode = 8  # hyper
out_dir = "out/method8"
