"""What runs in each step (server.engine.scheduler) through the real engine loop, on a fake model runner:
continuous batching, round-robin admission across adapters, prompts in chunks."""

from adapters import random_adapter
from server.engine.request import SamplingParams
from tests.unit.engine_fakes import fake_loop


def tokens(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def adapter(name: str):
    return random_adapter(name, {"layers.0.q_proj": (8, 8)}, rank=2)


def test_a_short_request_joins_a_running_long_one_and_finishes_first():
    loop = fake_loop()
    long = loop.submit(4, tokens(40))
    sent = []
    loop.clock.at(0.03, lambda: sent.append(loop.submit(4, tokens(5))))  # during the second step
    loop.run_until(lambda: long.finish_reason is not None)
    short = sent[0]
    assert short.finish_reason == "length" and short.got[-1].completion_tokens == 5
    assert loop.last_step_of(short.seq) < loop.last_step_of(long.seq)
    # its prompt and decodes rode along in the long one's steps: 40 steps in all, two of them prefilling
    assert len(loop.runner.steps) == 40
    assert sum(bool(prefilled) for _, prefilled in loop.runner.steps) == 2


def test_a_flood_for_one_adapter_does_not_starve_another():
    loop = fake_loop(max_seqs=2)
    a, b = adapter("a"), adapter("b")
    flood = [loop.submit(4, tokens(3), a) for _ in range(4)]
    other = loop.submit(4, tokens(3), b)
    loop.run_until(lambda: all(r.finish_reason for r in [*flood, other]))
    assert loop.runner.steps[0][1] == [flood[0].seq.id, other.seq.id]  # one of each, not the flood's first two


def test_a_long_prompt_is_computed_in_chunks_while_running_requests_keep_decoding():
    loop = fake_loop(max_prefill_tokens=16)
    running = loop.submit(4, tokens(10))
    loop.engine.run_once()  # its prompt and first token
    long_prompt = loop.submit(40, tokens(2))
    loop.run_until(lambda: long_prompt.finish_reason is not None)
    chunks = [i for i, (_, prefilled) in enumerate(loop.runner.steps) if long_prompt.seq.id in prefilled]
    assert chunks == [1, 2, 3]  # 16 + 16 + 8 prompt tokens
    assert all(running.seq.id in loop.runner.steps[i][0] for i in chunks)  # a token for it in every one
    assert long_prompt.got[-1].completion_tokens == 2
