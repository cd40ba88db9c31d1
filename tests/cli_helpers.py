"""Running the CLI in-process from a test, and what a user error must look like."""

from slimlm.cli import main


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `slimlm ARGV`."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, needle):
    """A user error: exit code 2, one line on stderr naming the problem, no traceback."""
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
