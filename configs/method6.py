# Mode 6: Attention Residuals, a softmax over all earlier sublayer outputs per position (Kimi team 2026).
residual_mode = 6  # attn_res
out_dir = "out/method6"
