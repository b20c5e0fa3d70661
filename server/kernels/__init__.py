"""Native CPU kernels where torch's own are measured slow for serving's small batches: C sources built
once per machine with the system compiler (`build.py`), each behind a Python owner that falls back to torch
when it cannot run. Pure compute: nothing here knows about requests or HTTP."""
