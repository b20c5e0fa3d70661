"""bench.grammar_engines: each engine is timed on a walk its own masks allow, over the served tokenizer."""

import json

import jsonschema
import pytest

from bench.constrained import SCHEMA
from bench.grammar_engines import _bytes_to_unicode, run, sample_document


def test_the_sample_document_is_valid_against_the_bench_schema():
    jsonschema.validate(json.loads(sample_document()), SCHEMA)


def test_the_byte_alphabet_draws_each_byte_as_its_own_character():
    chars = _bytes_to_unicode()
    assert sorted(chars) == list(range(256)) and len(set(chars.values())) == 256
    assert chars[ord("a")] == "a" and chars[ord(" ")] == "Ġ"


@pytest.mark.integration
def test_llguidance_walks_the_document_and_reports_a_cost_per_token():
    result = run(1, ["llguidance"])["llguidance"]
    assert result["us_per_token_1"] > 0 and result["us_per_token_16"] > 0 and result["first_mask_ms"] > 0
