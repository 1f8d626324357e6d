"""How the model runs: attention backends, precision and fp8 compute, memory placement and block
swapping, speed options and the step cache."""
