//! The PostgreSQL-backed registry: subjects, versions, schemas and compatibility levels.

use std::collections::{HashSet, VecDeque};

use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use tracing::instrument;

use crate::compatibility::{self, CompatibilityLevel, ExistingVersion};
use crate::error::RegistryError;
use crate::schema::{self, AVRO, ParsedSchema, SchemaReference};

/// A schema may pull in at most this many referenced schemas (directly or not).
const MAX_REFERENCED_SCHEMAS: usize = 256;

/// Keel's schema registry storage, a cheap-to-clone handle on a PostgreSQL pool.
///
/// Tables are `registry_*`, created by the workspace migration `20261125000001_registry.sql`.
#[derive(Debug, Clone)]
pub struct PgSchemaStore {
    pool: PgPool,
}

/// A schema as submitted to register, look up or test.
pub(crate) struct SchemaSubmission {
    pub text: String,
    pub schema_type: Option<String>,
    pub references: Vec<SchemaReference>,
}

/// A schema stored under an id.
pub(crate) struct StoredSchema {
    pub schema_type: String,
    pub schema: String,
    pub references: Vec<SchemaReference>,
}

/// A subject version with its schema.
pub(crate) struct SubjectVersion {
    pub subject: String,
    pub version: i32,
    pub id: i32,
    pub schema_type: String,
    pub schema: String,
    pub references: Vec<SchemaReference>,
}

/// A version as named in a path: a number or `latest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VersionSelector {
    Latest,
    Number(i32),
}

impl VersionSelector {
    /// Parses `latest`, `-1` (Confluent's alias for latest) or a number in `1..=i32::MAX`.
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        if text.eq_ignore_ascii_case("latest") || text == "-1" {
            return Ok(Self::Latest);
        }
        match text.parse::<i32>() {
            Ok(number) if number > 0 => Ok(Self::Number(number)),
            _ => Err(RegistryError::InvalidVersion(text.to_owned())),
        }
    }
}

/// One row of `registry_subject_versions` joined with its schema.
#[derive(sqlx::FromRow)]
struct VersionRow {
    version: i32,
    schema_id: i32,
    deleted: bool,
    schema_type: String,
    canonical: String,
    schema: String,
    schema_references: Json<Vec<SchemaReference>>,
}

impl VersionRow {
    fn is(&self, candidate: &Candidate) -> bool {
        self.canonical == candidate.parsed.normalized && self.schema_references.0 == candidate.references
    }

    fn into_subject_version(self, subject: &str) -> SubjectVersion {
        SubjectVersion {
            subject: subject.to_owned(),
            version: self.version,
            id: self.schema_id,
            schema_type: self.schema_type,
            schema: self.schema,
            references: self.schema_references.0,
        }
    }
}

/// A submission that parsed, with its references pinned to concrete versions.
struct Candidate {
    parsed: ParsedSchema,
    references: Vec<SchemaReference>,
}

impl PgSchemaStore {
    /// Wraps a pool whose database has the workspace migrations applied.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Registers `submission` under `subject` and returns its global id.
    ///
    /// The same schema already live under the subject returns its id without a new version.
    /// Registrations of one subject are serialized by a transaction-scoped advisory lock, so
    /// concurrent registrations never get the same version.
    #[instrument(skip_all, fields(subject))]
    pub(crate) async fn register(&self, subject: &str, submission: SchemaSubmission) -> Result<i32, RegistryError> {
        let candidate = {
            let mut conn = self.pool.acquire().await?;
            parse_submission(&mut conn, &submission).await?
        };
        let mut tx = self.pool.begin().await?;
        lock_subject(&mut tx, subject).await?;
        let live = subject_versions(&mut tx, subject, false).await?;
        if let Some(existing) = live.iter().rev().find(|row| row.is(&candidate)) {
            return Ok(existing.schema_id);
        }
        let level = effective_level(&mut tx, subject).await?;
        let existing = existing_versions_for(&mut tx, level, &live).await?;
        let messages = compatibility::check(level, &candidate.parsed.resolved, &existing);
        if !messages.is_empty() {
            return Err(RegistryError::Incompatible(format!(
                "Schema being registered is incompatible with an earlier schema for subject \"{subject}\" ({level}), details: [{}]",
                messages.join("; ")
            )));
        }
        let id = insert_schema(&mut tx, &candidate).await?;
        sqlx::query(
            "INSERT INTO registry_subject_versions (subject, version, schema_id)
             SELECT $1, COALESCE(MAX(version), 0) + 1, $2
             FROM registry_subject_versions WHERE subject = $1",
        )
        .bind(subject)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(subject, id, "registered schema");
        Ok(id)
    }

