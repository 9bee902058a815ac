"""Job control: a DDP job's life on the client, its stop, failure causes and restarts (control),
and what runs beside each rank in its worker: the stop switch, the heartbeat, SIGTERM (rankctl)."""
