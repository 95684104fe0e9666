//! `edgechat run`: load a model through its adapter and stream one reply; with no prompt on a terminal,
//! the same chat as `edgechat chat`.

use crate::shell::Shell;
use crate::adapter::bindings::exports::edgechat::adapter::prompt::{FormatOptions, GenerationDefaults, Message};
use crate::chat::Settings;
use crate::engine::Model;
use crate::generate::{self, Outcome, Request, SamplingParams, Stops};
use crate::host::weights::Precision;
use crate::models::{self, ModelFiles};
use anyhow::{bail, Context, Result};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// An imported model id, a catalog id (once downloaded), or a model directory / .gguf file.
    pub model: String,
    /// What to say. Without it: read stdin, or chat interactively on a terminal.
    pub prompt: Option<String>,
    /// Feed the prompt as plain text (with the tokenizer's BOS), without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Feed these token ids directly (for models without a tokenizer), e.g. 2,17,300.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["prompt", "raw"])]
    pub input_ids: Option<Vec<u32>>,
    /// A system prompt for chat.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy. Default: the model family's recommendation.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub min_p: Option<f32>,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// auto, bf16, f16, f32, q4 or q8. Default: what the import chose.
    #[arg(long)]
    pub dtype: Option<Precision>,
    /// One JSON object per generated token, then a summary.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    /// The sampling flags as chat settings (unset: the model family's default).
    fn settings(&self) -> Settings {
        Settings {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            max_tokens: Some(self.max_tokens),
            seed: self.seed,
        }
    }
}

/// Set by Ctrl-C: stops the current generation.
static CANCEL: AtomicBool = AtomicBool::new(false);
/// Whether a generation is running; Ctrl-C outside one exits.
static GENERATING: AtomicBool = AtomicBool::new(false);

pub fn run(args: RunArgs) -> Result<()> {
    if args.prompt.is_none() && args.input_ids.is_none() && std::io::stdin().is_terminal() {
        return super::chat::run(super::chat::ChatArgs { model: Some(args.model.clone()), resume: None, system: args.system.clone() }, args.settings());
    }
    let mut shell = Shell::open()?;
    let files = models::resolve(&shell, &args.model)?;
    let precision = files.precision(args.dtype)?;
    let loaded = Instant::now();
    let (mut model, tokenizer) = load(&mut shell, &files, precision)?;
    tracing::info!("loaded {} at {precision:?} in {:.2}s", args.model, loaded.elapsed().as_secs_f64());
    let _ = ctrlc::set_handler(|| {
        if GENERATING.load(Ordering::SeqCst) {
            CANCEL.store(true, Ordering::SeqCst);
        } else {
            std::process::exit(130);
        }
    });
    let mut chat = Chat { model: &mut model, tokenizer: tokenizer.as_ref(), files: &files, args: &args,  };

    if let Some(ids) = &args.input_ids {
        return chat.reply_to_tokens(ids.clone(), &[]);
    }
    let prompt = match &args.prompt {
        Some(p) => p.clone(),
        None => std::io::read_to_string(std::io::stdin()).context("reading the prompt from stdin")?,
    };
    match prompt {
        prompt if args.raw => {
            let tokenizer = tokenizer.as_ref().context("this model has no tokenizer.json: use --input-ids")?;
            let ids = tokenizer.encode(prompt.as_str(), true).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec();
            // Raw text still ends at the family's end-of-text tokens; the adapter names them with any prompt.
            let (stops, _) = chat.format(&[Message { role: "user".into(), content: String::new() }])?;
            chat.reply_to_tokens(ids, &stops)
        }
        prompt => {
            let mut history = chat.system_messages();
            history.push(Message { role: "user".into(), content: prompt });
            chat.reply(&history).map(|_| ())
        }
    }
}

/// The model and its tokenizer, with only its adapter kept loaded.
pub fn load(shell: &mut Shell, files: &ModelFiles, precision: Precision) -> Result<(Model, Option<Tokenizer>)> {
    let adapter = shell.registry.keep_only_for_architecture(&files.architecture)?;
    let model = Model::load(adapter, files.open(precision)?)?;
    Ok((model, files.tokenizer()?))
}

