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

/// `encoder-lora` runs the encoder's lower layers once per record and its top layers in
/// the adapted network. With every `B` at zero it must compute exactly the frozen
/// encoder's vector and the head on it: the same probabilities as an `encoder-head`
/// with the same head. Then training moves the adapters and fits the examples.
pub fn lora_is_the_head_then_learns(name: &str, ex: &[maeum_models::data::Example], crisis: &str) {
    use maeum_models::data::LabelSet;
    use maeum_models::encoder::Encoders;
    use maeum_models::lora::LoraConfig;
    use maeum_models::model::{ModelSpec, Prepared};
    use maeum_models::nn::TrainConfig;
    use maeum_models::params::FlatParams;

    let labels = LabelSet::new(vec!["calm".into(), "crisis".into()]).expect("labels");
    let enc = maeum_models::encoder::known(name).expect("known");
    let head = ModelSpec::EncoderHead { encoder: enc.clone(), hidden: 16, labels: labels.clone() };
    let root = encoder_dir(name).parent().expect("encoders").to_owned();
    let mut encoders = Encoders::new(&root, None);
    let depth = encoders.get(&enc).expect("load").depth();
    let head_params = head.init(1).expect("init");
    let head_data = head.prepare_text_in(ex, &mut encoders, &mut |_, _| {}).expect("prepare");
    let want = head.predict_proba(&head_params, &head_data).expect("predict");
    for layers in [1, 2] {
        let lora = LoraConfig { layers, rank: 4, alpha: 8.0, seed: 3 };
        let spec = ModelSpec::EncoderLora { encoder: enc.clone(), lora, hidden: 16, labels: labels.clone() };
        let data = spec.prepare_text_in(ex, &mut encoders, &mut |_, _| {}).expect("prepare");
        let Prepared::Tokens(tokens) = &data else { panic!("encoder-lora inputs are token states") };
        assert_eq!(tokens.frozen.first, depth - layers);
        // The same head, and every B zero (as `init` makes them).
        let start = spec.init(1).expect("init");
        let mut values = start.values().to_vec();
        let n = values.len();
        values[n - head_params.values().len()..].copy_from_slice(head_params.values());
        let zero_b = FlatParams::new(start.layout().clone(), values).expect("params");
        let got = spec.predict_proba(&zero_b, &data).expect("predict");
        for (g, w) in got.iter().zip(&want) {
            for (x, y) in g.iter().zip(w) {
                assert!((x - y).abs() < 1e-4, "layers {layers}: {g:?} vs {w:?}");
            }
        }
        let cfg =
            TrainConfig { learning_rate: 0.01, epochs: 15, batch_size: 4, dropout: 0.0, ..TrainConfig::default() };
        let (params, _) = spec.train(&zero_b, &data, &cfg, &mut ()).expect("train");
        let moved =
            params.tensors().filter(|(t, _)| t.name.ends_with("lora_b")).any(|(_, v)| v.iter().any(|x| *x != 0.0));
        assert!(moved, "the adapters learned nothing");
        let acc = spec.evaluate(&params, &data).expect("eval").metrics().accuracy;
        assert!(acc > 0.95, "layers {layers}: accuracy {acc}");
        let probs = spec
            .prepare_unlabelled_in(&[crisis.to_string()], &mut encoders)
            .and_then(|d| spec.predict_proba(&params, &d))
            .expect("predict");
        assert!(probs[0][1] > 0.5, "{probs:?}");
    }
}
