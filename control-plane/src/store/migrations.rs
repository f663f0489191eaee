//! The SQL migrations of both backends, compiled into the binary.

use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use std::borrow::Cow;
use std::pin::Pin;

use super::Backend;

macro_rules! embed {
    ($dir:literal: $($version:literal $name:literal),+ $(,)?) => {
        &[$(($version, $name, include_str!(concat!("../../../migrations/", $dir, "/", stringify!($version), "_", $name, ".sql")))),+]
    };
}

type Embedded = &'static [(i64, &'static str, &'static str)];

const POSTGRES: Embedded = embed!("postgres": 1 "init", 2 "nodes", 3 "traces", 4 "operations", 5 "connections", 6 "gateways", 7 "trace_stages");
const SQLITE: Embedded =
    embed!("sqlite": 1 "init", 2 "nodes", 3 "traces", 4 "operations", 5 "connections", 6 "gateways", 7 "trace_stages");

#[derive(Debug)]
struct Source(Embedded);

impl MigrationSource<'static> for Source {
    fn resolve(self) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send>> {
        let migrations = self
            .0
            .iter()
            .map(|(version, name, sql)| {
                Migration::new(*version, Cow::Borrowed(*name), MigrationType::Simple, Cow::Borrowed(*sql), false)
            })
            .collect();
        Box::pin(std::future::ready(Ok(migrations)))
    }
}

pub async fn migrator(backend: Backend) -> Result<Migrator, sqlx::migrate::MigrateError> {
    Migrator::new(Source(match backend {
        Backend::Postgres => POSTGRES,
        Backend::Sqlite => SQLITE,
    }))
    .await
}
