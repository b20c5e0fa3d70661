"""`python -m bench.llamacpp [--rounds 3]`: llama.cpp on the same GGUF file, the optional baseline of the
QLoRA rows (`pip install -e '.[llamacpp]'` builds llama-cpp-python from its source distribution).

llama.cpp decodes the default model's GGUF (Q4_1/Q8_0) with the same greedy prompt and token count as
`bench.quantized`, prefill included. Its Python API decodes one sequence at a time, and llama.cpp serializes
requests whose LoRA sets differ, so 16 streams over 4 adapters are 16 generations one after another: its
throughput there is taken as its one-stream rate, an upper bound that leaves out swapping adapters. Then
loraplex (`bench.quantized`) in the same run: one stream, and 16 streams spread over 4 q/v r=8 adapters.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.fixtures import QV_R8, adapter_names, write_adapters
from bench.quantized import PROMPT, TOKENS
from server.model.loader import load_tokenizer, resolve_model


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def run(rounds: int) -> dict:
    """llama.cpp's tokens per second for one stream on the default model's GGUF (median of `rounds`)."""
    import llama_cpp

    folder = resolve_model(None)
    prompt = load_tokenizer(folder).apply_chat_template([{"role": "user", "content": PROMPT}],
                                                        add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    llm = llama_cpp.Llama(str(folder.gguf), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)

    def one_stream() -> float:
        llm.reset()
        started, produced = time.perf_counter(), 0
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            produced += 1
            if produced == TOKENS:
                break
        return produced / (time.perf_counter() - started)

    one_stream()  # warm-up
    return {"version": llama_cpp.__version__, "streams_1": statistics.median(one_stream() for _ in range(rounds))}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.llamacpp", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not available():
        raise SystemExit("llama-cpp-python is not installed: pip install -e '.[llamacpp]' (builds from source)")
    from bench.quantized import run as loraplex_run

    theirs = run(args.rounds)
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-adapters-") as work:
        folders = write_adapters(QV_R8, 4, Path(work))
        ours = loraplex_run(["gguf"], args.rounds, {n: folders[n] for n in adapter_names(QV_R8, 4)})["gguf"]
    print(f"llama.cpp {theirs['version']} (llama-cpp-python), {torch.get_num_threads()} threads, "
          f"{ours['weight_format']}")
    print(f"1 stream: loraplex {ours['streams_1']:.1f} vs llama.cpp {theirs['streams_1']:.1f} tok/s = "
          f"{ours['streams_1'] / theirs['streams_1']:.2f}x")
    print(f"16 streams over 4 adapters: loraplex {ours['mixed_16']:.0f} vs llama.cpp {theirs['streams_1']:.1f} "
          f"tok/s (one sequence at a time) = {ours['mixed_16'] / theirs['streams_1']:.2f}x")


if __name__ == "__main__":
    main()
