"""Training tasks beyond causal language modelling: each says how to build its model, data, loss and metrics."""
