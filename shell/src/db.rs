//! `edgechat.db` (SQLite) in the data dir: settings (the selected model) and download records. The
//! schema evolves by numbered migrations, applied in order inside one transaction and recorded in
//! `PRAGMA user_version`; a database from a newer edgechat is refused rather than damaged.

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;

/// Migration N (1-based) is MIGRATIONS[N - 1]. Append only; never edit a released one.
const MIGRATIONS: &[&str] = &[
    // 1: settings and download records
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE downloads (
         id INTEGER PRIMARY KEY,
         model TEXT NOT NULL,
         source TEXT NOT NULL,
         revision TEXT,
         started_at INTEGER NOT NULL,
         ended_at INTEGER,
         bytes INTEGER NOT NULL DEFAULT 0,
         outcome TEXT NOT NULL DEFAULT 'running'
     );",
    // 2: look-ups of a model's history
    "CREATE INDEX downloads_by_model ON downloads (model, started_at);",
];

pub fn schema_version() -> u32 {
    MIGRATIONS.len() as u32
}

pub struct Db {
    conn: Connection,
}

/// The model the user chose, with what runs it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Selection {
    pub model: String,
    pub adapter: String,
    pub runtime: String,
}

#[derive(Debug, Clone)]
pub struct DownloadRecord {
    pub model: String,
    pub revision: Option<String>,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    pub bytes: i64,
    pub outcome: String,
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl Db {
    pub fn open(path: &Path) -> Result<Db> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut db = Db { conn };
        db.migrate().with_context(|| format!("upgrading {}", path.display()))?;
        Ok(db)
    }

    fn migrate(&mut self) -> Result<()> {
        let version: u32 = self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > schema_version() {
            bail!("the database is from a newer edgechat (schema {version}; this one knows up to {})", schema_version());
        }
        let tx = self.conn.transaction()?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql).with_context(|| format!("migration {}", i + 1))?;
            tx.pragma_update(None, "user_version", (i + 1) as u32)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn version(&self) -> Result<u32> {
        Ok(self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    pub fn select(&self, selection: &Selection) -> Result<()> {
        self.conn.execute(
            "INSERT INTO settings (key, value) VALUES ('selected_model', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![serde_json::to_string(selection)?],
        )?;
        Ok(())
    }

    pub fn selected(&self) -> Result<Option<Selection>> {
        let value: Option<String> = self.conn.query_row("SELECT value FROM settings WHERE key = 'selected_model'", [], |r| r.get(0)).optional()?;
        value.map(|v| serde_json::from_str(&v).context("the stored selection is malformed")).transpose()
    }

    /// Records a download's start; returns its id for [`Db::finish_download`].
    pub fn start_download(&self, model: &str, source: &str, revision: Option<&str>) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO downloads (model, source, revision, started_at) VALUES (?1, ?2, ?3, ?4)",
            params![model, source, revision, now()],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn finish_download(&self, id: i64, bytes: u64, outcome: &str) -> Result<()> {
        self.conn.execute("UPDATE downloads SET ended_at = ?1, bytes = ?2, outcome = ?3 WHERE id = ?4", params![now(), bytes as i64, outcome, id])?;
        Ok(())
    }

    pub fn downloads(&self, model: &str) -> Result<Vec<DownloadRecord>> {
        let mut stmt = self.conn.prepare("SELECT model, revision, started_at, ended_at, bytes, outcome FROM downloads WHERE model = ?1 ORDER BY id")?;
        let rows = stmt.query_map(params![model], |r| {
            Ok(DownloadRecord { model: r.get(0)?, revision: r.get(1)?, started_at: r.get(2)?, ended_at: r.get(3)?, bytes: r.get(4)?, outcome: r.get(5)? })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_database_gets_every_migration() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("edgechat.db")).unwrap();
        assert_eq!(db.version().unwrap(), schema_version());
    }

    #[test]
    fn an_old_database_is_upgraded_keeping_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edgechat.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute("INSERT INTO downloads (model, source, started_at) VALUES ('m', 'hub:x/y@main', 1)", []).unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.version().unwrap(), schema_version());
        assert_eq!(db.downloads("m").unwrap().len(), 1);
        let indexes: i64 = db.conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'downloads_by_model'", [], |r| r.get(0)).unwrap();
        assert_eq!(indexes, 1);
    }

    #[test]
    fn a_newer_database_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edgechat.db");
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = Db::open(&path).err().unwrap();
        assert!(format!("{err:#}").contains("newer edgechat (schema 99"), "{err:#}");
        let version: u32 = Connection::open(&path).unwrap().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, 99);
    }

    #[test]
    fn selection_and_download_records_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edgechat.db");
        let selection = Selection { model: "gemma-3-270m-it".into(), adapter: "gemma".into(), runtime: "MLX (safetensors)".into() };
        {
            let db = Db::open(&path).unwrap();
            assert_eq!(db.selected().unwrap(), None);
            db.select(&selection).unwrap();
            let id = db.start_download("gemma-3-270m-it", "hub:a/b@main", Some("abc")).unwrap();
            db.finish_download(id, 1234, "complete").unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.selected().unwrap(), Some(selection));
        let records = db.downloads("gemma-3-270m-it").unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].bytes, records[0].outcome.as_str(), records[0].revision.as_deref()), (1234, "complete", Some("abc")));
        assert!(records[0].ended_at.is_some());
    }
}
