-- Projections: their checkpoints and validation state, the users read model and the audit log.

-- Where each projection is in each partition. Written in the same transaction as the rows the
-- projection derived from the records before `next_offset`.
CREATE TABLE projection_checkpoints (
    projection  text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);

-- The deterministic validation rule's state per aggregate, per projection.
CREATE TABLE projection_streams (
    projection      text    NOT NULL,
    topic           text    NOT NULL,
    aggregate_id    uuid    NOT NULL,
    version         bigint  NOT NULL,
    recent_commands uuid[]  NOT NULL,
    PRIMARY KEY (projection, topic, aggregate_id)
);

CREATE TABLE users (
    id            uuid        PRIMARY KEY,
    email         text        NOT NULL,
    display_name  text        NOT NULL,
    version       bigint      NOT NULL,
    registered_at timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);
-- Not unique: uniqueness is decided by the identity service; the read model mirrors the log.
CREATE INDEX users_email ON users (email);

-- One entry per event of every valid commit, hash-chained per topic partition.
CREATE TABLE audit_log (
    topic             text        NOT NULL,
    partition         integer     NOT NULL,
    "offset"          bigint      NOT NULL,
    event_index       integer     NOT NULL,
    sequence          bigint      NOT NULL,
    event_id          uuid        NOT NULL,
    event_type        text        NOT NULL,
    schema_version    integer     NOT NULL,
    aggregate_id      uuid        NOT NULL,
    aggregate_version bigint      NOT NULL,
    command_id        uuid        NOT NULL,
    actor             text        NOT NULL,
    occurred_at       timestamptz NOT NULL,
    correlation_id    uuid        NOT NULL,
    trace_id          text,
    payload           jsonb       NOT NULL,
    prev_hash         bytea       NOT NULL,
    hash              bytea       NOT NULL,
    PRIMARY KEY (topic, partition, "offset", event_index),
    UNIQUE (topic, partition, sequence)
);
CREATE INDEX audit_log_aggregate ON audit_log (aggregate_id, occurred_at);
CREATE INDEX audit_log_actor ON audit_log (actor, occurred_at);
CREATE INDEX audit_log_occurred_at ON audit_log (occurred_at);

-- The last link of each chain, so appending needs no scan.
CREATE TABLE audit_chain_heads (
    topic     text    NOT NULL,
    partition integer NOT NULL,
    sequence  bigint  NOT NULL,
    hash      bytea   NOT NULL,
    PRIMARY KEY (topic, partition)
);
