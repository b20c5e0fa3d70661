"""Streaming detokenization with the default model's real tokenizer: the streamed pieces add up to what
decoding the whole output gives, stop strings end the text, and the work per token does not grow with the
output (server.engine.detokenizer)."""

import random

import pytest
from transformers import AutoTokenizer

from server.engine.detokenizer import Detokenizer

pytestmark = pytest.mark.integration

TEXTS = ["Héllo wörld — naïve café 🙂🚀 日本語のテキスト, done.", "  leading spaces and\n\nnewlines\t tabs",
         "a family emoji 👩‍👩‍👧‍👦 is several code points", "<|im_end|> a special token inside text"]


@pytest.fixture(scope="module")
def tokenizer(default_model_folder):
    return AutoTokenizer.from_pretrained(str(default_model_folder.path))


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    detok, pieces = Detokenizer(tokenizer, stop), []
    for token in ids:
        piece, stopped = detok.add(token)
        pieces.append(piece)
        if stopped:
            return pieces, True
    return pieces + [detok.flush()], False


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_add_up_to_the_whole_decode(tokenizer, text):
    ids = tokenizer(text).input_ids
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)  # no half-written character is ever sent


def test_random_token_sequences_stream_as_they_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        assert "".join(stream(tokenizer, ids)[0]) == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_a_stop_string_ends_the_text_before_it_even_across_tokens(tokenizer):
    ids = tokenizer("The answer is 42. END OF ANSWER and more text").input_ids
    pieces, stopped = stream(tokenizer, ids, stop=("END OF",))
    assert stopped and "".join(pieces) == "The answer is 42. "


def test_each_token_decodes_a_short_window_however_long_the_output(tokenizer):
    class Counting:
        longest = 0

        def decode(self, ids, **kwargs):
            Counting.longest = max(Counting.longest, len(ids))
            return tokenizer.decode(ids, **kwargs)

    ids = tokenizer("The lighthouse keeper wrote in her log every night. " * 60).input_ids
    pieces, _ = stream(Counting(), ids)
    assert len(ids) > 500 and "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert Counting.longest <= 4
