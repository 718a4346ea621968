//! What a projection declares: its topics, its tables, and how it applies valid commits.

use keel_topics::{CommitHeader, Topic, codec::Decoded};
use sqlx::PgConnection;

/// A valid commit, decoded, in log order.
#[derive(Debug, Clone)]
pub struct Commit {
    pub topic: Topic,
    /// The installation's full topic name.
    pub topic_name: String,
    pub partition: i32,
    pub offset: i64,
    pub header: CommitHeader,
    pub decoded: Decoded,
}

/// One table of a projection. Every version of the projection gets its own physical table
/// (`<name>_v<version>`); `view` tables are read through a view named `<name>` that points at
/// the live version.
#[derive(Debug, Clone, Copy)]
pub struct TableSpec {
    pub name: &'static str,
    /// Statements creating the table and its indexes; `{table}` stands for the physical name.
    pub ddl: &'static str,
    pub view: bool,
}

/// The physical tables of one version of a projection.
#[derive(Debug, Clone, Copy)]
pub struct Tables {
    version: i32,
}

impl Tables {
    pub fn new(version: i32) -> Self {
        Self { version }
    }

    /// The physical name of a table of this version. Names come from code, never from input.
    pub fn name(&self, table: &str) -> String {
        format!("{table}_v{}", self.version)
    }
}

/// A projection: the topics it reads, its tables, and how it applies valid commits inside the
/// runner's transaction. The runner never applies a commit twice (checkpoints commit with the
/// rows), but applying must still tolerate a dead-lettered commit being retried later.
#[async_trait::async_trait]
pub trait Projection: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Raise it when the code builds different rows from the same events: the live version then
    /// reports that it needs a rebuild.
    fn code_version(&self) -> i32;

    fn topics(&self) -> &'static [Topic];

    fn tables(&self) -> &'static [TableSpec];

    async fn apply(&self, connection: &mut PgConnection, tables: Tables, commits: &[Commit]) -> anyhow::Result<()>;
}
