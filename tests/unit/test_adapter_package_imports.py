"""The adapters package stands alone: reading, validating, storing and mixing adapters loads no server code."""

import subprocess
import sys

MODULES = ["adapters", "adapters.confined", "adapters.errors", "adapters.format", "adapters.mix",
           "adapters.peft_config", "adapters.registry", "adapters.resolver", "adapters.store", "adapters.synthetic"]


def test_adapter_modules_import_nothing_from_the_server():
    probe = (f"import sys; import {', '.join(MODULES)}; "
             "print(sorted(m for m in sys.modules if m == 'server' or m.startswith('server.')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_server_maps_the_adapter_errors_it_re_exports():
    from adapters import errors as adapter_errors
    from server import errors as server_errors
    from server.routes.errors import status_of

    assert server_errors.AdapterNotFound is adapter_errors.AdapterNotFound
    statuses = {cls.__name__: status_of(cls("x")) for cls in (
        adapter_errors.AdapterNotFound, adapter_errors.AdapterExists, adapter_errors.AdapterTooLarge,
        adapter_errors.AdapterInvalid, adapter_errors.InvalidRequest)}
    assert statuses == {"AdapterNotFound": 404, "AdapterExists": 409, "AdapterTooLarge": 413,
                        "AdapterInvalid": 422, "InvalidRequest": 422}
