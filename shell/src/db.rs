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
    // 3: signed adapter updates: the publisher keys trusted, and per adapter the installed version that is
    // active, the one before it (none: the built-in adapter) and the highest ever installed (rollback
    // protection survives `rollback` and `remove`)
    "CREATE TABLE trusted_keys (key_id TEXT PRIMARY KEY, public_key TEXT NOT NULL, added_at INTEGER NOT NULL);
     CREATE TABLE installed_adapters (
         name TEXT PRIMARY KEY,
         active TEXT,
         previous TEXT,
         highest TEXT NOT NULL
     );",
    // 4: saved conversations (`edgechat chat`, `edgechat history`)
    "CREATE TABLE conversations (
         id INTEGER PRIMARY KEY,
         title TEXT NOT NULL,
         model TEXT NOT NULL,
         adapter TEXT NOT NULL,
         adapter_version TEXT NOT NULL,
         settings TEXT NOT NULL,
         system TEXT,
         created_at INTEGER NOT NULL,
         updated_at INTEGER NOT NULL
     );
     CREATE TABLE messages (
         id INTEGER PRIMARY KEY,
         conversation INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
         role TEXT NOT NULL,
         content TEXT NOT NULL,
         tokens INTEGER,
         created_at INTEGER NOT NULL
     );
     CREATE INDEX messages_by_conversation ON messages (conversation, id);",
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

/// Which installed versions of one adapter are in use (see migration 3).
#[derive(Debug, Clone, PartialEq)]
pub struct InstalledAdapter {
    pub name: String,
    pub active: Option<String>,
    pub previous: Option<String>,
    pub highest: String,
}

