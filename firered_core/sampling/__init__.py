"""Flow-matching sampling: the time convention, sigma schedules, samplers, the MM-DiT as a model
function (denoiser), classifier-free guidance and seeded noise."""
