-- Versioned projections: every version of a projection has its own physical tables
-- (`users_v1`, `users_v2`, …); readers read views (`users`) that point at the live version, so a
-- rebuild fills shadow tables while the live version keeps serving, and the swap is one
-- transaction that repoints the views.

CREATE TABLE projections (
    name         text        PRIMARY KEY,
    live_version integer     NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE projection_versions (
    name         text        NOT NULL,
    version      integer     NOT NULL,
    -- The projection's code version that built it; a newer code version needs a rebuild.
    code_version integer     NOT NULL,
    state        text        NOT NULL CHECK (state IN ('building', 'live', 'retired', 'dropped')),
    -- Where applying starts, per partition: {"partition": offset}; earlier records only feed the
    -- validation state.
    apply_from   jsonb       NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    live_at      timestamptz,
    retired_at   timestamptz,
    drop_after   timestamptz,
    stopped      boolean     NOT NULL DEFAULT false,
    last_error   text,
    last_error_at timestamptz,
    PRIMARY KEY (name, version)
);

-- Checkpoints and validation state belong to a version.
ALTER TABLE projection_checkpoints ADD COLUMN projection_version integer NOT NULL DEFAULT 1;
ALTER TABLE projection_checkpoints DROP CONSTRAINT projection_checkpoints_pkey;
ALTER TABLE projection_checkpoints ADD PRIMARY KEY (projection, projection_version, topic, partition);
ALTER TABLE projection_checkpoints ALTER COLUMN projection_version DROP DEFAULT;

ALTER TABLE projection_streams ADD COLUMN projection_version integer NOT NULL DEFAULT 1;
ALTER TABLE projection_streams DROP CONSTRAINT projection_streams_pkey;
ALTER TABLE projection_streams ADD PRIMARY KEY (projection, projection_version, topic, aggregate_id);
ALTER TABLE projection_streams ALTER COLUMN projection_version DROP DEFAULT;

-- The tables of version 1 keep their data; the names readers use become views.
ALTER TABLE users RENAME TO users_v1;
ALTER INDEX users_pkey RENAME TO users_v1_pkey;
ALTER INDEX users_email RENAME TO users_v1_email;
CREATE VIEW users AS SELECT * FROM users_v1;

ALTER TABLE audit_log RENAME TO audit_log_v1;
ALTER TABLE audit_chain_heads RENAME TO audit_chain_heads_v1;
CREATE VIEW audit_log AS SELECT * FROM audit_log_v1;

INSERT INTO projections (name, live_version) VALUES ('users', 1), ('audit', 1);
INSERT INTO projection_versions (name, version, code_version, state, live_at)
VALUES ('users', 1, 1, 'live', now()), ('audit', 1, 1, 'live', now());

-- Records a projection could not apply; the record itself stays in its topic and is also
-- published to the dead-letter topic.
CREATE TABLE projection_dead_letters (
    projection      text        NOT NULL,
    version         integer     NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL,
    "offset"        bigint      NOT NULL,
    error           text        NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    retried_at      timestamptz,
    resolved_at     timestamptz,
    PRIMARY KEY (projection, version, topic, partition, "offset")
);
