"""DataLoaders inside Dask workers: their processes come from a forkserver where Dask spawns."""

from helpers.loading import dataloader


def test_loader_processes_are_forked_from_a_forkserver_where_dask_spawns(monkeypatch):
    import multiprocessing

    assert multiprocessing.get_start_method() == "fork"  # this process: the default stays
    assert dataloader.make_loader(list(range(4)), 2, num_workers=1).multiprocessing_context is None
    # Dask's worker processes run under "spawn": a fresh interpreter (torch imported) per epoch
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda *a, **k: "spawn")
    loader = dataloader.make_loader(list(range(4)), 2, num_workers=1)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert dataloader.make_loader(list(range(4)), 2, num_workers=0).multiprocessing_context is None
