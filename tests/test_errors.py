"""pipeline.errors: what a one-line report quotes of an error."""

from pipeline.errors import first_line


def test_first_line_quotes_the_first_line_that_says_something():
    assert first_line(ValueError("\n  bad value: 5 \nTraceback ...")) == "bad value: 5"
    assert first_line(RuntimeError("")) == "RuntimeError"  # an empty message: named by its type
    assert first_line("") == "" and first_line("one\ntwo") == "one"
