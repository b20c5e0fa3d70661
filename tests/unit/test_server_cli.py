"""`python -m server`'s flags: every setting's help prints, and values reach the settings with their bounds."""

import pytest
from pydantic import ValidationError

from server.__main__ import parse_settings


def test_help_prints_every_flag(capsys):
    # a description with a percent sign once broke argparse's help formatting
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert "--admission-wait-fraction" in out and "TTFT mean -28%," in out  # printed as written, not "%%"


def test_the_admission_wait_fraction_is_a_bounded_setting():
    assert parse_settings([]).admission_wait_fraction == 0.4
    assert parse_settings(["--admission-wait-fraction", "0.2"]).admission_wait_fraction == 0.2
    with pytest.raises(ValidationError):
        parse_settings(["--admission-wait-fraction", "1.5"])
