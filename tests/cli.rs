//! The `chatstream` binary: `generate --json` on the default model gives the golden answer
//! (with an f16 KV cache too), `--messages`, `--raw` and `--stop` work, errors print one
//! line and exit non-zero, and `bench` in process reports each level.

mod common;

use std::process::Command;

use serde_json::Value;

fn chatstream(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_chatstream"))
        .args(args)
        .output()
        .unwrap()
}

fn json_out(args: &[&str]) -> Value {
    let out = chatstream(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn generate_json_gives_the_golden_answer() {
    let golden = common::read_json(common::fixtures().join("smollm2/golden.json"));
    let conv = &golden["conversations"][0];
    let model = common::default_model();
    let prompt = conv["messages"][0]["content"].as_str().unwrap();
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--json",
    ];
    let v = json_out(&args);
    assert_eq!(v["prompt_token_ids"], conv["prompt_token_ids"]);
    assert_eq!(v["token_ids"], conv["greedy"]["new_token_ids"]);
    assert_eq!(v["text"], conv["greedy"]["text"]);
    assert_eq!(v["finish_reason"], "stop");
    assert!(v["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    // With the KV cache in f16 (opt-in, not exact), the same greedy answer.
    let half = json_out(&[&args[..], &["--kv-cache-dtype", "f16"]].concat());
    assert_eq!(half["token_ids"], conv["greedy"]["new_token_ids"]);

    // The same conversation from a --messages file, and cut by a stop string.
    let path = std::env::temp_dir().join(format!("chatstream-cli-{}.json", std::process::id()));
    std::fs::write(&path, conv["messages"].to_string()).unwrap();
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--messages",
        path.to_str().unwrap(),
        "--json",
    ];
    let mut with_stop = args.to_vec();
    with_stop.extend(["--stop", " Paris"]);
    let v = json_out(&args);
    let cut = json_out(&with_stop);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(v["token_ids"], conv["greedy"]["new_token_ids"]);
    assert_eq!(cut["text"], "The capital of France is");
    assert_eq!(cut["finish_reason"], "stop");
}

#[test]
fn raw_prompt_streams_plain_text() {
    let model = common::default_model();
    let out = chatstream(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--raw",
        "--prompt",
        "1, 2, 3, 4,",
        "--max-new-tokens",
        "6",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with(" 5"), "{text:?}");
}

#[test]
fn errors_print_one_line_and_exit_non_zero() {
    let out = chatstream(&[
        "generate",
        "--model",
        "/no/such/model.gguf",
        "--prompt",
        "hi",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("/no/such/model.gguf"), "{err}");

    let tiny = common::fixtures().join("tiny-llama");
    let out = chatstream(&[
        "generate",
        "--model",
        tiny.to_str().unwrap(),
        "--prompt",
        "hi",
        "--top-p",
        "2",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("top_p must be in (0, 1], got 2"), "{err}");
}

#[test]
fn chat_keeps_the_conversation() {
    use std::io::Write;
    let model = common::default_model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatstream"))
        .args([
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--max-new-tokens",
            "24",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"What is the capital of France? Answer in one sentence.\nAnd of Italy?\n\n")
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let answers: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(answers[0], "The capital of France is Paris.");
    // The second answer only makes sense with the first turn in the history.
    assert!(answers[1..].concat().contains("Rome"), "{text:?}");
}

#[test]
fn device_cuda_without_a_gpu_is_one_clear_error_and_auto_runs_on_cpu() {
    let model = common::default_model();
    let m = model.to_str().unwrap();
    let out = chatstream(&[
        "generate",
        "--model",
        m,
        "--device",
        "cuda",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "1",
    ]);
    if out.status.success() {
        println!("skipped: a CUDA device is present");
        return;
    }
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("--device cuda") && err.contains("CUDA"),
        "{err}"
    );
    let out = chatstream(&[
        "generate",
        "--model",
        m,
        "--device",
        "auto",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("running on CPU"));
    let out = chatstream(&[
        "generate", "--model", m, "--device", "tpu", "--prompt", "hi",
    ]);
    assert!(!out.status.success());
}

#[test]
fn bench_in_process_reports_each_level_of_a_synthetic_quantized_model() {
    let r = json_out(&[
        "bench",
        "--synthetic",
        "tiny",
        "--synthetic-format",
        "q4_1",
        "--device",
        "cpu",
        "--prompt-len",
        "8",
        "--decode-tokens",
        "40",
        "--levels",
        "1,3",
    ]);
    assert_eq!(r["model"], "synthetic:tiny:q4_1", "{r}");
    // Q4_1 blocks (the 176-wide down projection, not whole blocks, stays f32), against the
    // model all f32: 12,288 + 33,792 values a layer, two layers, and the 512 x 64 head
    let f32_bytes = 4 * 2 * (3 * 64 * 64 + 3 * 64 * 176) + 4 * 512 * 64;
    let bytes = r["bytes_per_decode_token"].as_u64().unwrap() as usize;
    assert!(bytes < f32_bytes / 2, "{bytes} bytes a token: {r}");
    let levels = r["batched_decode"].as_array().unwrap();
    let seqs: Vec<u64> = levels
        .iter()
        .map(|l| l["sequences"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 3], "{r}");
    assert_eq!(levels[0]["over_one"], 1.0, "{r}");
    assert_eq!(r["decode_tokens_per_s"], levels[0]["tokens_per_s"], "{r}");
    assert!(
        levels
            .iter()
            .all(|l| l["tokens_per_s"].as_f64().unwrap() > 0.0),
        "{r}"
    );

    // decode timed after 100 cached tokens instead of 16: each token reads 84 more
    // positions of keys and values (f32, 2 layers of 2 x 16 wide)
    let after = json_out(&[
        "bench",
        "--synthetic",
        "tiny",
        "--synthetic-format",
        "q4_1",
        "--device",
        "cpu",
        "--prompt-len",
        "8",
        "--decode-tokens",
        "40",
        "--levels",
        "1",
        "--decode-after",
        "100",
    ]);
    assert_eq!(after["decode_after"], 100, "{after}");
    assert_eq!(r["decode_after"], 16, "{r}");
    let after_bytes = after["bytes_per_decode_token"].as_u64().unwrap() as usize;
    assert_eq!(after_bytes - bytes, 2 * 4 * 84 * 2 * 32, "{after}");

    let out = chatstream(&["bench", "--synthetic", "tiny", "--synthetic-format", "q5_k"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("unknown type \"q5_k\""), "{err}");

    // past the model's 256 positions (300 decoded; 200 cached, 1 and 56 more): one clear
    // line, no panic
    for (args, says) in [
        (
            ["--prompt-len", "8", "--decode-tokens", "300"],
            "must fit the model's 256 positions",
        ),
        (
            ["--decode-after", "200", "--decode-tokens", "56"],
            "--decode-after 200 + 1 + --decode-tokens 56",
        ),
    ] {
        let mut all = vec!["bench", "--synthetic", "tiny", "--device", "cpu"];
        all.extend(args);
        let out = chatstream(&all);
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(says), "{err}");
    }
}