    /// Finds the version of `subject` whose schema is `submission`.
    #[instrument(skip_all, fields(subject))]
    pub(crate) async fn lookup(
        &self,
        subject: &str,
        submission: SchemaSubmission,
        include_deleted: bool,
    ) -> Result<SubjectVersion, RegistryError> {
        let mut conn = self.pool.acquire().await?;
        let candidate = parse_submission(&mut conn, &submission).await?;
        let rows = subject_versions(&mut conn, subject, include_deleted).await?;
        if rows.is_empty() {
            return Err(RegistryError::SubjectNotFound(subject.to_owned()));
        }
        rows.into_iter()
            .rev()
            .find(|row| row.is(&candidate))
            .map(|row| row.into_subject_version(subject))
            .ok_or_else(|| RegistryError::SchemaNotFound(format!("Schema not found under subject '{subject}'")))
    }

    /// Whether `submission` may be registered under `subject`; the reasons if not.
    ///
    /// Without `version` the subject's level decides which versions count (latest or all);
    /// with one, only that version is checked (in the level's directions).
    #[instrument(skip_all, fields(subject))]
    pub(crate) async fn test_compatibility(
        &self,
        subject: &str,
        version: Option<VersionSelector>,
        submission: SchemaSubmission,
    ) -> Result<Vec<String>, RegistryError> {
        let mut conn = self.pool.acquire().await?;
        let candidate = parse_submission(&mut conn, &submission).await?;
        let live = subject_versions(&mut conn, subject, false).await?;
        let level = effective_level(&mut conn, subject).await?;
        let against = match version {
            None => existing_versions_for(&mut conn, level, &live).await?,
            Some(selector) => {
                if live.is_empty() {
                    return Err(RegistryError::SubjectNotFound(subject.to_owned()));
                }
                let row = select_version(&live, selector).ok_or_else(|| version_not_found(subject, selector))?;
                vec![resolve_stored(&mut conn, row).await?]
            }
        };
        Ok(compatibility::check(level, &candidate.parsed.resolved, &against))
    }

