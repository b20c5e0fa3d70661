"""`python -m server.model.prepare [--model PATH]`: make sure the base model is loadable (converts the
default GGUF once) and the native CPU kernels are built where they can be, so the first server start or
test run does not pay for either mid-way."""

from __future__ import annotations

import argparse

from server.kernels.build import SOURCES, load_library
from server.model.loader import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="local Hugging Face model folder (default: SmolLM2-135M-Instruct)")
    folder = resolve_model(parser.parse_args().model)
    print(f"model ready: {folder.path}")
    for source in sorted(SOURCES.glob("*.c")):
        ready = load_library(source.stem) is not None
        print(f"{source.stem} kernel: " + ("ready" if ready else "not available here (torch's own kernels serve)"))


if __name__ == "__main__":
    main()
