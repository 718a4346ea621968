-- Projection workers look up the validation state of a batch's aggregates with
-- `aggregate_id = ANY(…)`. With the key led by (projection, version, topic), a planner without
-- fresh statistics (autovacuum off, or a new version's table) matched the prefix and filtered
-- every row of the projection. Leading with the aggregate id makes the lookup an index scan
-- whatever the statistics say.
ALTER TABLE projection_streams DROP CONSTRAINT projection_streams_pkey;
ALTER TABLE projection_streams ADD PRIMARY KEY (aggregate_id, topic, projection, projection_version);
