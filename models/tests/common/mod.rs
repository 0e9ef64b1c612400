//! Shared by the encoder tests: the real encoders, fetched on first use.

use std::path::PathBuf;

/// The folder of encoder `name` (`data/encoders/NAME`), fetched (digest-pinned) by
/// `scripts/fetch_encoder.py` on first use, as the end-to-end tests fetch the corpus;
/// one fetch at a time.
pub fn encoder_dir(name: &str) -> PathBuf {
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = FETCH.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join("data/encoders").join(name);
    let spec = maeum_models::encoder::known(name).expect("a catalogue encoder");
    if !dir.join(spec.format().weights()).exists() {
        let status = std::process::Command::new("python3")
            .arg(root.join("scripts/fetch_encoder.py"))
            .args(["--encoder", name, "--out"])
            .arg(&dir)
            .arg("--cache")
            .arg(root.join("data/cache"))
            .status()
            .unwrap_or_else(|e| panic!("running scripts/fetch_encoder.py: {e}"));
        assert!(status.success(), "scripts/fetch_encoder.py failed ({status}); the real encoder is required");
    }
    dir
}

/// A reference table written by `scripts/encoder_reference.py` or `scripts/e5_reference.py`.
#[derive(serde::Deserialize)]
pub struct Reference {
    pub model_sha256: String,
    pub max_tokens: usize,
    pub dim: usize,
    pub sentences: Vec<Sentence>,
}

#[derive(serde::Deserialize)]
pub struct Sentence {
    pub text: String,
    pub ids: Vec<u32>,
    pub embedding: Vec<f32>,
}

/// `tests/data/FILE`.
pub fn reference(file: &str) -> Reference {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(file);
    serde_json::from_slice(&std::fs::read(&path).expect("reference table")).expect("reference json")
}

/// Compares `enc` with `want`: the same token ids, every vector within 1e-4 cosine and
/// `max_diff` per coordinate, batched (padded to the longest) and alone. Returns the
/// largest coordinate difference.
pub fn check_against(enc: &maeum_models::encoder::Encoder, want: &Reference, max_diff: f32) -> f32 {
    use maeum_models::encoder::cosine;
    assert_eq!(enc.spec().sha256, want.model_sha256);
    assert_eq!((enc.spec().max_tokens, enc.spec().dim), (want.max_tokens, want.dim));
    let texts: Vec<&str> = want.sentences.iter().map(|s| s.text.as_str()).collect();
    let ids = enc.tokenize(&texts).expect("tokenize");
    for (s, got) in want.sentences.iter().zip(&ids) {
        assert_eq!(got, &s.ids, "token ids of {:?}", s.text);
    }
    let batched = enc.embed(&texts, &mut |_| {}).expect("embed");
    let mut worst = 0f32;
    for (i, s) in want.sentences.iter().enumerate() {
        let got = &batched[i * want.dim..(i + 1) * want.dim];
        let cos = cosine(got, &s.embedding);
        assert!(cos > 1.0 - 1e-4, "{:?}: cosine {cos}", s.text);
        let diff = got.iter().zip(&s.embedding).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < max_diff, "{:?}: max |Δ| {diff}", s.text);
        worst = worst.max(diff);
        let alone = enc.embed(&[s.text.as_str()], &mut |_| {}).expect("embed");
        let pad_diff = alone.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(pad_diff < 1e-5, "{:?}: batched and alone differ by {pad_diff}", s.text);
    }
    worst
}
