//! The burn encoder against the independent numpy reference
//! (`scripts/encoder_reference.py` wrote `tests/data/minilm_reference.json` from the same
//! files): the same token ids, and sentence vectors within 1e-4 cosine (and 1e-6 per
//! coordinate).
//!
//! Needs the encoder: fetched by `python3 scripts/fetch_encoder.py` on first use (CI runs it
//! beforehand).

mod common;

use maeum_models::encoder::{self, Encoder};

fn encoder_dir() -> std::path::PathBuf {
    common::encoder_dir("all-minilm-l6-v2")
}

#[test]
fn token_ids_and_vectors_match_the_numpy_reference() {
    let want = common::reference("minilm_reference.json");
    let spec = encoder::known("all-minilm-l6-v2").expect("known");
    let enc = Encoder::load(&encoder_dir(), &spec).expect("load");
    // f32 against float64 lands near 2e-7; the tanh approximation of GELU would be
    // about 5e-6 off, so 1e-6 also pins the exact-erf GELU.
    let worst = common::check_against(&enc, &want, 1e-6);
    eprintln!("largest difference from the reference: {worst:e}");
}

#[test]
fn files_with_another_digest_are_refused() {
    let mut spec = encoder::known("all-minilm-l6-v2").expect("known");
    spec.sha256 = "00".repeat(32);
    let err = Encoder::load(&encoder_dir(), &spec).expect_err("refused");
    let msg = err.to_string();
    assert!(msg.contains("model.safetensors: SHA-256 is 53aa5117"), "{msg}");
    assert!(msg.contains("not the encoder the model names"), "{msg}");
    let mut spec = encoder::known("all-minilm-l6-v2").expect("known");
    spec.tokenizer_sha256 = "11".repeat(32);
    let msg = Encoder::load(&encoder_dir(), &spec).expect_err("refused").to_string();
    assert!(msg.contains("tokenizer.json: SHA-256 is be50c362"), "{msg}");
}

fn examples() -> Vec<maeum_models::data::Example> {
    let calm = [
        "I went for a walk in the park with friends",
        "We cooked dinner and watched a film",
        "The garden looks lovely this spring",
        "I enjoyed the concert last night",
    ];
    let crisis = [
        "I cannot go on anymore and want it to end",
        "Everything feels hopeless and I am alone",
        "I keep thinking about ending my life",
        "Nobody would miss me if I were gone",
    ];
    let mut v = Vec::new();
    for round in 0..3 {
        for t in calm {
            v.push(maeum_models::data::Example { text: format!("{t} {round}"), label: "calm".into() });
        }
        for t in crisis {
            v.push(maeum_models::data::Example { text: format!("{t} {round}"), label: "crisis".into() });
        }
    }
    v
}

#[test]
fn an_encoder_head_embeds_once_caches_the_vectors_and_learns() {
    use maeum_models::data::LabelSet;
    use maeum_models::encoder::Encoders;
    use maeum_models::model::ModelSpec;
    use maeum_models::nn::TrainConfig;

    let spec = ModelSpec::EncoderHead {
        encoder: encoder::known("all-minilm-l6-v2").expect("known"),
        hidden: 16,
        labels: LabelSet::new(vec!["calm".into(), "crisis".into()]).expect("labels"),
    };
    let ex = examples();
    let err = spec.prepare_text(&ex).expect_err("needs the encoder");
    assert!(err.to_string().contains("needs its encoder \"all-minilm-l6-v2\""), "{err}");

    let cache = tempfile::tempdir().expect("tempdir");
    let root = encoder_dir().parent().expect("encoders").to_owned();
    let mut encoders = Encoders::new(&root, Some(cache.path().to_owned()));
    let mut first = Vec::new();
    let data = spec.prepare_text_in(&ex, &mut encoders, &mut |d, t| first.push((d, t))).expect("prepare");
    assert_eq!(first.first(), Some(&(0, ex.len())), "nothing cached at first");
    assert_eq!(first.last(), Some(&(ex.len(), ex.len())));
    let files: Vec<_> = std::fs::read_dir(cache.path()).expect("cache dir").map(|e| e.expect("entry").path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let entry = 32 + 4 * 384;
    assert_eq!(std::fs::metadata(&files[0]).expect("meta").len(), (ex.len() * entry) as u64);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files[0]).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "vectors derived from records are owner-only");
    }

    // A torn append (a crash mid-write) loses only that entry; a new process (a fresh
    // store) reads the rest from the cache and recomputes one vector.
    let bytes = std::fs::read(&files[0]).expect("read");
    std::fs::write(&files[0], &bytes[..bytes.len() - 100]).expect("tear");
    let mut again = Vec::new();
    let mut fresh = Encoders::new(&root, Some(cache.path().to_owned()));
    let data2 = spec.prepare_text_in(&ex, &mut fresh, &mut |d, t| again.push((d, t))).expect("prepare");
    assert_eq!(again.first(), Some(&(ex.len() - 1, ex.len())), "all but the torn entry came from the cache");
    assert_eq!(std::fs::metadata(&files[0]).expect("meta").len(), (ex.len() * entry) as u64);
    let (maeum_models::model::Prepared::Tabular(a), maeum_models::model::Prepared::Tabular(b)) = (&data, &data2) else {
        panic!("encoder inputs are vectors")
    };
    for (x, y) in a.rows.iter().zip(&b.rows) {
        assert!(encoder::cosine(x, y) > 1.0 - 1e-6);
    }
    assert_eq!(a.labels, b.labels);

    let cfg = TrainConfig { learning_rate: 0.01, epochs: 30, batch_size: 8, dropout: 0.0, ..TrainConfig::default() };
    let start = spec.init(1).expect("init");
    assert_eq!(start.values().len(), 384 * 16 + 16 + 16 * 2 + 2, "only the head is trained and sent");
    let (params, _) = spec.train(&start, &data, &cfg, &mut ()).expect("train");
    let acc = spec.evaluate(&params, &data).expect("eval").metrics().accuracy;
    assert!(acc > 0.95, "accuracy {acc}");
    let probs = spec
        .prepare_unlabelled_in(&["I want to end my life tonight".to_string()], &mut fresh)
        .and_then(|d| spec.predict_proba(&params, &d))
        .expect("predict");
    assert!(probs[0][1] > 0.5, "{probs:?}");
}

/// `encoder-lora` with zero adapters is the encoder-head, then it learns (see
/// [`common::lora_is_the_head_then_learns`]).
#[test]
fn an_encoder_lora_with_zero_adapters_is_the_encoder_head_and_then_learns() {
    common::lora_is_the_head_then_learns("all-minilm-l6-v2", &examples(), "I want to end my life tonight");
}
