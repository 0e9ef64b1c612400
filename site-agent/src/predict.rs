//! `maeum-site predict`: runs a model this site holds on local text, with no
//! coordinator and no network. By default the release in service (`crate::releases`),
//! re-verified offline before use; or any release, model blob (`HOME/models`) or
//! fine-tuned local model (`HOME/local-models`), each checked against its SHA-256.
//!
//! `--file` streams a JSONL file in batches (constant memory in the file's size): each
//! line is an object with a text field (`--text-column`, default `text`) and, if it has
//! a label field (`--label-column`), the prediction is scored against it, so the metrics
//! a site reported for a model can be reproduced from its own test split.
//!
//! **Crisis flag.** Whatever the top label, an input is flagged for a person's review
//! when any crisis class's probability is at or above an operating threshold: the site's
//! `[predict] crisis_threshold` in site.toml if set, else the threshold on the release's
//! model card (chosen by the coordinator for the consortium's target recall from the
//! federated evaluation), else [`FALLBACK`] (one over the number of labels: more likely
//! than a uniform guess). A model without a crisis class has no flag.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;

use maeum_models::data::{DataError, LineError, Problem};
use maeum_models::model::ModelSpec;
use maeum_models::params::FlatParams;
use maeum_tlog::release::Selector;

use crate::enrol::{Home, Status};

/// `maeum-site predict` arguments.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["text", "file"])))]
pub struct PredictArgs {
    /// The site's home directory.
    #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
    pub home: PathBuf,
    /// The model: a release (`3` or `v3`), or a digest (or unique prefix) of a model in
    /// HOME/models or HOME/local-models. Default: the release in service (else the last
    /// model the daemon used).
    #[arg(long, value_name = "VERSION|DIGEST")]
    pub model: Option<String>,
    /// One text to classify.
    #[arg(long)]
    pub text: Option<String>,
    /// A JSONL file of records to classify, streamed.
    #[arg(long, value_name = "IN.jsonl")]
    pub file: Option<PathBuf>,
    /// The text field of each record.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// The label field, if records carry one: predictions are then scored.
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Records per batch.
    #[arg(long, default_value_t = 1024)]
    pub batch: usize,
    /// One JSON object per input (and a summary object at the end of a file).
    #[arg(long)]
    pub json: bool,
}

/// A model loaded for inference.
#[derive(Debug)]
pub struct Loaded {
    pub digest: String,
    pub spec: ModelSpec,
    pub params: FlatParams,
    /// How possible crises are flagged (`None`: the model has no crisis class).
    pub crisis: Option<CrisisRule>,
    /// The site's encoders, for a model on a pretrained encoder (no vector cache: the
    /// texts classified here are not the site's records).
    pub encoders: std::sync::Mutex<maeum_models::encoder::Encoders>,
}

/// Where the crisis flag's threshold comes from, when neither the site nor a model card
/// sets one: one over the number of labels.
pub const FALLBACK: &str = "fallback: 1 / number of labels";

/// The crisis flag's rule for a model.
#[derive(Debug, Clone, PartialEq)]
pub struct CrisisRule {
    /// The crisis classes: label index and name.
    pub classes: Vec<(usize, String)>,
    /// Flag when a crisis class's probability is at or above this.
    pub threshold: f64,
    /// Where the threshold comes from: `release vN model card`, `site.toml`, or [`FALLBACK`].
    pub source: String,
}

impl CrisisRule {
    /// The rule for `spec`: `site` (site.toml) wins over `card` (the release's card:
    /// threshold and version), which wins over the fallback.
    pub fn new(spec: &ModelSpec, site: Option<f64>, card: Option<(f64, u32)>) -> Option<CrisisRule> {
        let names = spec.labels().names();
        let classes: Vec<(usize, String)> = names
            .iter()
            .enumerate()
            .filter(|(_, l)| maeum_tlog::release::is_crisis_label(l))
            .map(|(i, l)| (i, l.clone()))
            .collect();
        if classes.is_empty() {
            return None;
        }
        let (threshold, source) = match (site, card) {
            (Some(t), _) => (t, "site.toml [predict] crisis_threshold".to_string()),
            (None, Some((t, v))) => (t, format!("release v{v} model card")),
            (None, None) => (1.0 / names.len().max(1) as f64, FALLBACK.to_string()),
        };
        Some(CrisisRule { classes, threshold, source })
    }
}

