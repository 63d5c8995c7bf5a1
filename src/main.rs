//! The `chatstream` command line: `generate` (one answer, streamed to stdout or as JSON)
//! and `chat` (a console conversation). Errors print one line and exit non-zero.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use chatstream::backend::cpu::Cpu;
use chatstream::engine::generate::{Engine, GenerateRequest, Generator};
use chatstream::{ChatMessage, Model, SamplingParams};

/// Where `scripts/fetch-model.sh` puts the default model.
const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(
    name = "chatstream",
    version,
    about = "Streaming chat for Llama-family models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate one answer and stream it to stdout.
    Generate(GenerateArgs),
    /// Chat with the model in the console, keeping the conversation.
    Chat(ChatArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face model folder or a .gguf file.
    #[arg(long, env = "CHATSTREAM_MODEL", default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, env = "CHATSTREAM_THREADS")]
    threads: Option<usize>,
    /// Tokens of context (prompt plus answer) to allocate the KV cache for.
    #[arg(long, env = "CHATSTREAM_CONTEXT_LEN", default_value_t = 4096)]
    context_len: usize,
}

#[derive(Args)]
struct SamplingArgs {
    /// Most new tokens.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Min-p (0 = off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Seed for sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-turn tokens.
    #[arg(long)]
    ignore_eos: bool,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The user's message.
    #[arg(
        long,
        conflicts_with = "messages",
        required_unless_present = "messages"
    )]
    prompt: Option<String>,
    /// A JSON file with an array of {"role","content"} messages.
    #[arg(long)]
    messages: Option<PathBuf>,
    /// A system message put first.
    #[arg(long)]
    system: Option<String>,
    /// Feed --prompt as raw text, without the chat template.
    #[arg(long, requires = "prompt")]
    raw: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// A system message for the conversation.
    #[arg(long)]
    system: Option<String>,
}

fn load(args: &ModelArgs) -> Result<Generator<Cpu>> {
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up threads")?;
    }
    let model =
        Model::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let engine = Arc::new(Engine::new(model, Cpu));
    Ok(Generator::new(engine, args.context_len))
}

fn generate(a: GenerateArgs) -> Result<()> {
    let mut gen = load(&a.model)?;
    let model = &gen.engine().model;
    let prompt_ids = if a.raw {
        let text = a.prompt.as_deref().unwrap_or_default();
        model
            .tokenizer
            .encode(text, true)
            .map_err(anyhow::Error::msg)?
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage::new("system", s));
        }
        match (&a.prompt, &a.messages) {
            (Some(p), _) => messages.push(ChatMessage::new("user", p)),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let m: Vec<ChatMessage> = serde_json::from_str(&text).with_context(|| {
                    format!("{}: expected [{{\"role\",\"content\"}}]", path.display())
                })?;
                messages.extend(m);
            }
            (None, None) => bail!("give --prompt or --messages"),
        }
        model.encode_chat(&messages)?
    };
    let req = GenerateRequest {
        prompt_ids,
        max_new_tokens: a.sampling.max_new_tokens,
        sampling: a.sampling.params(),
        stop: a.sampling.stop.clone(),
        ignore_eos: a.sampling.ignore_eos,
    };
    let stdout = std::io::stdout();
    let json = a.json;
    let out = gen.generate(&req, &mut |piece| {
        if json {
            return true;
        }
        let mut lock = stdout.lock();
        // A closed stdout (e.g. piped into `head`) ends generation quietly.
        lock.write_all(piece.as_bytes())
            .and_then(|_| lock.flush())
            .is_ok()
    })?;
    if json {
        let v = serde_json::json!({
            "prompt_token_ids": req.prompt_ids,
            "token_ids": out.token_ids,
            "text": out.text,
            "finish_reason": out.finish_reason.as_str(),
            "prefill_tokens_per_s": out.prefill_tokens_per_s,
            "decode_tokens_per_s": out.decode_tokens_per_s,
        });
        println!("{v}");
    } else {
        println!();
    }
    Ok(())
}

fn chat(a: ChatArgs) -> Result<()> {
    let mut gen = load(&a.model)?;
    let mut history = Vec::new();
    if let Some(s) = &a.system {
        history.push(ChatMessage::new("system", s));
    }
    eprintln!(
        "chatstream: {} loaded. Type a message; an empty line or Ctrl-D quits, /clear forgets.",
        gen.engine().model.name
    );
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line == "/clear" {
            history.truncate(usize::from(a.system.is_some()));
            continue;
        }
        history.push(ChatMessage::new("user", line));
        let prompt_ids = gen.engine().model.encode_chat(&history)?;
        let req = GenerateRequest {
            prompt_ids,
            max_new_tokens: a.sampling.max_new_tokens,
            sampling: a.sampling.params(),
            stop: a.sampling.stop.clone(),
            ignore_eos: a.sampling.ignore_eos,
        };
        let out = gen.generate(&req, &mut |piece| {
            let mut lock = stdout.lock();
            lock.write_all(piece.as_bytes())
                .and_then(|_| lock.flush())
                .is_ok()
        });
        println!();
        match out {
            Ok(out) => history.push(ChatMessage::new("assistant", &out.text)),
            Err(e) => {
                history.pop();
                eprintln!("error: {e}");
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::Chat(a) => chat(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatstream: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
