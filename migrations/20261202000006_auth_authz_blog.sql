-- Auth, authz and blog; personal data sealed with a key per person.

-- The data keys that seal personal data in the log ("crypto-shredding"), wrapped with the
-- installation's master key. Shredding keeps the row without the key (a tombstone), so a
-- shredded person never gets a key again.
CREATE TABLE personal_data_keys (
    subject     uuid        PRIMARY KEY,
    wrapped_key bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    shredded_at timestamptz,
    CHECK ((wrapped_key IS NULL) = (shredded_at IS NOT NULL))
);

-- Email reservations of the identity service: at most one user per address. The key is an HMAC
-- of the address (identity.email_key), so the table holds no address.
CREATE TABLE identity_email_claims (
    claim_id   uuid        PRIMARY KEY,
    user_id    uuid        NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX identity_email_claims_user ON identity_email_claims (user_id);

-- The keys that sign access tokens; the private half wrapped with auth.key_encryption_key.
CREATE TABLE auth_signing_keys (
    kid                 text        PRIMARY KEY,
    wrapped_private_key bytea       NOT NULL,
    public_key          bytea       NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    activates_at        timestamptz NOT NULL
);

-- The users read model gains the profile's bio and the account's status; personal columns may
-- be empty (erased). Every existing version's table gets the same columns, and the view is
-- recreated on the live one (a view keeps the columns it was made with).
DO $$
DECLARE
    physical text;
    live integer;
BEGIN
    FOR physical IN
        SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename ~ '^users_v[0-9]+$'
    LOOP
        EXECUTE format(
            'ALTER TABLE %I ADD COLUMN IF NOT EXISTS bio text NOT NULL DEFAULT '''',
                            ADD COLUMN IF NOT EXISTS status text NOT NULL DEFAULT ''active'',
                            ALTER COLUMN email DROP NOT NULL,
                            ALTER COLUMN display_name DROP NOT NULL',
            physical);
    END LOOP;
    SELECT live_version INTO live FROM projections WHERE name = 'users';
    IF live IS NOT NULL THEN
        EXECUTE 'DROP VIEW IF EXISTS users';
        EXECUTE format('CREATE VIEW users AS SELECT * FROM %I', 'users_v' || live);
    END IF;
END $$;