/// The crisis flag of one input.
#[derive(Debug, Clone, PartialEq)]
pub struct CrisisFlag {
    /// Whether any crisis class's probability is at or above the threshold.
    pub flag: bool,
    /// Every crisis class with its probability, highest first.
    pub classes: Vec<(String, f32)>,
    pub threshold: f64,
}

impl CrisisFlag {
    /// The caution people see (`None` when not flagged).
    pub fn caution(&self) -> Option<String> {
        if !self.flag {
            return None;
        }
        let over: Vec<String> = self
            .classes
            .iter()
            .filter(|(_, p)| f64::from(*p) >= self.threshold)
            .map(|(l, p)| format!("{l} {:.1}%", p * 100.0))
            .collect();
        Some(format!(
            "CAUTION: possible crisis ({} >= threshold {:.1}%) — a person should review this now",
            over.join(", "),
            self.threshold * 100.0
        ))
    }

    fn json(&self) -> serde_json::Value {
        let classes: Vec<serde_json::Value> =
            self.classes.iter().map(|(l, p)| serde_json::json!({"label": l, "probability": p})).collect();
        serde_json::json!({"flag": self.flag, "classes": classes, "threshold": self.threshold})
    }
}

/// Finds `wanted` in HOME and loads it after checking it: a release number (`3` or
/// `v3`) or a digest (or unique prefix) of a model in HOME/models or a fine-tuned model
/// in HOME/local-models; by default the release in service, else the last model the
/// daemon used. Every file is checked against its SHA-256 first, and a release is
/// re-verified (signature, card, log inclusion) before it is used.
pub fn load(home: &Home, wanted: Option<&str>) -> Result<Loaded> {
    let wanted = match wanted {
        Some(w) => match Selector::parse(w).map_err(|e| anyhow!("--model: {e}"))? {
            Selector::Version(_) => crate::releases::find(home, w)?.manifest.model_sha256,
            Selector::DigestPrefix(p) => p,
        },
        None => match crate::releases::current(home)? {
            Some(c) => crate::releases::find(home, &c.version.to_string())?.manifest.model_sha256,
            None => Status::load(home)?
                .map(|s| s.last_model)
                .filter(|m| !m.is_empty())
                .context("this site has no release in service and has used no model yet; pass --model DIGEST")?,
        },
    };
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for dir in ["models", "local-models"] {
        let Ok(rd) = std::fs::read_dir(home.path(dir)) else { continue };
        for e in rd.flatten() {
            if let Some(d) = e.file_name().to_str().and_then(|n| n.strip_suffix(".safetensors"))
                && d.starts_with(&wanted)
            {
                found.push((d.to_owned(), e.path()));
            }
        }
    }
    found.sort();
    found.dedup_by(|a, b| a.0 == b.0);
    let (digest, path) = match found.as_slice() {
        [one] => one.clone(),
        [] => {
            bail!("no model {wanted} in {} or {}", home.path("models").display(), home.path("local-models").display())
        }
        many => bail!("--model {wanted} matches {} models; give more digits", many.len()),
    };
    if crate::releases::hash_file(&path)?.hex() != digest {
        bail!("{} does not match its digest: the file was altered or damaged; refusing to use it", path.display());
    }
    let mut card_threshold = None;
    if let Some(r) = crate::releases::installed(home)?.into_iter().find(|r| r.manifest.model_sha256 == digest) {
        let card = crate::releases::verify_installed(home, &r)
            .with_context(|| format!("release v{} no longer verifies; refusing to use it", r.manifest.version))?;
        card_threshold = card.crisis_flag.and_then(|f| f.threshold).map(|t| (t, r.manifest.version));
    }
    let (spec, params, _) = ModelSpec::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let site_threshold = site_crisis_threshold(home)?;
    let crisis = CrisisRule::new(&spec, site_threshold, card_threshold);
    // Loaded (and digest-checked) now, before any input is read.
    let mut store = crate::encoders::store(home, false)?;
    if let Some(e) = spec.encoder() {
        store.get(e).with_context(|| format!("model {digest} runs on a pretrained encoder"))?;
    }
    Ok(Loaded { digest, spec, params, crisis, encoders: std::sync::Mutex::new(store) })
}

/// `[predict] crisis_threshold` from site.toml, if the home has one and sets it.
fn site_crisis_threshold(home: &Home) -> Result<Option<f64>> {
    if !home.path("site.toml").exists() {
        return Ok(None);
    }
    let t = home.config()?.predict.crisis_threshold;
    if let Some(t) = t.filter(|t| !(0.0..=1.0).contains(t)) {
        bail!("{}: [predict] crisis_threshold must be in [0, 1], got {t}", home.path("site.toml").display());
    }
    Ok(t)
}

