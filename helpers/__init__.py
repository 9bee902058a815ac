"""What the notebooks import, at the top; the machinery under it, in subpackages by layer.

The notebooks' modules (each imported by at least one notebook)::

    cluster      a Dask client for any cluster; what training needs from every worker
    data         where the dataset is stored, its layout and manifest, its split, the lazy dataset
    prepare      datasets into S3 (the synthetic dogs, the official archive) and their shards
    measure      loader throughput and per-image statistics; objects against shards
    ddp          one rank per Dask worker (what torchrun does), for DDP or FSDP
    train        the per-rank training function, its loop and its evaluation
    memory       what one rank holds while it trains (DDP against FSDP), measured on the workers
    monitor      metrics from the workers to the notebook, live plots while a job runs
    runs         a job's records as a TensorBoard run (the monitor writes it, on the client)
    baseline     chance and what colour alone can tell
    checkpoint   save, load, resume (DDP's whole, FSDP's sharded), the model cache of inference
    inference    batch prediction, one task per batch of keys or per shard
    plots        figures (each takes ax= and returns the Axes)

At the bottom, importable from every layer: ``config`` (every setting and its check, and
``Rank``) and ``errors`` (every error, under one base class).

The subpackages, lowest first (:data:`LAYERS`)::

    show/        text for people: progress bars or log lines, one-line records of training
    s3/          S3 access: storage, retries, presigned GETs, the embedded server, a fault proxy
    shards/      tar shards: the format, writing, reading, who reads what, a rank's stream
    loading/     images decoded and augmented (CPU or GPU), the per-object dataset, DataLoaders,
                 the batches a training loop receives
    loop/        the training loop's parts: the network, its bookkeeping, the training state,
                 how the ranks hold it (DDP or FSDP), its checkpoints (whole or sharded)
    jobs/        a DDP job's life: stop, failure causes, restarts; each rank's switch and heartbeat
    run/         the notebooks run headless: papermill, make demo, the scaling sweep

The rule (``tests/test_structure.py`` enforces it): imports run downwards only. A subpackage
imports ``config``, ``errors`` and the subpackages listed before it, never a notebook's module;
the notebooks' modules import anything below them and each other, without a cycle. Importing
any of it does nothing: no clients, filesystems, threads or logging configuration.
"""

LAYERS = ("show", "s3", "shards", "loading", "loop", "jobs", "run")