    /// The schema stored under `id`, whether or not its versions are deleted.
    pub(crate) async fn schema_by_id(&self, id: i32) -> Result<StoredSchema, RegistryError> {
        let row: Option<(String, String, Json<Vec<SchemaReference>>)> =
            sqlx::query_as("SELECT schema_type, schema, schema_references FROM registry_schemas WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        let (schema_type, schema, Json(references)) = row.ok_or_else(|| schema_not_found(id))?;
        Ok(StoredSchema { schema_type, schema, references })
    }

    /// The (subject, version) pairs that use schema `id`.
    pub(crate) async fn schema_usages(
        &self,
        id: i32,
        include_deleted: bool,
    ) -> Result<Vec<(String, i32)>, RegistryError> {
        self.schema_by_id(id).await?;
        let usages = sqlx::query_as(
            "SELECT subject, version FROM registry_subject_versions
             WHERE schema_id = $1 AND ($2 OR NOT deleted) ORDER BY subject, version",
        )
        .bind(id)
        .bind(include_deleted)
        .fetch_all(&self.pool)
        .await?;
        Ok(usages)
    }

    /// All subjects with at least one (live, unless `include_deleted`) version.
    pub(crate) async fn subjects(&self, include_deleted: bool) -> Result<Vec<String>, RegistryError> {
        let subjects = sqlx::query_scalar(
            "SELECT DISTINCT subject FROM registry_subject_versions
             WHERE $1 OR NOT deleted ORDER BY subject",
        )
        .bind(include_deleted)
        .fetch_all(&self.pool)
        .await?;
        Ok(subjects)
    }

    /// The version numbers of `subject`, ascending.
    pub(crate) async fn versions(&self, subject: &str, include_deleted: bool) -> Result<Vec<i32>, RegistryError> {
        let mut conn = self.pool.acquire().await?;
        let rows = subject_versions(&mut conn, subject, include_deleted).await?;
        if rows.is_empty() {
            return Err(RegistryError::SubjectNotFound(subject.to_owned()));
        }
        Ok(rows.iter().map(|row| row.version).collect())
    }

    /// One version of `subject`.
    pub(crate) async fn version(
        &self,
        subject: &str,
        selector: VersionSelector,
        include_deleted: bool,
    ) -> Result<SubjectVersion, RegistryError> {
        let mut conn = self.pool.acquire().await?;
        let rows = subject_versions(&mut conn, subject, include_deleted).await?;
        if rows.is_empty() {
            return Err(RegistryError::SubjectNotFound(subject.to_owned()));
        }
        let mut rows = rows;
        let index = match selector {
            // "latest" means the latest live version, even when deleted ones are listed.
            VersionSelector::Latest => rows.iter().rposition(|row| !row.deleted),
            VersionSelector::Number(number) => rows.iter().position(|row| row.version == number),
        };
        index
            .map(|index| rows.swap_remove(index).into_subject_version(subject))
            .ok_or_else(|| version_not_found(subject, selector))
    }

    /// Deletes every version of `subject`: soft, or permanent for an already soft-deleted one.
    #[instrument(skip_all, fields(subject, permanent))]
    pub(crate) async fn delete_subject(&self, subject: &str, permanent: bool) -> Result<Vec<i32>, RegistryError> {
        let mut tx = self.pool.begin().await?;
        lock_subject(&mut tx, subject).await?;
        let rows = subject_versions(&mut tx, subject, true).await?;
        let live: Vec<i32> = rows.iter().filter(|row| !row.deleted).map(|row| row.version).collect();
        let deleted = if permanent {
            if rows.is_empty() {
                return Err(RegistryError::SubjectNotFound(subject.to_owned()));
            }
            if !live.is_empty() {
                return Err(RegistryError::SubjectNotSoftDeleted(subject.to_owned()));
            }
            sqlx::query("DELETE FROM registry_subject_versions WHERE subject = $1")
                .bind(subject)
                .execute(&mut *tx)
                .await?;
            rows.iter().map(|row| row.version).collect()
        } else {
            if live.is_empty() {
                return Err(RegistryError::SubjectNotFound(subject.to_owned()));
            }
            sqlx::query(
                "UPDATE registry_subject_versions SET deleted = true
                 WHERE subject = $1 AND NOT deleted",
            )
            .bind(subject)
            .execute(&mut *tx)
            .await?;
            live
        };
        tx.commit().await?;
        tracing::info!(subject, permanent, "deleted subject");
        Ok(deleted)
    }

    /// Deletes one version of `subject`: soft, or permanent for an already soft-deleted one.
    #[instrument(skip_all, fields(subject, permanent))]
    pub(crate) async fn delete_version(
        &self,
        subject: &str,
        selector: VersionSelector,
        permanent: bool,
    ) -> Result<i32, RegistryError> {
        let mut tx = self.pool.begin().await?;
        lock_subject(&mut tx, subject).await?;
        // A permanent delete targets a soft-deleted version, so it looks at deleted ones too.
        let rows = subject_versions(&mut tx, subject, permanent).await?;
        if rows.is_empty() {
            return Err(RegistryError::SubjectNotFound(subject.to_owned()));
        }
        let row = select_version(&rows, selector).ok_or_else(|| version_not_found(subject, selector))?;
        let version = row.version;
        if permanent {
            if !row.deleted {
                return Err(RegistryError::VersionNotSoftDeleted { subject: subject.to_owned(), version });
            }
            sqlx::query("DELETE FROM registry_subject_versions WHERE subject = $1 AND version = $2")
                .bind(subject)
                .bind(version)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(
                "UPDATE registry_subject_versions SET deleted = true
                 WHERE subject = $1 AND version = $2",
            )
            .bind(subject)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(version)
    }

    /// The level configured for `scope` (a subject, or `""` for the global level).
    pub(crate) async fn configured_level(&self, scope: &str) -> Result<Option<CompatibilityLevel>, RegistryError> {
        let stored: Option<String> = sqlx::query_scalar("SELECT compatibility FROM registry_config WHERE subject = $1")
            .bind(scope)
            .fetch_optional(&self.pool)
            .await?;
        Ok(stored.map(|name| stored_level(&name)))
    }

    /// Sets the level of `scope` (a subject, or `""` for the global level).
    pub(crate) async fn set_level(&self, scope: &str, level: CompatibilityLevel) -> Result<(), RegistryError> {
        sqlx::query(
            "INSERT INTO registry_config (subject, compatibility) VALUES ($1, $2)
             ON CONFLICT (subject) DO UPDATE SET compatibility = EXCLUDED.compatibility",
        )
        .bind(scope)
        .bind(level.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes the level of `scope` and returns what it was.
    pub(crate) async fn delete_level(&self, scope: &str) -> Result<Option<CompatibilityLevel>, RegistryError> {
        let stored: Option<String> =
            sqlx::query_scalar("DELETE FROM registry_config WHERE subject = $1 RETURNING compatibility")
                .bind(scope)
                .fetch_optional(&self.pool)
                .await?;
        Ok(stored.map(|name| stored_level(&name)))
    }
}

fn stored_level(name: &str) -> CompatibilityLevel {
    CompatibilityLevel::parse(name).unwrap_or_else(|| {
        tracing::warn!(level = name, "unknown stored compatibility level; using the default");
        CompatibilityLevel::DEFAULT
    })
}

fn schema_not_found(id: i32) -> RegistryError {
    RegistryError::SchemaNotFound(format!("Schema {id} not found"))
}

fn version_not_found(subject: &str, selector: VersionSelector) -> RegistryError {
    RegistryError::VersionNotFound {
        subject: subject.to_owned(),
        version: match selector {
            VersionSelector::Latest => "latest".to_owned(),
            VersionSelector::Number(number) => number.to_string(),
        },
    }
}

fn select_version(rows: &[VersionRow], selector: VersionSelector) -> Option<&VersionRow> {
    match selector {
        VersionSelector::Latest => rows.last(),
        VersionSelector::Number(number) => rows.iter().find(|row| row.version == number),
    }
}

async fn lock_subject(conn: &mut PgConnection, subject: &str) -> Result<(), RegistryError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('keel-registry'), hashtext($1))")
        .bind(subject)
        .execute(conn)
        .await?;
    Ok(())
}

/// The versions of `subject`, ascending, with their schemas.
async fn subject_versions(
    conn: &mut PgConnection,
    subject: &str,
    include_deleted: bool,
) -> Result<Vec<VersionRow>, RegistryError> {
    let rows = sqlx::query_as(
        "SELECT v.version, v.schema_id, v.deleted, s.schema_type, s.canonical, s.schema,
                s.schema_references
         FROM registry_subject_versions v JOIN registry_schemas s ON s.id = v.schema_id
         WHERE v.subject = $1 AND ($2 OR NOT v.deleted)
         ORDER BY v.version",
    )
    .bind(subject)
    .bind(include_deleted)
    .fetch_all(conn)
    .await?;
    Ok(rows)
}

/// The subject's level, else the global one, else BACKWARD.
async fn effective_level(conn: &mut PgConnection, subject: &str) -> Result<CompatibilityLevel, RegistryError> {
    let stored: Option<String> = sqlx::query_scalar(
        "SELECT compatibility FROM registry_config
         WHERE subject = $1 OR subject = ''
         ORDER BY subject = '' LIMIT 1",
    )
    .bind(subject)
    .fetch_optional(conn)
    .await?;
    Ok(stored.map_or(CompatibilityLevel::DEFAULT, |name| stored_level(&name)))
}

/// The live versions `level` checks a new schema against, parsed.
async fn existing_versions_for(
    conn: &mut PgConnection,
    level: CompatibilityLevel,
    live: &[VersionRow],
) -> Result<Vec<ExistingVersion>, RegistryError> {
    let rows: &[VersionRow] = match level {
        CompatibilityLevel::None => &[],
        level if level.is_transitive() => live,
        _ => live.split_last().map_or(&[], |(latest, _)| std::slice::from_ref(latest)),
    };
    let mut existing = Vec::with_capacity(rows.len());
    for row in rows {
        existing.push(resolve_stored(conn, row).await?);
    }
    Ok(existing)
}

/// Parses a stored version into a self-contained schema.
async fn resolve_stored(conn: &mut PgConnection, row: &VersionRow) -> Result<ExistingVersion, RegistryError> {
    let (_, referenced) = resolve_references(conn, &row.schema_references.0).await?;
    let parsed = schema::parse(&row.schema, &referenced).map_err(|reason| {
        RegistryError::Internal(format!("stored schema {} no longer parses: {reason}", row.schema_id).into())
    })?;
    Ok(ExistingVersion { version: row.version, schema: parsed.resolved })
}

/// Checks the type, pins the references and parses a submitted schema.
async fn parse_submission(conn: &mut PgConnection, submission: &SchemaSubmission) -> Result<Candidate, RegistryError> {
    if let Some(schema_type) = &submission.schema_type
        && schema_type != AVRO
    {
        return Err(RegistryError::InvalidSchema(format!(
            "Invalid schema: schema type '{schema_type}' is not supported by this registry; only AVRO is"
        )));
    }
    let (references, referenced) = resolve_references(conn, &submission.references).await?;
    let parsed = schema::parse(&submission.text, &referenced).map_err(RegistryError::InvalidSchema)?;
    Ok(Candidate { parsed, references })
}

/// Pins `references` to concrete versions and collects the texts of every schema they reach.
async fn resolve_references(
    conn: &mut PgConnection,
    references: &[SchemaReference],
) -> Result<(Vec<SchemaReference>, Vec<String>), RegistryError> {
    let mut pinned = Vec::with_capacity(references.len());
    let mut texts = Vec::new();
    let mut seen: HashSet<(String, i32)> = HashSet::new();
    let mut queue: VecDeque<(SchemaReference, bool)> = references.iter().cloned().map(|r| (r, true)).collect();
    while let Some((reference, top_level)) = queue.pop_front() {
        let row: Option<(i32, String, Json<Vec<SchemaReference>>)> = sqlx::query_as(
            "SELECT v.version, s.schema, s.schema_references
             FROM registry_subject_versions v JOIN registry_schemas s ON s.id = v.schema_id
             WHERE v.subject = $1 AND (v.version = $2 OR ($2 = -1 AND NOT v.deleted))
             ORDER BY v.version DESC LIMIT 1",
        )
        .bind(&reference.subject)
        .bind(reference.version)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((version, text, Json(nested))) = row else {
            return Err(RegistryError::InvalidSchema(format!(
                "Invalid schema: reference '{}' to subject '{}' version {} does not exist",
                reference.name, reference.subject, reference.version
            )));
        };
        if top_level {
            pinned.push(SchemaReference { version, ..reference.clone() });
        }
        if !seen.insert((reference.subject.clone(), version)) {
            continue;
        }
        if seen.len() > MAX_REFERENCED_SCHEMAS {
            return Err(RegistryError::InvalidSchema(format!(
                "Invalid schema: more than {MAX_REFERENCED_SCHEMAS} referenced schemas"
            )));
        }
        texts.push(text);
        queue.extend(nested.into_iter().map(|r| (r, false)));
    }
    Ok((pinned, texts))
}

/// Stores the candidate's schema once, globally, and returns its id.
async fn insert_schema(conn: &mut PgConnection, candidate: &Candidate) -> Result<i32, RegistryError> {
    let references =
        serde_json::to_string(&candidate.references).map_err(|error| RegistryError::Internal(Box::new(error)))?;
    let identity = format!("{AVRO}\n{}\n{references}", candidate.parsed.normalized);
    let inserted: Option<i32> = sqlx::query_scalar(
        "INSERT INTO registry_schemas
             (schema_type, fingerprint, canonical, schema, schema_references)
         VALUES ($1, encode(sha256(convert_to($2, 'UTF8')), 'hex'), $3, $4, $5::jsonb)
         ON CONFLICT (fingerprint) DO NOTHING
         RETURNING id",
    )
    .bind(AVRO)
    .bind(&identity)
    .bind(&candidate.parsed.normalized)
    .bind(&candidate.parsed.served)
    .bind(&references)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = inserted {
        return Ok(id);
    }
    // Another registration stored it first; this statement's fresh snapshot sees its commit.
    let id = sqlx::query_scalar(
        "SELECT id FROM registry_schemas
         WHERE fingerprint = encode(sha256(convert_to($1, 'UTF8')), 'hex')",
    )
    .bind(&identity)
    .fetch_one(&mut *conn)
    .await?;
    Ok(id)
}