/// One input's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub probabilities: Vec<f32>,
    /// `None`: the model has no crisis class.
    pub crisis: Option<CrisisFlag>,
}

impl Loaded {
    /// Classifies a batch of texts.
    pub fn predict(&self, texts: &[String]) -> Result<Vec<Prediction>> {
        let data = {
            let mut encoders = self.encoders.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.spec.prepare_unlabelled_in(texts, &mut encoders)?
        };
        let probs = self.spec.predict_proba(&self.params, &data)?;
        let names = self.spec.labels().names();
        Ok(probs
            .into_iter()
            .map(|p| {
                let best = p.iter().enumerate().fold(0, |b, (i, v)| if *v > p[b] { i } else { b });
                let crisis = self.crisis.as_ref().map(|rule| {
                    let mut classes: Vec<(String, f32)> =
                        rule.classes.iter().map(|(i, l)| (l.clone(), p.get(*i).copied().unwrap_or(0.0))).collect();
                    classes.sort_by(|a, b| b.1.total_cmp(&a.1));
                    let flag = classes.iter().any(|(_, p)| f64::from(*p) >= rule.threshold);
                    CrisisFlag { flag, classes, threshold: rule.threshold }
                });
                Prediction { label: names[best].clone(), probabilities: p, crisis }
            })
            .collect())
    }

    fn json(&self, p: &Prediction, line: Option<u64>, truth: Option<&str>) -> serde_json::Value {
        let names = self.spec.labels().names();
        let probs: serde_json::Map<String, serde_json::Value> =
            names.iter().zip(&p.probabilities).map(|(n, v)| (n.clone(), serde_json::json!(v))).collect();
        let crisis = p.crisis.as_ref().map(CrisisFlag::json);
        let mut v = serde_json::json!({"label": p.label, "probabilities": probs, "crisis": crisis});
        if let Some(l) = line {
            v["line"] = l.into();
        }
        if let Some(t) = truth {
            v["truth"] = t.into();
        }
        v
    }

    fn human(&self, p: &Prediction) -> String {
        let names = self.spec.labels().names();
        let mut order: Vec<usize> = (0..p.probabilities.len()).collect();
        order.sort_by(|a, b| p.probabilities[*b].total_cmp(&p.probabilities[*a]));
        let top: Vec<String> =
            order.iter().take(3).map(|i| format!("{} {:.3}", names[*i], p.probabilities[*i])).collect();
        match p.crisis.as_ref().and_then(CrisisFlag::caution) {
            Some(caution) => format!("{}\t{}\t{caution}", p.label, top.join(", ")),
            None => format!("{}\t{}", p.label, top.join(", ")),
        }
    }
}

/// What a file run counted.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Summary {
    pub inputs: u64,
    pub labelled: u64,
    pub correct: u64,
    pub seconds: f64,
    /// Inputs flagged as a possible crisis.
    pub crisis_flagged: u64,
    /// `confusion[true][predicted]` over the labelled inputs whose label the model
    /// knows (the counts federated evaluation reports).
    pub confusion: Vec<Vec<u64>>,
}

/// `maeum-site predict`.
pub fn run(a: PredictArgs) -> Result<()> {
    let home = Home::new(&a.home);
    let model = load(&home, a.model.as_deref())?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if let Some(text) = &a.text {
        let p = model.predict(std::slice::from_ref(text))?.remove(0);
        if a.json {
            writeln!(out, "{}", model.json(&p, None, None))?;
        } else {
            writeln!(out, "{}", model.human(&p))?;
            if let Some(rule) = &model.crisis {
                eprintln!("crisis flag threshold {:.1}% ({})", rule.threshold * 100.0, rule.source);
            }
        }
        return Ok(out.flush()?);
    }
    let Some(path) = &a.file else { bail!("give --text or --file") };
    let s = predict_file(&model, path, &a, &mut out)?;
    out.flush()?;
    let rate = s.inputs as f64 / s.seconds.max(1e-9);
    let accuracy = (s.labelled > 0).then(|| s.correct as f64 / s.labelled as f64);
    let m = maeum_models::metrics::Confusion { counts: s.confusion.clone() }.metrics();
    let macro_f1 = (s.labelled > 0).then_some(m.macro_f1);
    if a.json {
        let summary = serde_json::json!({
            "summary": {"model": model.digest, "inputs": s.inputs, "seconds": s.seconds, "per_second": rate,
                        "labelled": s.labelled, "correct": s.correct, "accuracy": accuracy,
                        "crisis_flagged": model.crisis.as_ref().map(|_| s.crisis_flagged),
                        "crisis_threshold": model.crisis.as_ref().map(|r| r.threshold),
                        "macro_f1": macro_f1, "confusion": (s.labelled > 0).then_some(&s.confusion)}
        });
        writeln!(out, "{summary}")?;
    } else {
        eprintln!("{} inputs in {:.2} s ({rate:.0}/s) with model {}", s.inputs, s.seconds, &model.digest[..16]);
        if let (Some(acc), Some(f1)) = (accuracy, macro_f1) {
            eprintln!("on the {} labelled inputs: accuracy {acc:.4}, macro-F1 {f1:.4}", s.labelled);
        }
        if let Some(rule) = &model.crisis {
            eprintln!(
                "{} input(s) flagged as a possible crisis (threshold {:.1}%, {}): a person should review them",
                s.crisis_flagged,
                rule.threshold * 100.0,
                rule.source
            );
        }
    }
    Ok(out.flush()?)
}

