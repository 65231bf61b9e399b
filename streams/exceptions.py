"""Errors of the pipeline's wiring and of the worker application; each says what to do."""

from jodie_errors import JodieError


class SettingsError(JodieError):
    """A JODIE_* variable holds a value its setting does not take; fix or unset it."""


class RegistryError(JodieError):
    """A registry operation that cannot be done (unknown version, nothing to roll back to);
    `jodie models list` shows what the registry holds."""


class UntrustedModelError(RegistryError):
    """An announcement the registry does not trust: its checkpoint lies outside
    JODIE_MODEL_STORE and JODIE_MODEL_ALLOW, or its signature is missing or wrong under
    JODIE_MODEL_SIGNING_KEY; announce the checkpoint again with `jodie models announce`."""


class UnservableModelError(RegistryError):
    """A checkpoint ranks with a scorer the workers cannot serve; train the version with a
    scorer they serve (`jodie train --scorer history`) to deploy it."""


class ReadError(JodieError, RuntimeError):
    """The broker answered an error while a topic was read back; check the broker, retry."""


class ModelMismatchError(JodieError):
    """A table row was computed by another model version than the one served; serve a new
    version by promoting it (`jodie models promote`), never by restarting on other weights."""


class AclError(JodieError):
    """The cluster refused to create an ACL; run `jodie acls apply` as its super user (on the
    local secure broker: `source` the admin env file `jodie broker up --secure` prints)."""


class BrokerUnavailableError(JodieError):
    """No broker answers at JODIE_BOOTSTRAP: start the local one (`jodie broker up`, with the
    same JODIE_BROKER_PORT) or point JODIE_BOOTSTRAP at a running cluster."""


class TopicMissingError(ReadError):
    """A topic the command needs does not exist: create the declared topics (`jodie topics
    apply`), or set JODIE_TOPIC_PREFIX to the prefix the pipeline runs with."""


class PipelineRunningError(JodieError):
    """The pipeline's consumer groups still have members (its workers run): stop its router
    and workers before deleting its topics (`jodie topics delete`)."""


class DlqFileError(JodieError):
    """A file of events to re-send does not hold what `jodie dlq show --json` prints (one JSON
    object per line, each with an `event`); fix the line it names."""


class DeliveryError(JodieError):
    """Events could not be delivered to `interactions` (the producer already retried them);
    check that the topic exists (`jodie topics create`) and that the brokers answer."""


class QueryError(JodieError):
    """An interactive query (`jodie recommend`, streams.query) without an answer; the message
    says why."""


class NoWorkerError(QueryError):
    """No worker answered at the addresses asked: start the workers (`jodie worker --id N`),
    or point JODIE_WEB_PORT (and --workers) at the running ones."""


class UnknownEntityError(QueryError):
    """No event of this user or item has been applied yet, so the pipeline holds no state of
    it; ask with cold start (`jodie recommend USER --cold-start`) for the items popular now."""


class BadQueryError(QueryError):
    """The workers refused the query's parameters; the message names the one to fix."""
