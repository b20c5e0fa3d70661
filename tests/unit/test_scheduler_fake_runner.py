"""What runs in each step (server.engine.scheduler) through the real engine loop, on a fake model runner:
continuous batching, round-robin admission across adapters, prompts in chunks."""

from adapters import random_adapter
from server.engine.request import SamplingParams
from tests.unit.engine_fakes import FakeRunner, fake_loop


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


class ChunkCheckingRunner(FakeRunner):
    """Writes each prompt chunk's keys as its sequence's id and notes any chunk whose slot no longer holds the
    earlier chunks of its prompt; `poisoned`'s row gets non-finite logits (an adapter that overflows)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.poisoned = None
        self.lost: list[tuple[int, int]] = []  # (sequence id, first position of the chunk that found a gap)

    def run(self, decode, prefill, use_lora):
        for seq in prefill:
            start, slot = seq.cached_tokens, seq.kv_slot
            if not bool((self.kv.k[:, slot, :, :start] == seq.id).all()):
                self.lost.append((seq.id, start))
            self.kv.k[:, slot, :, start : start + seq.chunk_tokens] = seq.id
        logits = super().run(decode, prefill, use_lora)
        for row, seq in enumerate(decode + prefill):
            if seq is self.poisoned:
                logits[row] = float("nan")
        return logits


def test_a_request_ended_mid_step_leaves_a_chunked_prompt_its_keys():
    # the step that ends the victim (its logits overflow) also computes a chunk of the long prompt in the last
    # slot: filling the victim's slot moves that prompt down, chunk included
    loop = fake_loop(max_seqs=3, max_prefill_tokens=16)
    runner = ChunkCheckingRunner(loop.clock, loop.runner.kv, loop.runner.step_s)
    loop.engine.runner = loop.runner = runner
    victim, bystander = loop.submit(4, tokens(10)), loop.submit(4, tokens(10))
    loop.engine.run_once()
    long_prompt = loop.submit(40, tokens(2))
    runner.poisoned = victim.seq
    loop.run_until(lambda: long_prompt.finish_reason is not None and bystander.finish_reason is not None)
    assert victim.finish_reason == "error" and long_prompt.finish_reason == "length"
    assert runner.steps[1][1] == [long_prompt.seq.id]  # its first chunk ran beside the victim's last decode
    assert runner.lost == []