fn line_error(path: &Path, line: u64, problem: Problem) -> anyhow::Error {
    DataError::Line(LineError { path: path.to_owned(), line, problem }).into()
}

/// Streams `path` through the model in batches, writing one result per record.
pub fn predict_file(model: &Loaded, path: &Path, a: &PredictArgs, out: &mut impl Write) -> Result<Summary> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io { path: path.to_owned(), error: source })?;
    let reader = BufReader::new(file);
    let started = Instant::now();
    let n = model.spec.labels().names().len();
    let mut s = Summary { confusion: vec![vec![0; n]; n], ..Summary::default() };
    let labels = model.spec.labels().clone();
    let mut texts = Vec::with_capacity(a.batch);
    let mut meta: Vec<(u64, Option<String>)> = Vec::with_capacity(a.batch);
    let mut flush = |texts: &mut Vec<String>, meta: &mut Vec<(u64, Option<String>)>, s: &mut Summary| -> Result<()> {
        if texts.is_empty() {
            return Ok(());
        }
        for (p, (line, truth)) in model.predict(texts)?.iter().zip(meta.iter()) {
            s.inputs += 1;
            s.crisis_flagged += u64::from(p.crisis.as_ref().is_some_and(|c| c.flag));
            if let Some(t) = truth {
                s.labelled += 1;
                s.correct += u64::from(*t == p.label);
                if let (Some(ti), Some(pi)) = (labels.index(t), labels.index(&p.label)) {
                    s.confusion[ti][pi] += 1;
                }
            }
            if a.json {
                writeln!(out, "{}", model.json(p, Some(*line), truth.as_deref()))?;
            } else {
                writeln!(out, "{line}\t{}", model.human(p))?;
            }
        }
        texts.clear();
        meta.clear();
        Ok(())
    };
    for (i, line) in reader.split(b'\n').enumerate() {
        let n = i as u64 + 1;
        let bytes = line.map_err(|source| DataError::Io { path: path.to_owned(), error: source })?;
        let text = std::str::from_utf8(&bytes).map_err(|_| line_error(path, n, Problem::InvalidUtf8))?;
        if text.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| line_error(path, n, Problem::BadJson(e.to_string())))?;
        let body = v
            .get(&a.text_column)
            .and_then(|t| t.as_str())
            .ok_or_else(|| line_error(path, n, Problem::MissingField(a.text_column.clone())))?;
        let truth = v.get(&a.label_column).and_then(|l| l.as_str()).map(str::to_owned);
        texts.push(body.to_owned());
        meta.push((n, truth));
        if texts.len() >= a.batch.max(1) {
            flush(&mut texts, &mut meta, &mut s)?;
        }
    }
    flush(&mut texts, &mut meta, &mut s)?;
    s.seconds = started.elapsed().as_secs_f64();
    Ok(s)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use maeum_models::data::Example;

    /// A HOME holding one untrained model (labels calm, crisis) under its digest.
    pub(crate) struct ModelHome {
        pub dir: tempfile::TempDir,
        pub home: Home,
        pub digest: String,
        pub spec: ModelSpec,
        pub params: FlatParams,
    }

    pub(crate) fn model_home() -> ModelHome {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path());
        std::fs::create_dir_all(home.path("models")).expect("models");
        let job = maeum_protocols::job::JobSpec::from_toml(
            "job.toml",
            "name = \"t\"\nlabels = [\"calm\", \"crisis\"]\nrounds = 1\n[model]\nkind = \"text-classifier\"\nbuckets = 64\nembed_dim = 4\nhidden = 4\n",
        )
        .expect("job");
        let spec = job.model_spec().expect("spec");
        let params = job.initial_params().expect("params");
        let tmp = home.path("models/tmp.safetensors");
        spec.save(&tmp, &params, Default::default()).expect("save");
        let bytes = std::fs::read(&tmp).expect("read");
        let digest = maeum_protocols::wire::Digest::of(&bytes).hex();
        std::fs::rename(&tmp, home.path(&format!("models/{digest}.safetensors"))).expect("rename");
        ModelHome { dir, home, digest, spec, params }
    }

    fn args(home: &Home, file: &Path) -> PredictArgs {
        PredictArgs {
            home: home.dir.clone(),
            model: None,
            text: None,
            file: Some(file.to_owned()),
            text_column: "text".into(),
            label_column: "label".into(),
            batch: 2,
            json: true,
        }
    }

    #[test]
    fn a_file_is_streamed_scored_and_matches_evaluate() {
        let ModelHome { dir, home, digest, spec, .. } = model_home();
        let model = load(&home, Some(&digest[..8])).expect("load by prefix");
        let records = [("I feel fine today", "calm"), ("I want to end it all", "crisis"), ("ok", "calm")];
        let file = dir.path().join("in.jsonl");
        let lines: Vec<String> =
            records.iter().map(|(t, l)| serde_json::json!({"text": t, "label": l}).to_string()).collect();
        std::fs::write(&file, format!("{}\n\n", lines.join("\n"))).expect("write");
        let mut out = Vec::new();
        let s = predict_file(&model, &file, &args(&home, &file), &mut out).expect("predict");
        assert_eq!((s.inputs, s.labelled), (3, 3));
        let examples: Vec<Example> =
            records.iter().map(|(t, l)| Example { text: (*t).into(), label: (*l).into() }).collect();
        let confusion = spec.evaluate(&model.params, &spec.prepare_text(&examples).expect("prep")).expect("eval");
        let correct: u64 = (0..2).map(|i| confusion.counts[i][i]).sum();
        assert_eq!(s.correct, correct, "predict scores exactly as federated evaluation counts");
        assert_eq!(s.confusion, confusion.counts, "and its confusion matrix is the reported one");
        let first: serde_json::Value =
            serde_json::from_slice(out.split(|b| *b == b'\n').next().expect("line")).expect("json");
        assert_eq!(first["line"], 1);
        let sum: f64 = first["probabilities"].as_object().expect("probs").values().filter_map(|v| v.as_f64()).sum();
        assert!((sum - 1.0).abs() < 1e-4, "{first}");
    }

    #[test]
    fn bad_input_names_file_and_line_and_a_tampered_model_is_refused() {
        let ModelHome { dir, home, digest, .. } = model_home();
        let model = load(&home, Some(&digest)).expect("load");
        let file = dir.path().join("bad.jsonl");
        std::fs::write(&file, "{\"text\": \"fine\"}\n{\"body\": \"no text field\"}\n").expect("write");
        let e = predict_file(&model, &file, &args(&home, &file), &mut Vec::new()).expect_err("bad line");
        assert!(e.downcast_ref::<DataError>().is_some(), "exit code 3");
        assert!(e.to_string().ends_with("bad.jsonl:2: missing field \"text\""), "{e}");
        assert!(load(&home, Some("ffffffff")).expect_err("unknown").to_string().contains("no model ffffffff"));
        assert!(load(&home, None).expect_err("no model used yet").to_string().contains("no model yet"));
        let path = home.path(&format!("models/{digest}.safetensors"));
        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).expect("write");
        let e = load(&home, Some(&digest)).expect_err("tampered");
        assert!(e.to_string().contains("does not match its digest"), "{e}");
    }

    /// The `model_home` model with every weight 0 and output biases `bias`: its
    /// probabilities are softmax(bias) for any input.
    fn biased(spec: &ModelSpec, bias: [f32; 2]) -> FlatParams {
        let layout = spec.layout();
        let last = layout.tensors.last().expect("tensors");
        assert_eq!(last.shape, vec![2], "the output bias is the last tensor ({})", last.name);
        let mut values = vec![0.0; layout.numel()];
        let n = values.len();
        values[n - 2..].copy_from_slice(&bias);
        FlatParams::new(layout, values).expect("params")
    }

    #[test]
    fn a_crisis_under_the_argmax_is_flagged_with_a_caution_and_in_json() {
        let ModelHome { spec, .. } = model_home();
        // calm 88.1%, crisis 11.9%: the top label is calm.
        let params = biased(&spec, [2.0, 0.0]);
        let model = Loaded {
            digest: "ab".repeat(32),
            crisis: CrisisRule::new(&spec, None, Some((0.05, 3))),
            spec: spec.clone(),
            params,
            encoders: std::sync::Mutex::new(maeum_models::encoder::Encoders::new("/nonexistent", None)),
        };
        assert_eq!(model.crisis.as_ref().map(|r| r.source.as_str()), Some("release v3 model card"));
        let p = model.predict(&["I wrote a note tonight".to_string()]).expect("predict").remove(0);
        assert_eq!(p.label, "calm", "the argmax is not the crisis class");
        let flag = p.crisis.clone().expect("the model has a crisis class");
        assert!(flag.flag, "{flag:?}");
        let human = model.human(&p);
        assert!(human.starts_with("calm\t"), "{human}");
        assert!(
            human.ends_with(
                "CAUTION: possible crisis (crisis 11.9% >= threshold 5.0%) — a person should review this now"
            ),
            "{human}"
        );
        let v = model.json(&p, None, None);
        assert_eq!(v["label"], "calm");
        assert_eq!(v["crisis"]["flag"], true, "{v}");
        assert_eq!(v["crisis"]["threshold"], 0.05, "{v}");
        let classes = v["crisis"]["classes"].as_array().expect("classes");
        assert_eq!(classes.len(), 1, "{v}");
        assert_eq!(classes[0]["label"], "crisis");
        let prob = classes[0]["probability"].as_f64().expect("probability");
        assert!((prob - 0.1192).abs() < 1e-3, "{v}");

        // Under the threshold: no flag, no caution; the site's setting wins over the card.
        let strict = Loaded { crisis: CrisisRule::new(&spec, Some(0.2), Some((0.05, 3))), ..model };
        assert_eq!(strict.crisis.as_ref().map(|r| r.threshold), Some(0.2));
        let p = strict.predict(&["fine".to_string()]).expect("predict").remove(0);
        assert_eq!(p.crisis.as_ref().map(|c| c.flag), Some(false));
        assert!(!strict.human(&p).contains("CAUTION"));
        assert_eq!(strict.json(&p, None, None)["crisis"]["flag"], false);
        // No card threshold and no site setting: one over the number of labels.
        let fallback = CrisisRule::new(&spec, None, None).expect("rule");
        assert_eq!((fallback.threshold, fallback.source.as_str()), (0.5, FALLBACK));
    }

    #[test]
    fn a_model_without_a_crisis_class_has_no_flag() {
        let job = maeum_protocols::job::JobSpec::from_toml(
            "job.toml",
            "name = \"t\"\nlabels = [\"calm\", \"anxiety\"]\nrounds = 1\n[model]\nkind = \"text-classifier\"\nbuckets = 64\nembed_dim = 4\nhidden = 4\n",
        )
        .expect("job");
        let spec = job.model_spec().expect("spec");
        let model = Loaded {
            digest: "ab".repeat(32),
            crisis: CrisisRule::new(&spec, Some(0.1), None),
            params: job.initial_params().expect("params"),
            spec,
            encoders: std::sync::Mutex::new(maeum_models::encoder::Encoders::new("/nonexistent", None)),
        };
        assert_eq!(model.crisis, None);
        let p = model.predict(&["hello".to_string()]).expect("predict").remove(0);
        assert_eq!(model.json(&p, None, None)["crisis"], serde_json::Value::Null);
    }

    #[test]
    fn the_site_threshold_comes_from_site_toml_and_is_checked() {
        let ModelHome { dir: _dir, home, digest, .. } = model_home();
        std::fs::write(home.path("site.toml"), "[data]\n[predict]\ncrisis_threshold = 0.07\n").expect("write");
        let model = load(&home, Some(&digest)).expect("load");
        let rule = model.crisis.expect("crisis class");
        assert_eq!((rule.threshold, rule.source.as_str()), (0.07, "site.toml [predict] crisis_threshold"));
        std::fs::write(home.path("site.toml"), "[data]\n[predict]\ncrisis_threshold = 7\n").expect("write");
        let e = load(&home, Some(&digest)).expect_err("out of range");
        assert!(e.to_string().contains("crisis_threshold must be in [0, 1], got 7"), "{e}");
    }
}
