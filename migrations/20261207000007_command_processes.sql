-- Processes: commands that take steps in more than one service (a registration stores the
-- password with auth, then registers the user). A process is written here before its first step
-- and deleted after its last; one still here once its claim ran out was interrupted, and the
-- owner of its aggregate's partition runs its steps again (each step is a command with an id of
-- its own, so a step that had happened is not done twice) until it is complete or undone.
CREATE TABLE command_processes (
    -- The command that began it.
    id            uuid        PRIMARY KEY,
    kind          text        NOT NULL,
    -- The aggregate whose owner runs it, and that aggregate's partition.
    aggregate_id  uuid        NOT NULL,
    partition     integer     NOT NULL,
    -- What its steps need (JSON), sealed with the aggregate's data key when it holds personal
    -- data, so an erasure leaves it unreadable.
    payload       bytea       NOT NULL,
    sealed        boolean     NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    -- Until then, one run has it (the command that began it, or a recovery), or a failed run
    -- waits out its backoff.
    claimed_until timestamptz NOT NULL,
    attempts      integer     NOT NULL DEFAULT 0,
    last_error    text
);
CREATE INDEX command_processes_due ON command_processes (kind, partition, claimed_until);
