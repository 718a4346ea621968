-- Keel's schema registry role (keel-registry): the Confluent REST subset, backed by PostgreSQL.

-- Schemas are deduplicated globally: one row per distinct (canonical schema, references).
-- `canonical` is the normalized form compared for identity; `schema` is the text served (the
-- same, except for schemas with references, which are served as submitted). The fingerprint
-- (sha256 of type, canonical form and references) carries the uniqueness because a btree index
-- on the text itself would fail for schemas larger than a few kilobytes.
CREATE TABLE registry_schemas (
    id          serial PRIMARY KEY,
    schema_type text NOT NULL DEFAULT 'AVRO',
    fingerprint text NOT NULL UNIQUE,
    canonical   text NOT NULL,
    schema      text NOT NULL,
    schema_references jsonb NOT NULL DEFAULT '[]'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- A subject's versions; soft-deleted versions keep their number so it is never reused.
CREATE TABLE registry_subject_versions (
    subject    text NOT NULL,
    version    integer NOT NULL CHECK (version > 0),
    schema_id  integer NOT NULL REFERENCES registry_schemas (id),
    deleted    boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, version)
);

CREATE INDEX registry_subject_versions_schema_id_idx ON registry_subject_versions (schema_id);

-- Compatibility levels; the row with subject '' is the global level (no subject can be empty).
CREATE TABLE registry_config (
    subject       text PRIMARY KEY,
    compatibility text NOT NULL CHECK (compatibility IN (
        'NONE', 'BACKWARD', 'BACKWARD_TRANSITIVE', 'FORWARD', 'FORWARD_TRANSITIVE',
        'FULL', 'FULL_TRANSITIVE'))
);
