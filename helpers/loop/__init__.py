"""The training loop's parts: the network (model), the loop's bookkeeping and records (meter),
the training state (state), how the ranks hold it (parallel), and its checkpoints, whole
(whole) or sharded (sharded)."""
