"""Errors of the deployment layer (local broker, topics)."""

from jodie_errors import JodieError


class DeployError(JodieError):
    """Root of deployment errors."""

    reason = "deploy"


class ToolMissingError(DeployError):
    """Java 17+ or Maven is missing; install them (`apt-get install openjdk-17-jre maven`)."""


class JarFetchError(DeployError):
    """Maven could not fetch the Kafka jars; check access to Maven Central and the log it names."""


class PortInUseError(DeployError):
    """The broker port is taken by another program; stop it or set JODIE_BROKER_PORT."""


class BrokerStartError(DeployError):
    """The broker did not become ready; read the server log named in the message."""


class TopicSpecError(DeployError):
    """deploy/topics.toml is invalid; fix the named entry."""
