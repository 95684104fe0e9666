//! `edgechat chat`: a terminal chat over [`ChatSession`]: a line editor with history across sessions,
//! `"""` for multi-line input, streamed replies, slash commands, and every turn saved as it completes.

use crate::chat::{ChatSession, Event, LoadedModel, Settings};
use crate::shell::Shell;
use anyhow::{bail, Context, Result};
use rustyline::error::ReadlineError;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    /// A model id (imported or downloaded) or directory; default: the resumed conversation's model, else
    /// the selected one (`edgechat select`).
    pub model: Option<String>,
    /// Continue the last conversation, or the one with this id (`edgechat history`).
    #[arg(long, num_args = 0..=1)]
    pub resume: Option<Option<i64>>,
    /// The system prompt.
    #[arg(long)]
    pub system: Option<String>,
}

/// Set by Ctrl-C while a reply streams: stops it after the current token.
static CANCEL: AtomicBool = AtomicBool::new(false);
static GENERATING: AtomicBool = AtomicBool::new(false);

const HELP: &str = "\
/help                 this list
/system TEXT          set the system prompt (empty: none)
/set NAME VALUE       temperature, top_p, top_k, min_p, repetition_penalty, max_tokens, seed
/show                 model, adapter, settings, context used
/model ID             switch model (the conversation continues)
/clear                start a new conversation
/regen                replace the last reply
/save [TITLE]         name this conversation (every turn is already saved)
/load ID              continue a saved conversation
/list                 saved conversations
/stats                speed and cache use of the last reply
/bye                  quit (also Ctrl-D)
\"\"\" starts and ends a multi-line message; Ctrl-C stops a reply.";

pub fn run(args: ChatArgs, settings: Settings) -> Result<()> {
    let shell = Shell::open()?;
    let resume = match args.resume {
        Some(Some(id)) => Some(id),
        Some(None) => Some(shell.db.conversations()?.first().map(|c| c.id).context("there is no saved conversation to resume")?),
        None => None,
    };
    let model_id = match (&args.model, resume) {
        (Some(model), _) => model.clone(),
        (None, Some(id)) => shell.db.conversation(id)?.with_context(|| format!("no saved conversation {id}"))?.0.model,
        (None, None) => shell.db.selected()?.map(|s| s.model).context("name a model (or select one with `edgechat select`)")?,
    };
    let loaded = load_with_spinner(&shell, &model_id)?;
    let mut session = match resume {
        Some(id) => ChatSession::resume(loaded, &shell.db, id)?,
        None => {
            let mut session = ChatSession::new(loaded, None);
            session.settings = settings;
            session
        }
    };
    if args.system.is_some() {
        session.system = args.system;
    }
    let _ = ctrlc::set_handler(|| {
        if GENERATING.load(Ordering::SeqCst) {
            CANCEL.store(true, Ordering::SeqCst);
        } else {
            std::process::exit(130);
        }
    });
    Chat { shell: &shell, session }.repl()
}

fn load_with_spinner(shell: &Shell, model: &str) -> Result<LoadedModel> {
    let spinner = spinner(&format!("loading {model}"));
    let loaded = LoadedModel::load(shell, model, None);
    spinner.finish_and_clear();
    loaded
}

fn spinner(message: &str) -> indicatif::ProgressBar {
    let spinner = indicatif::ProgressBar::new_spinner().with_message(message.to_owned());
    spinner.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    spinner.enable_steady_tick(Duration::from_millis(100));
    spinner
}

struct Chat<'a> {
    shell: &'a Shell,
    session: ChatSession,
}

enum Next {
    Continue,
    Quit,
}

