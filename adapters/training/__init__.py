"""The tooling that made the shipped adapters: data (`datasets`), PEFT training (`train`, `ship`), the
held-out evaluation through loraplex's own engine (`evaluate`, `metrics`, `replies`) and the cards.

Not needed to serve: training needs the `train` extra (`pip install -e '.[train]'`, which brings PEFT), and
the runtime library in `adapters/` never imports this package.
"""
