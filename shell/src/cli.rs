//! Command-line interface. Exit codes: 0 ok, 1 runtime error, 2 usage error.

use crate::commands;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "edgechat", version, about = "On-device chat with small language models")]
pub struct Cli {
    /// The tensor backend: `cpu` (ggml) or `mlx`. Default: EDGECHAT_BACKEND, else mlx on Apple Silicon
    /// (Metal) and cpu elsewhere.
    #[arg(long, global = true, value_name = "cpu|mlx")]
    backend: Option<crate::host::tensor::BackendKind>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runtime adapters: list, install signed packages, update, roll back, publish, test.
    Adapters {
        #[command(subcommand)]
        command: commands::adapters::AdaptersCommand,
    },
    /// The model catalog, as the adapters describe it.
    Models {
        /// One JSON object per model instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Render a chat into the exact prompt text the model sees.
    Prompt {
        /// A catalog id (e.g. gemma-3-270m-it) or a model directory (its config.json picks the adapter,
        /// its tokenizer_config.json supplies the chat template).
        model: String,
        /// A JSON file with an OpenAI-style message list: [{"role": "user", "content": "..."}]; `-` reads stdin.
        #[arg(long)]
        messages: PathBuf,
        /// Do not end with the opening of the assistant's turn.
        #[arg(long)]
        no_generation_prompt: bool,
    },
    /// Check the toolchain, the tensor backend (through an adapter), the data dir and disk space.
    Doctor,
    /// Take a GGUF file or a model directory into the data dir (the adapter is chosen from its architecture).
    Import {
        /// A .gguf file or a directory with config.json and .safetensors files.
        source: PathBuf,
        /// A directory with tokenizer.json (and tokenizer_config.json), if the source has none.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// The model id to register (default: the file or directory name).
        #[arg(long)]
        id: Option<String>,
        /// The precision `run` uses by default: auto (GGUF blocks as stored on the cpu backend, else f32), bf16, f16, f32, q4 or q8.
        #[arg(long)]
        dtype: Option<crate::host::weights::Precision>,
    },
    /// Stream a reply from a model (with no prompt on a terminal: `chat`).
    Run(commands::run::RunArgs),
    /// Chat in the terminal: line editing, streamed replies, slash commands, every turn saved.
    Chat(commands::chat::ChatArgs),
    /// Serve the OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models, /health.
    Serve(commands::serve::ServeArgs),
    /// Saved conversations: list, show, rm, export.
    History {
        #[command(subcommand)]
        command: Option<commands::history::HistoryCommand>,
        /// One JSON object per conversation.
        #[arg(long)]
        json: bool,
    },
    /// Download a catalog model or hub:ORG/NAME[@REVISION], resuming what an earlier pull left.
    Pull {
        model: String,
        /// Progress as JSON lines instead of a bar.
        #[arg(long)]
        json: bool,
    },
    /// Delete a downloaded or imported model's files.
    Rm { model: String },
    /// Remember a model as the selected one (shown with * in `models`).
    Select { model: String },
    /// Measure prefill and decode speed and peak memory.
    Bench {
        model: String,
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        gen_tokens: usize,
        /// auto (GGUF blocks as stored on the cpu backend, else f32), bf16, f16, f32, q4 or q8.
        #[arg(long)]
        dtype: Option<crate::host::weights::Precision>,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Instead: time to first token of a second chat turn after this many tokens of history, with
        /// the cache reused and with a fresh prefill.
        #[arg(long)]
        chat_history: Option<usize>,
        /// One JSON object instead of lines.
        #[arg(long)]
        json: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGECHAT_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // The last line of defence (docs/security.md, class 9): a panic anywhere still ends as exit code 1
    // with one line, never exit code 101 and a backtrace prompt. Panics inside adapter calls are already
    // contained per call; this covers the shell's own code outside them.
    std::panic::set_hook(Box::new(|info| tracing::debug!("panic: {info}")));
    let backend = match cli.backend.map(Ok).or_else(|| crate::host::tensor::active::from_env().transpose()) {
        Some(Ok(kind)) => kind,
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        None => crate::host::tensor::BackendKind::platform_default(),
    };
    if let (crate::host::tensor::BackendKind::Cpu, Some(why)) = (backend, crate::host::tensor::active::cpu_unavailable()) {
        eprintln!("error: {why}: use --backend mlx");
        return ExitCode::from(1);
    }
    crate::host::tensor::active::choose(backend);
    let result = std::panic::catch_unwind(|| dispatch(cli.command)).unwrap_or_else(|panic| {
        let what = panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("");
        // `println!` panics when the reader of stdout has gone (`edgechat models | head`): not a bug.
        if what.starts_with("failed printing to stdout") {
            return Err(anyhow::anyhow!("output closed early ({})", what.rsplit(": ").next().unwrap_or(what)));
        }
        Err(anyhow::anyhow!("internal error (a bug in edgechat, please report it): {what}"))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::text::printable(&format!("{e:#}"), 4000));
            ExitCode::from(1)
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Adapters { command } => commands::adapters::run(command),
        Command::Models { json } => commands::models::run(json),
        Command::Prompt { model, messages, no_generation_prompt } => commands::prompt::run(&model, &messages, !no_generation_prompt),
        Command::Doctor => commands::doctor::run(),
        Command::Import { source, tokenizer, id, dtype } => commands::import::import(commands::import::ImportArgs { source, tokenizer, id, dtype }),
        Command::Run(args) => commands::run::run(args),
        Command::Chat(args) => commands::chat::run(args, Default::default()),
        Command::History { command, json } => commands::history::run(command, json),
        Command::Serve(args) => commands::serve::run(args),
        Command::Pull { model, json } => commands::pull::pull(&model, json),
        Command::Rm { model } => commands::rm::run(&model),
        Command::Select { model } => commands::select::run(&model),
        Command::Bench { model, prompt_tokens, gen_tokens, dtype, runs, chat_history, json } => match chat_history {
            Some(history) => commands::bench::second_turn(&model, history, runs),
            None => commands::bench::bench(commands::bench::BenchArgs { model, prompt_tokens, gen_tokens, dtype, runs, json }),
        },
    }
}
