"""`python -m server.cluster`: serve the API from N engine replicas on Ray Serve, with adapter-affinity routing.

Starts a local Ray cluster on this machine (or joins one with `--address`), deploys the ingress and the
engine replicas, and serves until Ctrl-C or SIGTERM. Every flag of `python -m server` works here too.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import threading
from pathlib import Path

from server.__main__ import parse_settings
from server.app import check_security
from server.auth import KeyRing
from server.settings import Settings

log = logging.getLogger("loraplex.cluster")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(prog="python -m server.cluster", description=__doc__,
                                     epilog="Any other flag is one of `python -m server --help`.")
    parser.add_argument("--replicas", type=int, default=2, help="engine replicas, each with its own model copy")
    parser.add_argument("--adapters-per-replica", type=int, default=16,
                        help="adapters one replica holds in memory at once (least recently used leave first)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs per replica (torch threads too)")
    parser.add_argument("--gpus-per-replica", type=float, default=None, help="Ray GPUs per replica (default: 1 if CUDA)")
    parser.add_argument("--address", default=None,
                        help="an existing Ray cluster (`auto`, or host:port); default: start one on this machine")
    ours, rest = parser.parse_known_args(argv)
    return ours, parse_settings(rest)


def build(settings: Settings, base_names: list[str], replicas: int, adapters_per_replica: int, cpus: float,
          gpus: float):
    from server.gate import Gate
    from server.cluster.ingress import Ingress
    from server.cluster.replica import EngineReplica

    engine = EngineReplica.options(
        num_replicas=replicas, max_ongoing_requests=settings.max_pending,  # the engine's own limit answers 429
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
    ).bind(settings, adapters_per_replica)
    return Ingress.options(max_ongoing_requests=replicas * settings.max_pending,
                           ray_actor_options={"num_cpus": 0}).bind(engine, Gate.from_settings(settings), base_names)


def prepare(settings: Settings, cpus: float, gpus: float | None) -> tuple[Settings, float, list[str]]:
    """Checks and one-time work in this process, before any replica runs; returns the replicas' settings, their
    GPUs and the base model's names. Replicas converting the default model together would race on its cache, and
    a replica cleaning the store could delete another one's upload in progress."""
    from adapters import AdapterStore
    from server.model.loader import resolve_model, served_names

    check_security(settings, KeyRing.from_settings(settings.admin_keys, settings.user_keys, settings.keys_file))
    if gpus is None:
        gpus = 1.0 if settings.torch_device().type == "cuda" else 0.0
    if gpus == 0 and settings.threads is None:  # one torch thread team per Ray CPU, not per core of the machine
        settings = settings.model_copy(update={"threads": max(1, math.floor(cpus))})
    folder = resolve_model(settings.model_path)
    AdapterStore(settings.store_dir).clean_leftovers()
    base_names = served_names(settings.served_model_name, folder)
    # every replica answers to the names the ingress routes by
    settings = settings.model_copy(update={"served_model_name": base_names})
    return absolute_paths(settings), gpus, base_names


def absolute_paths(settings: Settings) -> Settings:
    """Replicas need not share this process's working directory."""
    fields = ("store_dir", "preload_dir", "keys_file", "chat_template")
    update = {field: Path(value).expanduser().resolve() for field in fields
              if (value := getattr(settings, field)) is not None}
    if settings.model_path:
        update["model_path"] = str(Path(settings.model_path).expanduser().resolve())
    return settings.model_copy(update=update)


def start_ray(address: str | None, replicas: int, cpus: float, gpus: float) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if address:
        ray.init(address=address, include_dashboard=False)
    else:
        ray.init(address="local", include_dashboard=False, num_cpus=math.ceil(replicas * cpus),
                 num_gpus=math.ceil(replicas * gpus))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, settings = parse_args(argv)
    settings, gpus, base_names = prepare(settings, args.cpus_per_replica, args.gpus_per_replica)
    start_ray(args.address, args.replicas, args.cpus_per_replica, gpus)
    import ray
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build(settings, base_names, args.replicas, args.adapters_per_replica, args.cpus_per_replica, gpus),
                  name="loraplex", route_prefix="/")
        log.info("loraplex: %d replicas serving on http://%s:%d (Ctrl-C stops)", args.replicas, settings.host,
                 settings.port)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