/// A saved conversation; `messages` counts its messages when listed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ConversationRecord {
    pub id: i64,
    pub title: String,
    pub model: String,
    pub adapter: String,
    pub adapter_version: String,
    /// The chat settings, as JSON.
    pub settings: String,
    pub system: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub messages: i64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MessageRecord {
    pub role: String,
    pub content: String,
    pub tokens: Option<i64>,
    pub created_at: i64,
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
        conn.pragma_update(None, "foreign_keys", true)?;
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

/// Signed adapter updates: trusted keys, installed versions, the newest index seen.
impl Db {
    pub fn trust_key(&self, key_id: &str, public_key_hex: &str) -> Result<bool> {
        let added = self.conn.execute(
            "INSERT INTO trusted_keys (key_id, public_key, added_at) VALUES (?1, ?2, ?3) ON CONFLICT (key_id) DO NOTHING",
            params![key_id, public_key_hex, now()],
        )?;
        Ok(added == 1)
    }

    pub fn untrust_key(&self, key_id: &str) -> Result<bool> {
        Ok(self.conn.execute("DELETE FROM trusted_keys WHERE key_id = ?1", params![key_id])? == 1)
    }

    /// (key id, public key hex, added at) of every trusted key.
    pub fn trusted_keys(&self) -> Result<Vec<(String, String, i64)>> {
        let mut stmt = self.conn.prepare("SELECT key_id, public_key, added_at FROM trusted_keys ORDER BY added_at, key_id")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn installed_adapters(&self) -> Result<Vec<InstalledAdapter>> {
        let mut stmt = self.conn.prepare("SELECT name, active, previous, highest FROM installed_adapters ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok(InstalledAdapter { name: r.get(0)?, active: r.get(1)?, previous: r.get(2)?, highest: r.get(3)? }))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn installed_adapter(&self, name: &str) -> Result<Option<InstalledAdapter>> {
        Ok(self.installed_adapters()?.into_iter().find(|a| a.name == name))
    }

    /// Records an adapter's versions in one statement: the switch `install` and `rollback` make is atomic.
    pub fn set_installed_adapter(&self, state: &InstalledAdapter) -> Result<()> {
        self.conn.execute(
            "INSERT INTO installed_adapters (name, active, previous, highest) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET active = excluded.active, previous = excluded.previous, highest = excluded.highest",
            params![state.name, state.active, state.previous, state.highest],
        )?;
        Ok(())
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(self.conn.query_row("SELECT value FROM settings WHERE key = ?1", params![key], |r| r.get(0)).optional()?)
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }
}

/// Saved conversations.
impl Db {
    /// Creates the conversation (`record.id` 0) or updates its model, settings and system prompt (and
    /// its title when `retitle`). Returns its id.
    pub fn save_conversation(&self, record: &ConversationRecord, retitle: bool) -> Result<i64> {
        let r = record;
        if r.id == 0 {
            self.conn.execute(
                "INSERT INTO conversations (title, model, adapter, adapter_version, settings, system, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
                params![r.title, r.model, r.adapter, r.adapter_version, r.settings, r.system, now()],
            )?;
            return Ok(self.conn.last_insert_rowid());
        }
        let changed = self.conn.execute(
            "UPDATE conversations SET model = ?2, adapter = ?3, adapter_version = ?4, settings = ?5, system = ?6, updated_at = ?7,
                 title = CASE WHEN ?8 THEN ?9 ELSE title END WHERE id = ?1",
            params![r.id, r.model, r.adapter, r.adapter_version, r.settings, r.system, now(), retitle, r.title],
        )?;
        if changed == 0 {
            bail!("conversation {} no longer exists", r.id);
        }
        Ok(r.id)
    }

    pub fn append_message(&self, conversation: i64, m: &MessageRecord) -> Result<()> {
        self.conn.execute(
            "INSERT INTO messages (conversation, role, content, tokens, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![conversation, m.role, m.content, m.tokens, m.created_at],
        )?;
        Ok(())
    }

    /// Keeps the first `keep` messages of a conversation (a regenerated reply replaces the saved one).
    pub fn truncate_messages(&self, conversation: i64, keep: usize) -> Result<()> {
        self.conn.execute(
            "DELETE FROM messages WHERE conversation = ?1 AND id NOT IN (SELECT id FROM messages WHERE conversation = ?1 ORDER BY id LIMIT ?2)",
            params![conversation, keep as i64],
        )?;
        Ok(())
    }

    /// Every conversation, the most recently updated first.
    pub fn conversations(&self) -> Result<Vec<ConversationRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT c.id, c.title, c.model, c.adapter, c.adapter_version, c.settings, c.system, c.created_at, c.updated_at,
                    (SELECT count(*) FROM messages m WHERE m.conversation = c.id)
             FROM conversations c ORDER BY c.updated_at DESC, c.id DESC",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ConversationRecord {
                id: r.get(0)?,
                title: r.get(1)?,
                model: r.get(2)?,
                adapter: r.get(3)?,
                adapter_version: r.get(4)?,
                settings: r.get(5)?,
                system: r.get(6)?,
                created_at: r.get(7)?,
                updated_at: r.get(8)?,
                messages: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn conversation(&self, id: i64) -> Result<Option<(ConversationRecord, Vec<MessageRecord>)>> {
        let Some(record) = self.conversations()?.into_iter().find(|c| c.id == id) else { return Ok(None) };
        let mut stmt = self.conn.prepare("SELECT role, content, tokens, created_at FROM messages WHERE conversation = ?1 ORDER BY id")?;
        let rows = stmt.query_map(params![id], |r| Ok(MessageRecord { role: r.get(0)?, content: r.get(1)?, tokens: r.get(2)?, created_at: r.get(3)? }))?;
        Ok(Some((record, rows.collect::<rusqlite::Result<Vec<_>>>()?)))
    }

    pub fn delete_conversation(&self, id: i64) -> Result<bool> {
        Ok(self.conn.execute("DELETE FROM conversations WHERE id = ?1", params![id])? == 1)
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
    fn a_database_of_schema_2_gains_the_adapter_tables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edgechat.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&MIGRATIONS[..2].join("\n")).unwrap();
            conn.pragma_update(None, "user_version", 2).unwrap();
            conn.execute("INSERT INTO settings (key, value) VALUES ('k', 'v')", []).unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.setting("k").unwrap().as_deref(), Some("v"));
        assert!(db.trust_key("0123456789abcdef", "ab").unwrap());
        assert!(!db.trust_key("0123456789abcdef", "ab").unwrap(), "trusting twice adds nothing");
        let state = InstalledAdapter { name: "gemma".into(), active: Some("0.2.0".into()), previous: None, highest: "0.2.0".into() };
        db.set_installed_adapter(&state).unwrap();
        assert_eq!(db.installed_adapter("gemma").unwrap(), Some(state));
        assert!(db.untrust_key("0123456789abcdef").unwrap());
        assert!(db.trusted_keys().unwrap().is_empty());
    }

    #[test]
    fn a_database_of_schema_3_gains_conversations_keeping_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edgechat.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&MIGRATIONS[..3].join("\n")).unwrap();
            conn.pragma_update(None, "user_version", 3).unwrap();
            conn.execute("INSERT INTO trusted_keys (key_id, public_key, added_at) VALUES ('k', 'ab', 1)", []).unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.version().unwrap(), schema_version());
        assert_eq!(db.trusted_keys().unwrap().len(), 1);
        assert!(db.conversations().unwrap().is_empty());
    }

    #[test]
    fn conversations_round_trip_and_cascade() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("edgechat.db")).unwrap();
        let record = ConversationRecord {
            id: 0, title: "Paris".into(), model: "m".into(), adapter: "gemma".into(), adapter_version: "0.1.0".into(),
            settings: "{}".into(), system: Some("Be brief.".into()), created_at: 0, updated_at: 0, messages: 0,
        };
        let id = db.save_conversation(&record, false).unwrap();
        let message = MessageRecord { role: "user".into(), content: "Hi".into(), tokens: Some(2), created_at: 5 };
        db.append_message(id, &message).unwrap();
        let (saved, messages) = db.conversation(id).unwrap().unwrap();
        assert_eq!((saved.title.as_str(), saved.system.as_deref(), saved.messages), ("Paris", Some("Be brief."), 1));
        assert_eq!(messages, [message]);
        db.save_conversation(&ConversationRecord { id, title: "Lyon".into(), ..record.clone() }, true).unwrap();
        assert_eq!(db.conversations().unwrap()[0].title, "Lyon");
        assert!(db.delete_conversation(id).unwrap());
        let orphans: i64 = db.conn.query_row("SELECT count(*) FROM messages", [], |r| r.get(0)).unwrap();
        assert_eq!(orphans, 0, "messages go with their conversation");
        assert!(db.save_conversation(&ConversationRecord { id, ..record }, false).is_err());
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
