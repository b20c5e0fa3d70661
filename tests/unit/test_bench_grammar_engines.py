"""bench.grammar_engines: each engine is timed on a walk its own masks allow, over the served tokenizer."""

import json

import jsonschema
import pytest

from bench.constrained import SCHEMA
from bench.grammar_engines import run, sample_document


def test_the_sample_document_is_valid_against_the_bench_schema():
    jsonschema.validate(json.loads(sample_document()), SCHEMA)


@pytest.mark.integration
def test_llguidance_walks_the_document_and_reports_a_cost_per_token():
    result = run(1, ["llguidance"])["llguidance"]
    assert result["us_per_token_1"] > 0 and result["us_per_token_16"] > 0 and result["first_mask_ms"] > 0
