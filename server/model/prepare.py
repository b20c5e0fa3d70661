"""`python -m server.model.prepare [--model PATH]`: make sure the base model is loadable (converts the
default GGUF once) and the CPU panel kernel is built where it can be, so the first server start or test run
does not pay for either mid-way."""

from __future__ import annotations

import argparse

from server.model.loader import resolve_model
from server.model.panel_kernel import panel_kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="local Hugging Face model folder (default: SmolLM2-135M-Instruct)")
    folder = resolve_model(parser.parse_args().model)
    print(f"model ready: {folder.path}")
    print("panel kernel: " + ("ready" if panel_kernel() else "not available here (the server uses oneDNN)"))


if __name__ == "__main__":
    main()