struct Chat<'a> {
    model: &'a mut Model,
    tokenizer: Option<&'a Tokenizer>,
    files: &'a ModelFiles,
    args: &'a RunArgs,
}

impl Chat<'_> {
    fn system_messages(&self) -> Vec<Message> {
        self.args.system.iter().map(|s| Message { role: "system".into(), content: s.clone() }).collect()
    }

    /// The formatted prompt's stop sequences and sampling defaults, and its text.
    fn format(&mut self, history: &[Message]) -> Result<(Vec<String>, (GenerationDefaults, String))> {
        let options = FormatOptions { add_generation_prompt: true, tokenizer_config: self.files.tokenizer_config.clone() };
        let formatted = self.model.format(history, &options)?;
        Ok((formatted.stop_sequences, (formatted.defaults, formatted.text)))
    }

    fn sampling(&self, defaults: Option<&GenerationDefaults>) -> SamplingParams {
        // Raw continuation (no template, so no family defaults) is greedy unless asked otherwise.
        let greedy = GenerationDefaults { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0 };
        self.args.settings().sampling(defaults.unwrap_or(&greedy))
    }

    /// Chat-formats `history`, generates the assistant's reply and returns its text.
    fn reply(&mut self, history: &[Message]) -> Result<String> {
        let (stops, (defaults, text)) = self.format(history)?;
        let tokenizer = self.tokenizer.context("this model has no tokenizer.json: use --input-ids")?;
        let ids = tokenizer.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec();
        let outcome = self.generate(ids, &stops, Some(&defaults))?;
        Ok(outcome.text)
    }

    fn reply_to_tokens(&mut self, ids: Vec<u32>, stops: &[String]) -> Result<()> {
        if ids.is_empty() {
            bail!("nothing to feed the model: the prompt is empty");
        }
        self.generate(ids, stops, None).map(|_| ())
    }

    fn generate(&mut self, ids: Vec<u32>, stops: &[String], defaults: Option<&GenerationDefaults>) -> Result<Outcome> {
        let cache = self.model.new_cache()?;
        let stops = Stops::new(stops, self.tokenizer);
        let request = Request {
            prompt: &ids,
            max_tokens: self.args.max_tokens,
            sampling: self.sampling(defaults),
            stops: &stops,
            tokenizer: self.tokenizer,
            cancel: &CANCEL,
        };
        let json = self.args.json;
        let mut out = std::io::stdout().lock();
        CANCEL.store(false, Ordering::SeqCst);
        GENERATING.store(true, Ordering::SeqCst);
        let result = generate::generate(self.model, &cache, 0, request, |token, text| {
            if json {
                let _ = writeln!(out, "{}", serde_json::json!({ "token": token, "text": text }));
            } else {
                let _ = write!(out, "{text}");
                let _ = out.flush();
            }
        });
        GENERATING.store(false, Ordering::SeqCst);
        let outcome = result?;
        if json {
            writeln!(
                out,
                "{}",
                serde_json::json!({
                    "done": true,
                    "prompt_tokens": outcome.prompt_tokens,
                    "cached_tokens": outcome.prompt_tokens - outcome.prefilled_tokens,
                    "generated_tokens": outcome.generated.len(),
                    "stop": outcome.stop,
                    "prefill_tokens_per_s": outcome.prefill_tokens_per_s(),
                    "generation_seconds": (outcome.prefill + outcome.decode).as_secs_f64(),
                    "decode_tokens_per_s": outcome.decode_tokens_per_s(),
                    "peak_rss_bytes": peak_rss_bytes(),
                })
            )?;
        } else {
            writeln!(out)?;
        }
        Ok(outcome)
    }
}

/// Peak resident memory of this process.
pub fn peak_rss_bytes() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return 0;
    }
    // SAFETY: getrusage returned 0, so the struct is initialized.
    let max = unsafe { usage.assume_init() }.ru_maxrss as u64;
    if cfg!(target_os = "macos") { max } else { max * 1024 }
}
