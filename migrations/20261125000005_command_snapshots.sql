-- Command services: partition snapshots and the directory of partition owners.

-- Per partition of a command topic: the snapshot rows below are complete up to next_offset.
CREATE TABLE command_snapshots (
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    taken_at    timestamptz NOT NULL,
    PRIMARY KEY (topic, partition)
);

-- One row per aggregate: its state after its last valid commit (at last_offset), its version and
-- the results of its recent command ids (for idempotent retries).
CREATE TABLE command_snapshot_aggregates (
    topic        text    NOT NULL,
    partition    integer NOT NULL,
    aggregate_id uuid    NOT NULL,
    version      bigint  NOT NULL,
    last_offset  bigint  NOT NULL,
    results      jsonb   NOT NULL,
    state        jsonb   NOT NULL,
    PRIMARY KEY (topic, partition, aggregate_id)
);

-- Who owns which partition now, so that an instance can forward a command to the owner. Written
-- by an owner once it serves the partition, removed when it lets go; a stale row (a dead owner)
-- only makes forwarding fail until the next owner writes its own.
CREATE TABLE command_owners (
    topic     text        NOT NULL,
    partition integer     NOT NULL,
    instance  uuid        NOT NULL,
    endpoint  text        NOT NULL,
    since     timestamptz NOT NULL,
    PRIMARY KEY (topic, partition)
);
