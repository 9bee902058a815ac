"""The training loop's parts: the network (model) and the loop's bookkeeping and records (meter)."""
