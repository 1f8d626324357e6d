"""FireRed's agent jobs, done locally: multi-picture layout, instruction rewriting and the VLM client they share."""
