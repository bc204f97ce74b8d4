"""Training: run configs, optimizer, chunked loss, the sharded train step, the training run, metrics, memory plans."""
