"""The project's Jupyter server settings: `make lab` loads this file with --config.

Dask panels (dask-labextension): the panel's search button runs
``dask.distributed.default_client().dashboard_link`` in the notebook's kernel, so the client a
notebook displays is found without typing an address, whatever free port its dashboard got.
That link must be one the browser can open. On a laptop it is http://127.0.0.1:PORT/status. Behind
JupyterHub or Binder the browser reaches the kernel's machine only through the hub, so the link
goes through jupyter-server-proxy (installed with dask-labextension): set here, only there.
"""

import os

c = get_config()  # noqa: F821 - traitlets provides it to config files

# JupyterHub (and Binder, which runs one) sets JUPYTERHUB_SERVICE_PREFIX, e.g. "/user/ada/".
# Kernels inherit the server's environment; Dask fills {JUPYTERHUB_SERVICE_PREFIX} and {port} in.
if os.environ.get("JUPYTERHUB_SERVICE_PREFIX"):
    os.environ.setdefault(
        "DASK_DISTRIBUTED__DASHBOARD__LINK", "{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status"
    )