impl Chat<'_> {
    fn repl(&mut self) -> Result<()> {
        let mut editor = rustyline::DefaultEditor::new().context("starting the line editor")?;
        let history = self.shell.paths.data.join("chat_history.txt");
        let _ = editor.load_history(&history);
        eprintln!("Chatting with {} ({} {}). /help for commands, Ctrl-D to quit.", self.session.model.id, self.session.model.adapter, self.session.model.adapter_version);
        if !self.session.turns.is_empty() {
            eprintln!("(resumed conversation {} with {} messages)", self.session.conversation.unwrap_or(0), self.session.turns.len());
        }
        loop {
            let line = match read_message(&mut editor) {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(e) => return Err(e),
            };
            let _ = editor.add_history_entry(line.as_str());
            let outcome = if let Some(command) = line.strip_prefix('/') { self.command(command) } else { self.send(&line).map(|_| Next::Continue) };
            match outcome {
                Ok(Next::Continue) => {}
                Ok(Next::Quit) => break,
                Err(e) => eprintln!("error: {}", crate::text::printable(&format!("{e:#}"), 2000)),
            }
        }
        let _ = std::fs::create_dir_all(&self.shell.paths.data);
        let _ = editor.save_history(&history);
        Ok(())
    }

    fn send(&mut self, text: &str) -> Result<()> {
        self.stream(|session, cancel, on_event| session.send(text, cancel, on_event))
    }

    /// Runs one reply with a spinner until the first text, streaming it to stdout, then saves the turn.
    fn stream(&mut self, reply: impl FnOnce(&mut ChatSession, &AtomicBool, &mut dyn FnMut(Event)) -> Result<crate::chat::TurnStats>) -> Result<()> {
        let mut spinner = Some(spinner(""));
        let mut out = std::io::stdout().lock();
        CANCEL.store(false, Ordering::SeqCst);
        GENERATING.store(true, Ordering::SeqCst);
        let result = reply(&mut self.session, &CANCEL, &mut |event| {
            if let Some(s) = spinner.take() {
                s.finish_and_clear();
            }
            match event {
                Event::Text(text) => {
                    let _ = write!(out, "{text}");
                    let _ = out.flush();
                }
                Event::Dropped { turns } => eprintln!("(the conversation outgrew the context: its oldest {turns} messages are left out)"),
            }
        });
        GENERATING.store(false, Ordering::SeqCst);
        if let Some(s) = spinner.take() {
            s.finish_and_clear();
        }
        let stats = result?;
        writeln!(out)?;
        if stats.stop == crate::generate::StopReason::Cancelled {
            eprintln!("(stopped)");
        }
        self.session.save(&self.shell.db, None).context("saving the conversation")?;
        Ok(())
    }

    fn command(&mut self, command: &str) -> Result<Next> {
        let (name, arg) = command.split_once(char::is_whitespace).map_or((command, ""), |(n, a)| (n, a.trim()));
        match name {
            "help" | "?" => println!("{HELP}"),
            "bye" | "exit" | "quit" => return Ok(Next::Quit),
            "system" => {
                self.session.system = Some(arg.to_owned()).filter(|s| !s.is_empty());
                self.save()?;
                println!("system prompt {}", if arg.is_empty() { "cleared" } else { "set" });
            }
            "set" => {
                let (key, value) = arg.split_once(char::is_whitespace).context("usage: /set NAME VALUE")?;
                self.session.settings.set(key, value.trim())?;
                self.save()?;
            }
            "show" => self.show()?,
            "model" => {
                if arg.is_empty() {
                    bail!("usage: /model ID");
                }
                self.session.model = load_with_spinner(self.shell, arg)?;
                println!("now chatting with {}", self.session.model.id);
            }
            "clear" => {
                self.session.clear();
                println!("new conversation");
            }
            "regen" => self.stream(|session, cancel, on_event| session.regenerate(cancel, on_event))?,
            "save" => {
                let id = self.session.save(&self.shell.db, Some(arg).filter(|t| !t.is_empty()))?;
                println!("saved as conversation {id}");
            }
            "load" => {
                let id: i64 = arg.parse().context("usage: /load ID (see /list)")?;
                self.session.load_conversation(&self.shell.db, id)?;
                println!("continuing conversation {id} ({} messages)", self.session.turns.len());
            }
            "list" => super::history::print_list(&self.shell.db, false)?,
            "stats" => match &self.session.last {
                Some(s) => println!(
                    "prefill {:.1} tok/s, decode {:.1} tok/s, first token after {:.0} ms; {} prompt tokens of which {} came from the cache; {} generated",
                    s.prefill_tokens_per_s,
                    s.decode_tokens_per_s,
                    s.time_to_first_token.as_secs_f64() * 1e3,
                    s.prompt_tokens,
                    s.cached_tokens,
                    s.completion_tokens
                ),
                None => println!("no reply yet"),
            },
            other => bail!("unknown command /{other} (/help lists them)"),
        }
        Ok(Next::Continue)
    }

    fn save(&mut self) -> Result<()> {
        if self.session.conversation.is_some() {
            self.session.save(&self.shell.db, None)?;
        }
        Ok(())
    }

    fn show(&mut self) -> Result<()> {
        let used = self.session.context_used()?;
        let s = &self.session;
        println!("model     {} ({}), adapter {} {}", s.model.id, s.model.family, s.model.adapter, s.model.adapter_version);
        println!("provider  {}", s.model.provider.as_deref().unwrap_or("(not in the catalog)"));
        println!("context   {used} of {} tokens used; {} cached", s.model.context_length, s.model.cached_tokens());
        println!("system    {}", s.system.as_deref().unwrap_or("(none)"));
        println!("settings  {} (unset: the model family's default)", serde_json::to_string(&s.settings)?);
        match s.conversation {
            Some(id) => println!("saved as  conversation {id}"),
            None => println!("saved as  (not yet)"),
        }
        Ok(())
    }
}

/// Reads one message: a line, or with `"""` several lines up to a closing `"""`. None at Ctrl-D.
fn read_message(editor: &mut rustyline::DefaultEditor) -> Result<Option<String>> {
    loop {
        let line = match editor.readline(">>> ") {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => return Ok(None),
            Err(e) => return Err(e).context("reading input"),
        };
        let Some(first) = line.trim_start().strip_prefix("\"\"\"") else {
            if line.trim().is_empty() {
                continue;
            }
            return Ok(Some(line));
        };
        if let Some(whole) = first.strip_suffix("\"\"\"") {
            return Ok(Some(whole.to_owned()));
        }
        let mut lines = vec![first.to_owned()];
        loop {
            match editor.readline("... ") {
                Ok(more) => match more.strip_suffix("\"\"\"") {
                    Some(last) => {
                        lines.push(last.to_owned());
                        return Ok(Some(lines.join("\n").trim_matches('\n').to_owned()));
                    }
                    None => lines.push(more),
                },
                Err(ReadlineError::Interrupted) => break,
                Err(ReadlineError::Eof) => return Ok(None),
                Err(e) => return Err(e).context("reading input"),
            }
        }
    }
}
