"""Every error the helpers raise, under one base class, and the one signal that is not an error.

Catch :class:`DaskDLError` for anything the helpers refuse or fail at. Each error also derives
from the built-in exception it is a kind of (a bad parameter is a ``ValueError``, a missing
checkpoint a ``FileNotFoundError``), so code written against the built-ins keeps working. The
message always names what was wrong (the parameter and its allowed values, the bucket, key,
shard or worker) and what to do.

Bottom layer: this module imports nothing of the project, and every layer may import it.
"""

from __future__ import annotations


class DaskDLError(Exception):
    """The base of every error the helpers raise."""


# Settings


class ParameterError(DaskDLError, ValueError):
    """A parameter outside its allowed values; the message names both."""


# Storage and data


class StorageError(DaskDLError, RuntimeError):
    """An object store could not be used; the message names the endpoint, bucket or key."""


class StorageUnavailable(StorageError):
    """The endpoint stayed unreachable or kept failing (5xx, throttling, resets, timeouts) for
    the whole retry window: worth a job restart later, unlike a missing bucket or a refusal."""


class ShardIndexError(StorageError):
    """No shards, or shards of another manifest or split; the message says how to rebuild."""


class ShardError(DaskDLError, ValueError):
    """A shard, or a sample bound for one, that breaks the format: a bad tar header, a size out
    of bounds, data cut short (the message names the shard and the byte offset), or an object
    name a shard cannot hold."""


class BadImageError(DaskDLError, ValueError):
    """An object that is not a decodable image; the message names its key."""


class CheckpointError(DaskDLError, ValueError):
    """A checkpoint that cannot be used: corrupt, of another run, or of another model."""


class NotFound(DaskDLError, FileNotFoundError):
    """What an earlier step should have written is not there (a checkpoint, the sweep's runs);
    the message names where it looked and which step writes it."""


# The cluster and a job's life


class ClaimMissed(DaskDLError, RuntimeError):
    """The demo's network did not beat its baselines (colour and chance) by the margin asked."""


class ClusterError(DaskDLError, RuntimeError):
    """The cluster cannot run the job: no workers, a worker setting training needs, no GPUs."""


class ClusterBusy(DaskDLError, TimeoutError):
    """Another DDP job held the cluster for longer than the launcher would wait."""


class SchedulerUnreachable(DaskDLError, ConnectionError):
    """No Dask scheduler answered at the address given."""


class JobError(DaskDLError, RuntimeError):
    """A DDP job ended without its result; the subclasses say how."""


class WorkerLost(JobError):
    """A rank's worker process died (killed, out of memory, crashed): a restart can fix it."""


class RankHung(JobError):
    """A rank stopped making progress (no heartbeat for ``hang_s``): a restart can fix it."""


class SchedulerLost(JobError):
    """The client lost its Dask scheduler (killed, crashed, its machine gone): the job ends; a
    restart cannot help, as the cluster's state went with it."""


class Cancelled(JobError):
    """A job ended because it was cancelled (the notebook's stop button, ``Job.cancel``, or its
    client went away)."""


class Terminated(JobError):
    """A rank's worker was told to stop (SIGTERM); the job checkpointed and may restart."""


# A signal, not an error


class Stopped(BaseException):
    """The stop signal of a rank's thread (its job was cancelled). Like ``KeyboardInterrupt``,
    it derives from ``BaseException`` on purpose: no ``except Exception`` on its way up (a
    storage retry, a DataLoader) may swallow it. The launcher turns it into :class:`Cancelled`
    before it leaves the rank."""
