"""The JODIE model: the network, its states, t-batches, the one event kernel, checkpoints."""
