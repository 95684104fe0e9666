//! `edgechat history`: the saved conversations — list, show, rm, export (OpenAI-style messages).

use crate::db::Db;
use anyhow::{bail, Context, Result};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum HistoryCommand {
    /// One conversation's messages.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Delete a conversation.
    Rm { id: i64 },
    /// A conversation as an OpenAI-style messages list (system prompt first).
    Export { id: i64 },
}

pub fn run(command: Option<HistoryCommand>, json: bool) -> Result<()> {
    let db = Db::open(&crate::paths::Paths::resolve()?.database())?;
    match command {
        None => print_list(&db, json),
        Some(HistoryCommand::Show { id, json }) => show(&db, id, json),
        Some(HistoryCommand::Rm { id }) => {
            if !db.delete_conversation(id)? {
                bail!("no saved conversation {id}");
            }
            println!("deleted conversation {id}");
            Ok(())
        }
        Some(HistoryCommand::Export { id }) => {
            let (record, messages) = db.conversation(id)?.with_context(|| format!("no saved conversation {id}"))?;
            let system = record.system.map(|s| serde_json::json!({ "role": "system", "content": s }));
            let list: Vec<_> = system.into_iter().chain(messages.iter().map(|m| serde_json::json!({ "role": m.role, "content": m.content }))).collect();
            println!("{}", serde_json::to_string_pretty(&list)?);
            Ok(())
        }
    }
}

fn when(unix: i64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64)).to_string()
}

pub fn print_list(db: &Db, json: bool) -> Result<()> {
    let conversations = db.conversations()?;
    if json {
        for c in &conversations {
            println!("{}", serde_json::to_string(c)?);
        }
        return Ok(());
    }
    if conversations.is_empty() {
        println!("no saved conversations yet");
        return Ok(());
    }
    println!("{:>4}  {:<20}  {:<18}  {:>8}  TITLE", "ID", "UPDATED", "MODEL", "MESSAGES");
    for c in &conversations {
        println!("{:>4}  {:<20}  {:<18}  {:>8}  {}", c.id, when(c.updated_at), crate::text::printable(&c.model, 18), c.messages, crate::text::printable(&c.title, 60));
    }
    Ok(())
}

fn show(db: &Db, id: i64, json: bool) -> Result<()> {
    let (record, messages) = db.conversation(id)?.with_context(|| format!("no saved conversation {id}"))?;
    if json {
        println!("{}", serde_json::json!({ "conversation": record, "messages": messages }));
        return Ok(());
    }
    println!("conversation {} \"{}\" with {} (adapter {} {}), settings {}", record.id, record.title, record.model, record.adapter, record.adapter_version, record.settings);
    if let Some(system) = &record.system {
        println!("[system] {system}");
    }
    for m in &messages {
        let tokens = m.tokens.map(|t| format!(", {t} tokens")).unwrap_or_default();
        println!("[{} {}{tokens}]\n{}\n", m.role, when(m.created_at), m.content);
    }
    Ok(())
}
