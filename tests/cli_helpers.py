"""Running the CLI in-process and checking the one-line error contract, shared by the CLI tests."""

from __future__ import annotations

from typer.testing import CliRunner

from layerprobe.cli import app

runner = CliRunner()


def run_cli(*args):
    """Invoke `layerprobe ARGS…`; returns (result, text) with stdout and stderr interleaved (click >= 8.2)."""
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.output


def assert_one_line_error(result, text, *needles):
    """A non-zero exit, no traceback, exactly one `error:` line, holding every needle."""
    assert result.exit_code not in (0, None), text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    for needle in needles:
        assert needle in errors[0], errors[0]
