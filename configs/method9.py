# Mode 9: manifold-constrained Hyper-Connections, the stream mixing kept doubly stochastic (DeepSeek 2025).
residual_mode = 9  # mhc
out_dir = "out/method9"
