"""loraplex beyond one process: N engine replicas on Ray Serve behind the same HTTP API, routed by adapter.

`ingress.py` forwards each request to a replica (generation requests by their adapter, through Serve's model
multiplexing); `replica.py` runs the single-process app on its own engine; `shared_registry.py` makes every
replica's registry a bounded cache of one shared adapter store; `__main__.py` starts it all.
"""
