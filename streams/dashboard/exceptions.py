"""Errors of the dashboard; each says what to do."""

from jodie_errors import JodieError


class DashboardError(JodieError):
    """The dashboard cannot start: no broker answers (`jodie broker up`, or JODIE_BOOTSTRAP),
    the pipeline's topics are missing (`jodie topics apply` with the pipeline's
    JODIE_TOPIC_PREFIX) or its port is taken (pass `--port`)."""
