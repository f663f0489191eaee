//! One fresh Postgres database per test, in the style of `#[sqlx::test]`.
//!
//! The server comes from `OMNI_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). In CI (`CI=true`) an unreachable server fails the
//! test; elsewhere the test is skipped with a printed reason.

use sqlx::{Connection, Executor, PgConnection};
use std::sync::atomic::{AtomicU32, Ordering};

const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/test";

pub fn server_url() -> String {
    std::env::var("OMNI_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_SERVER.to_owned())
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A database created for one test and dropped (connections and all) when this is dropped.
pub struct TestDatabase {
    pub url: String,
    name: String,
    server: String,
}

fn with_database(server: &str, database: &str) -> String {
    let (base, _) = server.rsplit_once('/').expect("a postgres URL has a path");
    format!("{base}/{database}")
}

impl TestDatabase {
    /// `None` when Postgres is unreachable outside CI (after printing why the test is skipped).
    pub async fn create() -> Option<TestDatabase> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let server = server_url();
        let mut conn = match PgConnection::connect(&server).await {
            Ok(conn) => conn,
            Err(e) if !in_ci() => {
                eprintln!("SKIPPED: Postgres at {server} is unreachable ({e}); set OMNI_TEST_POSTGRES_URL");
                return None;
            }
            Err(e) => panic!("Postgres at {server} is unreachable in CI: {e}"),
        };
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let name = format!("omni_test_{}_{}_{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        conn.execute(format!("CREATE DATABASE {name}").as_str()).await.expect("CREATE DATABASE");
        conn.close().await.ok();
        Some(TestDatabase { url: with_database(&server, &name), name, server })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let server = self.server.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread of our own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&server).await?;
                conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await?;
                conn.close().await
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("warning: could not drop test database {}: {e}", self.name);
        }
    }
}
