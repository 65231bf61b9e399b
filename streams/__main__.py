"""`python -m streams` is the `jodie` command."""

from streams.cli import app

app(prog_name="jodie")
