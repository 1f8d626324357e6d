"""The model itself: the MM-DiT's building blocks, the Qwen-Image VAE, latent packing, the Qwen2.5-VL
conditioning and the input pictures' preparation."""
