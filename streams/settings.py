"""One frozen settings object; every field is overridable by a ``JODIE_<FIELD>`` env variable."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from streams.exceptions import SettingsError

#: Node n of a local cluster (`jodie broker up --nodes N`) listens on the configured client and
#: controller ports plus n times this, so each node's pair stays next to its number.
NODE_PORT_STEP = 10


def _default_cache() -> Path:
    return Path.home() / ".cache" / "jodie"


class Settings(BaseSettings):
    """Configuration of the broker, the topics and the workers.

    Each field reads the environment variable named in its description; CLI flags, where a
    command has them, override it for that run only.
    """

    model_config = SettingsConfigDict(env_prefix="JODIE_", frozen=True, extra="ignore")

    # --- Kafka connection -------------------------------------------------------------
    bootstrap: str | None = Field(
        None,
        description=(
            "JODIE_BOOTSTRAP: Kafka brokers to connect to (host:port,...); default: the local "
            "broker, 127.0.0.1:JODIE_BROKER_PORT."
        ),
    )
    schema_registry_url: str | None = Field(
        None,
        description=(
            "JODIE_SCHEMA_REGISTRY_URL: a Confluent-compatible schema registry; when set, "
            "messages use Confluent framing (magic byte + registry id) instead of Avro "
            "single-object encoding. `mock://name` gives an in-process registry (tests)."
        ),
    )

    # Security: every Kafka client is built by streams.runtime.clients, which sends these.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="JODIE_SECURITY_PROTOCOL: how clients talk to the brokers (TLS and/or SASL).",
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = (
        Field(None, description="JODIE_SASL_MECHANISM: SASL mechanism, with a SASL_* protocol.")
    )
    sasl_username: str | None = Field(None, description="JODIE_SASL_USERNAME: SASL user name.")
    sasl_password: SecretStr | None = Field(
        None, description="JODIE_SASL_PASSWORD: SASL password (never printed)."
    )
    ssl_ca_location: Path | None = Field(
        None,
        description="JODIE_SSL_CA_LOCATION: CA certificate(s) to verify the brokers (PEM file).",
    )
    ssl_certificate_location: Path | None = Field(
        None, description="JODIE_SSL_CERTIFICATE_LOCATION: client certificate (PEM), for mTLS."
    )
    ssl_key_location: Path | None = Field(
        None, description="JODIE_SSL_KEY_LOCATION: the client certificate's private key (PEM)."
    )
    ssl_key_password: SecretStr | None = Field(
        None, description="JODIE_SSL_KEY_PASSWORD: passphrase of that key (never printed)."
    )

    # --- local broker (`jodie broker ...`) ------------------------------------------------
    cache_dir: Path = Field(
        default_factory=_default_cache,
        description="JODIE_CACHE_DIR: where the Kafka jars and the local broker's data live.",
    )
    kafka_version: str = Field(
        "4.4.0", description="JODIE_KAFKA_VERSION: Apache Kafka release fetched from Maven Central."
    )
    broker_port: int = Field(9092, description="JODIE_BROKER_PORT: the local broker's client port.")
    controller_port: int = Field(
        9093, description="JODIE_CONTROLLER_PORT: the local KRaft controller's port."
    )
    broker_nodes: int = Field(
        1,
        ge=1,
        le=9,
        description=(
            "JODIE_BROKER_NODES: nodes of the local Kafka (`jodie broker up --nodes` overrides "
            "it for that command): 1, or a cluster of combined broker+controller nodes, node n "
            "on JODIE_BROKER_PORT + 10n and JODIE_CONTROLLER_PORT + 10n. Clients then "
            "bootstrap from every node, so one node down does not keep a process from starting."
        ),
    )
    broker_heap: str = Field(
        "768m", description="JODIE_BROKER_HEAP: JVM heap of the local broker (-Xmx and -Xms)."
    )
    broker_start_timeout_s: float = Field(
        90.0, description="JODIE_BROKER_START_TIMEOUT_S: how long `broker up` waits for metadata."
    )
    broker_secure: bool = Field(
        False,
        description=(
            "JODIE_BROKER_SECURE: `jodie broker up` starts the local broker with TLS, SCRAM "
            "users per role and ACLs (as `--secure` does); off for the local demo."
        ),
    )

    # --- topics ---------------------------------------------------------------------------
    topic_prefix: str = Field(
        "",
        description=(
            "JODIE_TOPIC_PREFIX: prepended to every topic name, so several pipelines (or test "
            "runs) can share one cluster."
        ),
    )
    partitions: int = Field(
        4, description="JODIE_PARTITIONS: partitions of the keyed topics (sets worker parallelism)."
    )
    input_partitions: int = Field(
        1,
        ge=1,
        description=(
            "JODIE_INPUT_PARTITIONS: partitions of `interactions` and `interactions.log`. One "
            "router reads them all and merges them by time, so each one more makes it wait for "
            "another partition's next event and adds commit markers to every transaction."
        ),
    )
    whole_partitions: int = Field(
        1,
        ge=1,
        description=(
            "JODIE_WHOLE_PARTITIONS: partitions of `item-vectors` and `evaluations`, which every "
            "reader reads whole (each worker's feed, the summaries), so no worker's share "
            "depends on them. Each worker transaction writes to every partition of both: each "
            "one more is one more produce request and commit marker per transaction."
        ),
    )
    replication_factor: int | None = Field(
        None,
        ge=1,
        description=(
            "JODIE_REPLICATION_FACTOR: replicas per partition of the topics `jodie topics apply` "
            "creates; default: JODIE_BROKER_NODES, at most 3 (1 for the single local broker)."
        ),
    )

    # --- producing ----------------------------------------------------------------------------
    produce_batch: int = Field(
        10_000,
        description="JODIE_PRODUCE_BATCH: events between producer flushes in `jodie produce`.",
    )

    # --- router: what an event may hold (operators.protocol.sequencer.Limits) --------------
    max_id_length: int = Field(
        256,
        ge=1,
        description=(
            "JODIE_MAX_ID_LENGTH: most characters in an event, user or item id; a longer one "
            "goes to the DLQ as bad_id."
        ),
    )
    max_clock_skew_s: float = Field(
        86_400.0,
        gt=0,
        description=(
            "JODIE_MAX_CLOCK_SKEW_S: how far past the router's event-time watermark (the "
            "largest timestamp accepted) an event may be; later ones go to the DLQ as "
            "future_timestamp. The first event is bounded by the wall clock plus this. Must "
            "exceed the longest quiet period in the stream's event time."
        ),
    )
    max_abs_timestamp: float = Field(
        1e15,
        gt=0,
        description=(
            "JODIE_MAX_ABS_TIMESTAMP: largest |timestamp| (seconds) accepted at all; beyond it "
            "an event goes to the DLQ as bad_timestamp."
        ),
    )
    max_feature_abs: float = Field(
        1e6,
        gt=0,
        description=(
            "JODIE_MAX_FEATURE_ABS: largest |feature| accepted; beyond it (or NaN, inf) an "
            "event goes to the DLQ as bad_features."
        ),
    )
    max_features: int = Field(
        4096,
        ge=0,
        description=(
            "JODIE_MAX_FEATURES: most features an event may have (or the served model's "
            "count, if larger); a longer array is refused unread, and a first event cannot "
            "fix an absurd length."
        ),
    )

    dedup_window: int = Field(
        100_000,
        ge=1,
        description=(
            "JODIE_DEDUP_WINDOW: how many of the latest event ids the router holds for its "
            "duplicate check (besides each user's and item's latest event); an older re-send "
            "is time_backwards, or in a rare tie sequenced again (README: Ordering semantics)."
        ),
    )

    router_entities: int = Field(
        100_000,
        ge=1,
        description=(
            "JODIE_ROUTER_ENTITIES: how many users and how many items the router keeps in "
            "memory with their latest event (the most recently active); the others wait in "
            "a scratch RocksDB under JODIE_STATE_DIR, rebuilt from the log at each start."
        ),
    )

    # --- workers ------------------------------------------------------------------------------
    state_dir: Path = Field(
        default_factory=lambda: _default_cache() / "state",
        description="JODIE_STATE_DIR: RocksDB tables of the workers (one folder per worker id).",
    )
    model_store: Path = Field(
        default_factory=lambda: _default_cache() / "models",
        description=(
            "JODIE_MODEL_STORE: where announced checkpoints are kept (a local directory; "
            "announcements carry its file:// URI). Workers, the router and `models promote` "
            "load only checkpoints inside it (or inside JODIE_MODEL_ALLOW)."
        ),
    )
    model_allow: Annotated[tuple[Path, ...], NoDecode] = Field(
        (),
        description=(
            "JODIE_MODEL_ALLOW: further directories an announced checkpoint may live in, "
            "separated like PATH (':' on POSIX); empty by default: only JODIE_MODEL_STORE."
        ),
    )
    model_signing_key: SecretStr | None = Field(
        None,
        description=(
            "JODIE_MODEL_SIGNING_KEY: when set, `models announce` signs each version (HMAC-SHA256 "
            "of its name, version and digest) and workers, the router and `models promote` "
            "refuse an announcement without a valid signature. Give every process the same key "
            "(never printed)."
        ),
    )
    row_cache: int = Field(
        100_000,
        ge=1,
        description=(
            "JODIE_ROW_CACHE: most decoded rows a worker keeps in memory per table (user-state, "
            "item-state), besides those changed in the batch in progress; others are read "
            "again from its RocksDB when next used."
        ),
    )
    retire_chunk: int = Field(
        2_000,
        ge=1,
        description=(
            "JODIE_RETIRE_CHUNK: table rows a worker looks at, between two batches, while it "
            "collects the rows of epochs no message can reach any more (streams.retirement); "
            "at most that many tombstones go into one transaction."
        ),
    )
    retire_interval_s: float = Field(
        5.0,
        gt=0,
        description=(
            "JODIE_RETIRE_INTERVAL_S: how long a worker waits before it looks again at a "
            "partition whose earlier epoch still had events in progress."
        ),
    )
    web_port: int = Field(
        6066, description="JODIE_WEB_PORT: first worker's HTTP port (/metrics); worker N adds N."
    )
    query_queue: int = Field(
        64,
        ge=1,
        description=(
            "JODIE_QUERY_QUEUE: most interactive queries a worker holds waiting (or being "
            "forwarded) at once; one more is answered 503 with Retry-After at once."
        ),
    )
    query_max_wait_s: float = Field(
        0.5,
        gt=0,
        description=(
            "JODIE_QUERY_MAX_WAIT_S: an interactive query that waited longer than this for "
            "its turn is answered 503 with Retry-After instead (load shedding)."
        ),
    )
    router_commit_interval_s: float = Field(
        0.0,
        ge=0,
        description=(
            "JODIE_ROUTER_COMMIT_INTERVAL_S: least time between two of the router's "
            "transactions; events sequenced meanwhile wait and commit together (at once "
            "when they fill a batch). 0: each batch commits as soon as it is sequenced. "
            "Fewer transactions cost the broker less CPU, each event waits up to this long "
            "more (README, *The router's transaction rate*)."
        ),
    )
    commit_interval_s: float = Field(
        0.1,
        description=(
            "JODIE_COMMIT_INTERVAL_S: longest an idle worker waits for a message before it "
            "looks at its other duties; it commits one transaction per batch it takes."
        ),
    )
    worker_batch: int = Field(
        8000,
        ge=1,
        description=(
            "JODIE_WORKER_BATCH: most inbox messages a worker processes in one transaction. "
            "A worker takes what has arrived, so this bounds only a batch behind a backlog, "
            "where larger ones cost less per event: fewer model calls, changelog rows and "
            "transactions (README, *Larger batches behind a backlog*)."
        ),
    )
    worker_first_batch: int = Field(
        1000,
        ge=1,
        description=(
            "JODIE_WORKER_FIRST_BATCH: most inbox messages in a worker's first batch behind a "
            "backlog; each batch taken behind it doubles the next one's cap, up to "
            "JODIE_WORKER_BATCH, and a batch without a backlog starts again from this. The "
            "first recommendations of a backlog leave after a small batch, the rest in "
            "large ones (README, *Larger batches behind a backlog*)."
        ),
    )
    worker_overlap: bool = Field(
        True,
        description=(
            "JODIE_WORKER_OVERLAP: a worker processes its next batch while the last one's "
            "transaction commits (false: it waits for each commit, as before). Exactly once "
            "either way: a failed commit undoes both batches."
        ),
    )
    worker_lookahead: int = Field(
        8000,
        ge=0,
        description=(
            "JODIE_WORKER_LOOKAHEAD: inbox messages a worker behind a backlog holds back, so "
            "that it processes the rest in the router's order, each event's two sides "
            "together, rather than one partition's run after another (0: as they come). "
            "A worker with no backlog holds nothing back."
        ),
    )
    worker_session_timeout_ms: int = Field(
        6000,
        description=(
            "JODIE_WORKER_SESSION_TIMEOUT_MS: how long a silent worker keeps its partitions "
            "before the others take them over."
        ),
    )
    worker_transaction_timeout_ms: int = Field(
        10000,
        description=(
            "JODIE_WORKER_TRANSACTION_TIMEOUT_MS: how long a dead worker's open transaction "
            "can hold back read_committed readers of what it wrote."
        ),
    )
    recovery_timeout_s: float = Field(
        120.0,
        gt=0,
        description=(
            "JODIE_RECOVERY_TIMEOUT_S: how long the router and the workers keep retrying one "
            "step of their recovery from a broker failure (a transactional call, a new "
            "producer getting ready, the router rebuilding from interactions.log without "
            "committing) before they stop with an error for a supervisor to restart them."
        ),
    )
    switch_delay_s: float = Field(
        10.0,
        description=(
            "JODIE_SWITCH_DELAY_S: how long after a promotion the router starts the new "
            "version's epoch; the workers catch the version's states up meanwhile, while the "
            "old one serves. Shorter than their catch-up, and events wait for it."
        ),
    )
    cooccurrence: bool = Field(
        True,
        description=(
            "JODIE_COOCCURRENCE: add co-occurrence candidates (MinHash LSH over the log) to "
            "every recommendation before re-ranking, in the approximate index tiers (the exact "
            "tier ranks every item)."
        ),
    )
    cooccurrence_items: int = Field(
        10_000,
        ge=1,
        description=(
            "JODIE_COOCCURRENCE_ITEMS: most items whose recent audience the co-occurrence "
            "model keeps (the most recently touched ones); older ones are forgotten."
        ),
    )
    cooccurrence_cache: int = Field(
        10_000,
        ge=1,
        description=(
            "JODIE_COOCCURRENCE_CACHE: most items whose LSH neighbours are cached between "
            "re-queries (least recently used ones are dropped, and queried again when needed)."
        ),
    )
    feed_warmup: int = Field(
        100_000,
        ge=0,
        description=(
            "JODIE_FEED_WARMUP: how many of interactions.log's latest events a starting "
            "worker reads into its co-occurrence model (from the end, never from offset 0)."
        ),
    )
    feed_ahead: int = Field(
        20_000,
        ge=1,
        description=(
            "JODIE_FEED_AHEAD: most log events a worker holds ahead of the events it applied "
            "(the co-occurrence model never sees the future); past it the log feed pauses."
        ),
    )
    horizon_s: float | None = Field(
        None,
        description=(
            "JODIE_HORIZON_S: how far ahead recommendations project the user (seconds); "
            "default: the model's mean gap between a user's events."
        ),
    )
    candidates: int = Field(
        10, description="JODIE_CANDIDATES: items per recommendation (after re-ranking)."
    )
    index_exact_below: int = Field(
        20_000,
        ge=0,
        description=(
            "JODIE_INDEX_EXACT_BELOW: below this many items a worker ranks every item exactly; "
            "from it on, candidates come from an approximate index and are re-ranked exactly "
            "(back to exact below half of it)."
        ),
    )
    index_kind: Literal["keyed", "ivf"] = Field(
        "keyed",
        description=(
            "JODIE_INDEX_KIND: the approximate index. keyed: fast-scan IVF-PQ codes with the "
            "ranker's popularity terms folded in, lists split by popularity band and probed "
            "by a bound on the ranker's score; ivf: the plain IVF of distances alone (the "
            "index before keyed, kept for comparison)."
        ),
    )
    index_nprobe: int | None = Field(
        None,
        ge=1,
        description=(
            "JODIE_INDEX_NPROBE: lists the approximate index scans per query (more: higher "
            "recall, slower); default: the kind's (see benchmarks/retrieval.py)."
        ),
    )
    index_shortlist: int = Field(
        256,
        ge=1,
        description=(
            "JODIE_INDEX_SHORTLIST: candidates the keyed index proposes per query, scored "
            "exactly with the user's own items."
        ),
    )
    holdout_events: int = Field(
        5000,
        ge=1,
        description=(
            "JODIE_HOLDOUT_EVENTS: a retrain from the log fits on every event but this many "
            "of the newest (at most a fifth of the log), and promotes the candidate only if "
            "it ranks them at least as well as the serving version."
        ),
    )
    gc_full_every_s: float = Field(
        300.0,
        gt=0,
        description=(
            "JODIE_GC_FULL_EVERY_S: a worker runs Python's full cycle collection every this "
            "many seconds, between batches, instead of whenever its objects grew by a quarter "
            "(streams.runtime.collector: 16 % of a large worker's CPU went to those)."
        ),
    )
    derived_states: int = Field(
        20_000,
        ge=0,
        description=(
            "JODIE_DERIVED_STATES: how many partners' post-states a worker keeps per side, "
            "from the events it applied, so that a later event of that partner need not wait "
            "for its owner's message (0: always wait). About 1 KiB each."
        ),
    )
    evaluate_every: int = Field(
        10,
        ge=1,
        description=(
            "JODIE_EVALUATE_EVERY: the live evaluation ranks the events whose seq is a "
            "multiple of this (1: every event). Exact ranking scores every known item per "
            "event, about as costly as applying it; a sample keeps the stream fast."
        ),
    )
    evaluate_apart: bool = Field(
        True,
        description=(
            "JODIE_EVALUATE_APART: a worker's live evaluation ranks in a process of its own "
            "(streams.app.evaluation), beside the processing, on another core when there is "
            "one: the same ranks, written a batch later. false: inline, in the worker's "
            "transaction (one process per worker, about a sixth more CPU on its path)."
        ),
    )

    @field_validator("model_allow", mode="before")
    @classmethod
    def _split_paths(cls, value: Any) -> Any:
        # One variable, PATH-like, rather than JSON: what people write for a list of folders.
        if isinstance(value, str):
            return tuple(Path(p) for p in value.split(os.pathsep) if p)
        return value

    @field_validator("model_signing_key", mode="before")
    @classmethod
    def _no_empty_key(cls, value: Any) -> Any:
        # An empty variable is more likely a secret that failed to arrive than a wish to turn
        # signing off: refusing it keeps every process from silently accepting unsigned models.
        if value == "":
            raise ValueError("empty; unset it to turn signing off, or give the shared key")
        return value

    @property
    def bootstrap_servers(self) -> str:
        if self.bootstrap:
            return self.bootstrap
        return ",".join(f"127.0.0.1:{port}" for port, _controller in self.local_node_ports())

    def local_node_ports(self) -> list[tuple[int, int]]:
        """(client port, controller port) of each node of the local Kafka."""
        return [
            (self.broker_port + NODE_PORT_STEP * n, self.controller_port + NODE_PORT_STEP * n)
            for n in range(self.broker_nodes)
        ]

    @property
    def replication(self) -> int:
        """Replicas per partition of the declared topics."""
        return self.replication_factor or min(3, self.broker_nodes)

    @property
    def min_insync_replicas(self) -> int:
        """Replicas an acks=all write must reach: 2 from three replicas on (a write survives
        the loss of any one node, and one node down stops nothing), else 1."""
        return 2 if self.replication >= 3 else 1

    def topic(self, name: str) -> str:
        """The full name of a logical topic (``interactions`` → ``<prefix>interactions``)."""
        return f"{self.topic_prefix}{name}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment; a bad variable is a
    ``SettingsError`` naming it."""
    return read_settings()


def read_settings() -> Settings:
    """Settings read from the environment now (not cached: for code that changes it, such as
    a benchmark's scratch topic prefix); a bad variable is a ``SettingsError`` naming it."""
    try:
        return Settings()
    except ValidationError as exc:
        bad = "; ".join(
            f"JODIE_{'_'.join(str(p) for p in e['loc']).upper()}={e.get('input')!r}: {e['msg']}"
            for e in exc.errors()
        )
        raise SettingsError(bad) from None
