"""Training: run configs, optimizer, chunked loss, the sharded train step, the run loop, metrics, memory plans."""
