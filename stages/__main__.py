"""`python -m stages <stage>` is the same as `medpipe <stage>`."""

from stages.cli import app

app(prog_name="medpipe")
