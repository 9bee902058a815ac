"""Shards: the tar format and its index (format), writing them (write), reading them whole and
ahead (read), who reads which samples of an epoch (plan), and one rank's stream of them (stream)."""
