//! Loading errors name the problem: a missing tensor, a wrong shape, a wrong dtype, a
//! truncated safetensors or GGUF file, an unsupported architecture, a missing file. Each is
//! an error value (never a panic) whose message names the tensor, file or field.

mod common;

use std::path::{Path, PathBuf};

use chatstream::Model;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

/// A fresh copy of the tiny-llama folder in a temporary directory.
fn tiny_copy(tag: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("chatstream-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(common::fixtures().join("tiny-llama")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    TempDir(dir)
}

fn load_err(path: &Path) -> String {
    match Model::load(path) {
        Ok(_) => panic!("{} loaded, expected an error", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites model.safetensors through `edit(name, dtype, shape, bytes)`; `None` drops it.
fn rewrite(
    dir: &Path,
    edit: impl Fn(&str, Dtype, Vec<usize>, &[u8]) -> Option<(Dtype, Vec<usize>, Vec<u8>)>,
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(name, v)| {
            edit(&name, v.dtype(), v.shape().to_vec(), v.data()).map(|(d, s, b)| (name, d, s, b))
        })
        .collect();
    let views: Vec<(String, TensorView)> = kept
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(&path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

const VICTIM: &str = "model.layers.1.mlp.up_proj.weight";

#[test]
fn missing_tensor_is_named() {
    let dir = tiny_copy("missing");
    rewrite(&dir, |n, d, s, b| (n != VICTIM).then(|| (d, s, b.to_vec())));
    let e = load_err(&dir);
    assert!(e.contains("missing tensor") && e.contains(VICTIM), "{e}");
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let dir = tiny_copy("shape");
    rewrite(&dir, |n, d, mut s, b| {
        if n == VICTIM {
            s[0] -= 1;
            return Some((d, s, b[..b.len() - 64 * 4].to_vec()));
        }
        Some((d, s, b.to_vec()))
    });
    let e = load_err(&dir);
    assert!(
        e.contains(VICTIM) && e.contains("[175, 64]") && e.contains("[176, 64]"),
        "{e}"
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = tiny_copy("dtype");
    rewrite(&dir, |n, d, s, b| {
        if n == VICTIM {
            return Some((Dtype::I32, s, b.to_vec()));
        }
        Some((d, s, b.to_vec()))
    });
    let e = load_err(&dir);
    assert!(e.contains(VICTIM) && e.contains("I32"), "{e}");
}

/// Every tensor of the folder rewritten as `dtype`, each value through `round`.
fn rewrite_as(dir: &Path, dtype: Dtype, round: fn(f32) -> Vec<u8>) {
    rewrite(dir, |_, _, s, b| {
        let out: Vec<u8> = b
            .chunks_exact(4)
            .flat_map(|c| round(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        Some((dtype, s, out))
    });
}

/// Logits of a 24-token prompt (every position: prefill's SGEMM), then of 4 decode steps.
fn logits_of(model: &Model) -> Vec<f32> {
    use chatstream::backend::{cpu::Cpu, Backend};
    use chatstream::engine::forward::{Logits, RunState, Transformer};
    use chatstream::engine::kv_cache::KvCache;
    let t = Transformer::new(Cpu, &model.config, &model.weights);
    let vocab = t.cfg.vocab_size;
    let prompt: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % vocab as u32).collect();
    let mut st = RunState::new(&t, prompt.len(), prompt.len());
    let mut kv = KvCache::new(&Cpu, &t.cfg, 64);
    let (mut all, mut step) = (Vec::new(), Vec::new());
    t.forward(&mut st, &mut kv, &prompt, Logits::All, None)
        .unwrap();
    Cpu.read(st.logits(), 0..prompt.len() * vocab, &mut all);
    for tok in [3, 141, 59, 26] {
        t.forward(&mut st, &mut kv, &[tok], Logits::Last, None)
            .unwrap();
        Cpu.read(st.logits(), 0..vocab, &mut step);
        all.extend_from_slice(&step);
    }
    all
}

#[test]
fn half_precision_matrices_stay_as_stored_and_compute_as_their_f32_values() {
    use chatstream::model::dequant::BlockFormat;
    type Round = fn(f32) -> Vec<u8>;
    let cases: [(Dtype, BlockFormat, Round, Round); 2] = [
        (
            Dtype::BF16,
            BlockFormat::Bf16,
            |v| half::bf16::from_f32(v).to_le_bytes().to_vec(),
            |v| half::bf16::from_f32(v).to_f32().to_le_bytes().to_vec(),
        ),
        (
            Dtype::F16,
            BlockFormat::F16,
            |v| half::f16::from_f32(v).to_le_bytes().to_vec(),
            |v| half::f16::from_f32(v).to_f32().to_le_bytes().to_vec(),
        ),
    ];
    for (dtype, format, to_half, through_half) in cases {
        let (half_dir, wide_dir) = (tiny_copy("half"), tiny_copy("wide"));
        rewrite_as(&half_dir, dtype, to_half);
        rewrite_as(&wide_dir, Dtype::F32, through_half);
        let (half, wide) = (
            Model::load(&half_dir).unwrap(),
            Model::load(&wide_dir).unwrap(),
        );
        for (h, w) in [
            (&half.weights.layers[1].w_up, &wide.weights.layers[1].w_up),
            (&half.weights.embed, &wide.weights.embed),
        ] {
            let q = h.quant.as_ref().expect("kept as stored");
            assert!(q.format == format && h.data.is_empty(), "{format:?}");
            assert!(
                w.quant.is_none() && w.data[..] == h.to_f32()[..],
                "{format:?}"
            );
        }
        // down_proj's rows of 176 are not whole blocks of 32: widened at load
        let down = &half.weights.layers[1].w_down;
        assert!(down.quant.is_none() && down.data[..] == wide.weights.layers[1].w_down.data[..]);
        common::assert_close(
            &format!("{format:?} logits"),
            &logits_of(&half),
            &logits_of(&wide),
            1e-4,
        );
    }
}

#[test]
fn truncated_safetensors_is_an_error() {
    let dir = tiny_copy("trunc");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn unsupported_architecture_is_refused_by_name() {
    let dir = tiny_copy("arch");
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("unsupported architecture 'gpt_neox'"), "{e}");
}

#[test]
fn missing_files_are_named() {
    let dir = tiny_copy("nofile");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("tokenizer.json") && e.contains("not found"),
        "{e}"
    );
    let e = load_err(&dir.join("no-such-model.gguf"));
    assert!(e.contains("no-such-model.gguf"), "{e}");
}

#[test]
fn truncated_or_corrupt_gguf_is_an_error() {
    let bytes = std::fs::read(common::default_model()).unwrap();
    let dir = tiny_copy("gguf");
    let path = dir.join("cut.gguf");
    // Cut inside the tensor data: the directory parses, a tensor lies past the end.
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&path);
    assert!(e.contains("cut.gguf") && e.contains("past the end"), "{e}");
    // Cut inside the metadata, and a file that is not GGUF at all.
    std::fs::write(&path, &bytes[..100_000]).unwrap();
    let e = load_err(&path);
    assert!(e.contains("corrupt") && e.contains("truncated"), "{e}");
    std::fs::write(&path, b"not a model").unwrap();
    assert!(load_err(&path).contains("bad magic"));
}

#[test]
fn sharded_folder_loads_like_the_single_file() {
    let dir = tiny_copy("shards");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut shards: [Vec<(String, TensorView)>; 2] = [Vec::new(), Vec::new()];
    let mut weight_map = serde_json::Map::new();
    for (i, (name, view)) in st.tensors().into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(name.clone(), file.into());
        shards[i % 2].push((name, view));
    }
    for (i, shard) in shards.into_iter().enumerate() {
        let out = dir.join(format!("model-0000{}-of-00002.safetensors", i + 1));
        std::fs::write(out, safetensors::tensor::serialize(shard, None).unwrap()).unwrap();
    }
    std::fs::remove_file(&path).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = Model::load(&dir).unwrap();
    let single = Model::load(&common::fixtures().join("tiny-llama")).unwrap();
    assert_eq!(
        sharded.weights.layers[1].w_up.data,
        single.weights.layers[1].w_up.data
    );
    assert_eq!(sharded.weights.output().data, single.weights.output().data);
}

#[test]
fn chat_template_jinja_is_preferred_over_tokenizer_config() {
    let dir = tiny_copy("jinja");
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let model = Model::load(&dir).unwrap();
    let text = model
        .template
        .render(&[chatstream::ChatMessage::new("user", "hi")], true)
        .unwrap();
    assert_eq!(text, "[user]hi");
}
