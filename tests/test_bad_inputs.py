"""Every bad input of tests/bad_inputs.py through the CLI: exit 2, no traceback, one line that names the key,
flag or file and the fix (the table in docs/bad-inputs.md)."""

import pytest

from tests.bad_inputs import CASES, run_case


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 150
    assert len({c.id for c in CASES}) == len(CASES)
    # every command has its cases
    assert {c.argv[0] for c in CASES} >= {"train", "validate", "eval", "plan", "plot", "dashboard"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_line_and_exit_2(case, tmp_path):
    code, err = run_case(case, tmp_path)
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert lines and lines[-1].startswith("alignkit: error: "), err
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1, err
    message = lines[-1]
    assert case.names in message, (case.names, message)
    assert case.fix in message, (case.fix, message)
