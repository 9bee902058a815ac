"""Running the notebooks headless: papermill with the embedded S3 server (runner), ``make demo``
(demo), and the scaling sweep of notebook 04 over worker counts (sweep)."""
