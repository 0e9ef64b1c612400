//! Local data: labelled text records read from JSONL or CSV, validated line by line.
//!
//! A site's records never leave this module except as features for local training.
//! Every problem is reported with the file, the line (1-based) and what is wrong; a bad
//! line is never dropped silently: the caller either fails on the first error or asks
//! for [`ReadOptions::skip_invalid`] and gets the skipped lines counted in the report.
//! Error messages never quote the record's text.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One labelled text record.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub text: String,
    pub label: String,
}

impl fmt::Debug for Example {
    // Records are personal data: never print their text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Example")
            .field("text", &format_args!("<{} chars>", self.text.chars().count()))
            .field("label", &self.label)
            .finish()
    }
}

/// The ordered set of labels a job trains on. Index order is the model's output order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelSet {
    labels: Vec<String>,
}

impl LabelSet {
    /// Builds a label set; duplicates and empty names are refused.
    pub fn new(labels: Vec<String>) -> Result<Self, String> {
        let mut seen = std::collections::BTreeSet::new();
        for l in &labels {
            if l.trim().is_empty() {
                return Err("label set contains an empty label".into());
            }
            if !seen.insert(l.as_str()) {
                return Err(format!("label set contains {l:?} twice"));
            }
        }
        if labels.len() < 2 {
            return Err(format!("a label set needs at least 2 labels, got {}", labels.len()));
        }
        Ok(Self { labels })
    }

    /// The sorted set of labels that occur in `examples`.
    pub fn from_examples(examples: &[Example]) -> Result<Self, String> {
        let set: std::collections::BTreeSet<&str> = examples.iter().map(|e| e.label.as_str()).collect();
        Self::new(set.into_iter().map(str::to_owned).collect())
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn index(&self, label: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == label)
    }

    pub fn name(&self, index: usize) -> Option<&str> {
        self.labels.get(index).map(String::as_str)
    }

    pub fn names(&self) -> &[String] {
        &self.labels
    }
}

/// What is wrong with one line of an input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    InvalidUtf8,
    BadJson(String),
    MissingField(String),
    /// A key that is neither `text` nor `label` stands where a required one is missing
    /// (a misspelling such as `lable`).
    UnknownField {
        unknown: String,
        missing: String,
    },
    EmptyText,
    EmptyLabel,
    UnknownLabel(String),
    BadCsv(String),
    BadNumber {
        column: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::InvalidUtf8 => write!(f, "invalid UTF-8"),
            Problem::BadJson(e) => write!(f, "bad JSON: {e}"),
            Problem::MissingField(name) => write!(f, "missing field {name:?}"),
            Problem::UnknownField { unknown, missing } => {
                write!(f, "unknown field {unknown:?}, expected \"text\" and \"label\" (missing field {missing:?})")
            }
            Problem::EmptyText => write!(f, "empty text"),
            Problem::EmptyLabel => write!(f, "empty label"),
            Problem::UnknownLabel(l) => write!(f, "label {l:?} is not in the job's label set"),
            Problem::BadCsv(e) => write!(f, "bad CSV: {e}"),
            Problem::BadNumber { column } => write!(f, "column {column:?} is not a finite number"),
        }
    }
}

/// A problem located in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub path: PathBuf,
    /// 1-based line number (for CSV: the record's line).
    pub line: u64,
    pub problem: Problem,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.problem)
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The I/O error is in the message and deliberately not a `source`, so `{:#}`
    /// chains do not print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{0}")]
    Line(LineError),
    #[error("{path}: CSV header has no column {column:?} (columns: {available})")]
    MissingColumn { path: PathBuf, column: String, available: String },
    #[error("{path}: no valid records")]
    Empty { path: PathBuf },
    #[error("{path}: unknown data format (use a .jsonl or .csv file)")]
    UnknownFormat { path: PathBuf },
}

/// How to read a file.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// Skip invalid lines (counted in the report) instead of failing on the first one.
    pub skip_invalid: bool,
    /// Refuse labels outside this set.
    pub labels: Option<LabelSet>,
    /// CSV: the text column (default `text`).
    pub text_column: Option<String>,
    /// CSV: the label column (default `label`).
    pub label_column: Option<String>,
}

/// The records read and what was skipped.
#[derive(Debug, Clone, Default)]
pub struct ReadReport {
    pub examples: Vec<Example>,
    /// Skipped lines, in file order (only with `skip_invalid`).
    pub skipped: Vec<LineError>,
}

impl ReadReport {
    /// Skipped-line counts by kind of problem, for a summary line.
    pub fn skipped_by_kind(&self) -> BTreeMap<&'static str, usize> {
        let mut out = BTreeMap::new();
        for e in &self.skipped {
            let kind = match e.problem {
                Problem::InvalidUtf8 => "invalid_utf8",
                Problem::BadJson(_) => "bad_json",
                Problem::MissingField(_) => "missing_field",
                Problem::UnknownField { .. } => "unknown_field",
                Problem::EmptyText => "empty_text",
                Problem::EmptyLabel => "empty_label",
                Problem::UnknownLabel(_) => "unknown_label",
                Problem::BadCsv(_) => "bad_csv",
                Problem::BadNumber { .. } => "bad_number",
            };
            *out.entry(kind).or_insert(0) += 1;
        }
        out
    }
}

/// Reads a `.jsonl` / `.ndjson` or `.csv` file, chosen by extension.
pub fn read_examples(path: &Path, opts: &ReadOptions) -> Result<ReadReport, DataError> {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("jsonl" | "ndjson" | "json") => {
            let file = open(path)?;
            read_jsonl(file, path, opts)
        }
        Some("csv") => {
            let file = open(path)?;
            read_csv(file, path, opts)
        }
        _ => Err(DataError::UnknownFormat { path: path.to_owned() }),
    }
}

fn open(path: &Path) -> Result<std::fs::File, DataError> {
    std::fs::File::open(path).map_err(|source| DataError::Io { path: path.to_owned(), error: source })
}

/// Validates one record and either keeps it, records the skip, or fails.
struct Collector<'a> {
    path: &'a Path,
    opts: &'a ReadOptions,
    report: ReadReport,
}

impl Collector<'_> {
    fn push(&mut self, line: u64, record: Result<Example, Problem>) -> Result<(), DataError> {
        let checked = record.and_then(|e| {
            if e.text.trim().is_empty() {
                Err(Problem::EmptyText)
            } else if e.label.trim().is_empty() {
                Err(Problem::EmptyLabel)
            } else if let Some(set) = &self.opts.labels
                && set.index(&e.label).is_none()
            {
                Err(Problem::UnknownLabel(e.label))
            } else {
                Ok(e)
            }
        });
        match checked {
            Ok(e) => self.report.examples.push(e),
            Err(problem) => {
                let err = LineError { path: self.path.to_owned(), line, problem };
                if self.opts.skip_invalid {
                    self.report.skipped.push(err);
                } else {
                    return Err(DataError::Line(err));
                }
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<ReadReport, DataError> {
        if self.report.examples.is_empty() {
            return Err(DataError::Empty { path: self.path.to_owned() });
        }
        Ok(self.report)
    }
}

type JsonRecord = serde_json::Map<String, serde_json::Value>;

/// `text` and `label` of one record; a missing one is blamed on an unknown key, if the
/// record has one (field names are the file's schema, never record content).
fn json_example(mut r: JsonRecord) -> Result<Example, Problem> {
    let (text, label) = (r.remove("text"), r.remove("label"));
    let missing = match (&text, &label) {
        (None, _) => Some("text"),
        (_, None) => Some("label"),
        _ => None,
    };
    if let (Some(missing), Some(unknown)) = (missing, r.keys().next()) {
        return Err(Problem::UnknownField { unknown: unknown.clone(), missing: missing.into() });
    }
    let text = json_string(text, "text")?;
    Ok(Example { text, label: json_string(label, "label")? })
}

fn json_string(v: Option<serde_json::Value>, field: &str) -> Result<String, Problem> {
    match v {
        None | Some(serde_json::Value::Null) => Err(Problem::MissingField(field.into())),
        Some(serde_json::Value::String(s)) => Ok(s),
        // Numeric labels (e.g. 0/1) are common in exported datasets; accept them as text.
        Some(serde_json::Value::Number(n)) if field == "label" => Ok(n.to_string()),
        Some(_) => Err(Problem::BadJson(format!("field {field:?} is not a string"))),
    }
}

/// Reads JSONL: one `{"text": ..., "label": ...}` object per line; blank lines are allowed.
pub fn read_jsonl(reader: impl Read, path: &Path, opts: &ReadOptions) -> Result<ReadReport, DataError> {
    let mut reader = BufReader::new(reader);
    let mut c = Collector { path, opts, report: ReadReport::default() };
    let mut buf = Vec::new();
    let mut line = 0u64;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| DataError::Io { path: path.to_owned(), error: source })?;
        if n == 0 {
            break;
        }
        line += 1;
        let record = match std::str::from_utf8(&buf) {
            Err(_) => Err(Problem::InvalidUtf8),
            Ok(s) if s.trim().is_empty() => continue,
            // Without its line ending, a line cut off mid-string ends at its real last
            // column (with it, serde_json reports column 0 of the next line).
            Ok(s) => match serde_json::from_str::<JsonRecord>(
                s.trim_end_matches(['\n', '\r']).trim_start_matches('\u{feff}'),
            ) {
                // serde_json's message names the column, never the content.
                Err(e) => Err(Problem::BadJson(format!("{} at column {}", e.classify_kind(), e.column()))),
                Ok(r) => json_example(r),
            },
        };
        c.push(line, record)?;
    }
    c.finish()
}

trait ClassifyKind {
    fn classify_kind(&self) -> &'static str;
}

impl ClassifyKind for serde_json::Error {
    fn classify_kind(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "read error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "not an object with text and label",
            serde_json::error::Category::Eof => "unexpected end of line",
        }
    }
}

/// Reads CSV with a header row; the text and label columns are named in `opts`.
pub fn read_csv(reader: impl Read, path: &Path, opts: &ReadOptions) -> Result<ReadReport, DataError> {
    let text_col = opts.text_column.as_deref().unwrap_or("text");
    let label_col = opts.label_column.as_deref().unwrap_or("label");
    let mut rdr = csv::ReaderBuilder::new().flexible(true).from_reader(reader);
    let headers = csv_headers(&mut rdr, path)?;
    let (ti, li) = (find_column(&headers, text_col, path)?, find_column(&headers, label_col, path)?);
    let mut c = Collector { path, opts, report: ReadReport::default() };
    let mut record = csv::ByteRecord::new();
    loop {
        let line = rdr.position().line();
        match rdr.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let line = record.position().map_or(line, |p| p.line());
                let field = |i: usize, name: &str| -> Result<String, Problem> {
                    let raw = record.get(i).ok_or_else(|| Problem::MissingField(name.to_owned()))?;
                    std::str::from_utf8(raw).map(str::to_owned).map_err(|_| Problem::InvalidUtf8)
                };
                let ex = field(ti, text_col)
                    .and_then(|text| Ok(Example { text, label: field(li, label_col)?.trim().to_owned() }));
                c.push(line, ex)?;
            }
            Err(e) => {
                let line = e.position().map_or(line, |p| p.line());
                // A CSV syntax error desynchronises the reader: it is always fatal.
                return Err(DataError::Line(LineError { path: path.to_owned(), line, problem: csv_problem(&e) }));
            }
        }
    }
    c.finish()
}

fn csv_problem(e: &csv::Error) -> Problem {
    match e.kind() {
        csv::ErrorKind::Utf8 { .. } => Problem::InvalidUtf8,
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
            Problem::BadCsv(format!("{len} fields, header has {expected_len}"))
        }
        _ => Problem::BadCsv("malformed record".into()),
    }
}

/// Writes examples as JSONL (used by the split command), owner-readable only (0600).
pub fn write_jsonl(path: &Path, examples: &[Example]) -> Result<(), DataError> {
    let io = |source| DataError::Io { path: path.to_owned(), error: source };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    // Records are people's words: readable by the owner only (as the fetched corpus).
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path).map_err(io)?;
    // `mode` applies only to a new file; an older one is tightened too.
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(io)?;
    let mut w = std::io::BufWriter::new(file);
    for e in examples {
        // INVARIANT: serialising two strings cannot fail.
        #[allow(clippy::unwrap_used)]
        let line = serde_json::to_string(e).unwrap();
        w.write_all(line.as_bytes()).map_err(io)?;
        w.write_all(b"\n").map_err(io)?;
    }
    w.flush().map_err(io)?;
    w.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)
}

/// A numeric table (questionnaire item scores) with one label column.
#[derive(Clone)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<f32>>,
    pub labels: Vec<String>,
    /// Skipped rows (only with `skip_invalid`).
    pub skipped: Vec<LineError>,
}

impl fmt::Debug for Table {
    // Rows are local records: show only the shape.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("columns", &self.columns)
            .field("rows", &self.rows.len())
            .field("skipped", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

/// The header row's column names (invalid UTF-8 shown lossily).
fn csv_headers<R: Read>(rdr: &mut csv::Reader<R>, path: &Path) -> Result<Vec<String>, DataError> {
    let headers = rdr
        .byte_headers()
        .map_err(|e| DataError::Line(LineError { path: path.to_owned(), line: 1, problem: csv_problem(&e) }))?;
    Ok(headers.iter().map(|h| String::from_utf8_lossy(h).into_owned()).collect())
}

fn find_column(headers: &[String], name: &str, path: &Path) -> Result<usize, DataError> {
    headers.iter().position(|h| h == name).ok_or_else(|| DataError::MissingColumn {
        path: path.to_owned(),
        column: name.to_owned(),
        available: headers.join(", "),
    })
}

/// Reads a CSV of numeric feature columns plus a label column; every other column is a feature.
pub fn read_table(path: &Path, label_column: &str, opts: &ReadOptions) -> Result<Table, DataError> {
    let mut rdr = csv::ReaderBuilder::new().from_reader(open(path)?);
    let headers = csv_headers(&mut rdr, path)?;
    let li = find_column(&headers, label_column, path)?;
    let columns: Vec<String> = headers.iter().enumerate().filter(|(i, _)| *i != li).map(|(_, h)| h.clone()).collect();
    let mut table = Table { columns, rows: Vec::new(), labels: Vec::new(), skipped: Vec::new() };
    for result in rdr.records() {
        let rec = result.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            DataError::Line(LineError { path: path.to_owned(), line, problem: csv_problem(&e) })
        })?;
        let line = rec.position().map_or(0, |p| p.line());
        let mut row = Vec::with_capacity(table.columns.len());
        let mut problem = None;
        for (i, v) in rec.iter().enumerate() {
            if i == li {
                continue;
            }
            match v.trim().parse::<f32>() {
                Ok(x) if x.is_finite() => row.push(x),
                _ => {
                    problem = Some(Problem::BadNumber { column: headers[i].clone() });
                    break;
                }
            }
        }
        let label = rec.get(li).unwrap_or("").trim().to_owned();
        if problem.is_none() && label.is_empty() {
            problem = Some(Problem::EmptyLabel);
        }
        if problem.is_none()
            && let Some(set) = &opts.labels
            && set.index(&label).is_none()
        {
            problem = Some(Problem::UnknownLabel(label.clone()));
        }
        match problem {
            None => {
                table.rows.push(row);
                table.labels.push(label);
            }
            Some(problem) if opts.skip_invalid => {
                table.skipped.push(LineError { path: path.to_owned(), line, problem });
            }
            Some(problem) => return Err(DataError::Line(LineError { path: path.to_owned(), line, problem })),
        }
    }
    if table.rows.is_empty() {
        return Err(DataError::Empty { path: path.to_owned() });
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jsonl(input: &[u8], opts: &ReadOptions) -> Result<ReadReport, DataError> {
        read_jsonl(input, Path::new("sites/a.jsonl"), opts)
    }

    fn check_err(input: &[u8], expected: &str) {
        let err = jsonl(input, &ReadOptions::default()).expect_err("input must be refused");
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn reads_valid_jsonl_and_skips_blank_lines() {
        let r =
            jsonl(b"{\"text\":\"hi\",\"label\":\"a\"}\n\n{\"text\":\"yo\",\"label\":\"b\"}\n", &ReadOptions::default())
                .expect("valid input");
        assert_eq!(r.examples.len(), 2);
        assert_eq!(r.examples[1].label, "b");
    }

    #[test]
    fn bad_json_names_file_and_line() {
        check_err(
            b"{\"text\":\"hi\",\"label\":\"a\"}\n{not json\n",
            "sites/a.jsonl:2: bad JSON: syntax error at column 2",
        );
    }

    #[test]
    fn missing_field() {
        check_err(b"{\"text\":\"hi\"}\n", "sites/a.jsonl:1: missing field \"label\"");
    }

    #[test]
    fn a_line_cut_off_mid_string_reports_its_last_column() {
        check_err(
            b"{\"text\":\"a\",\"label\":\"a\"}\n{\"text\":\"I feel\r\n",
            "sites/a.jsonl:2: bad JSON: unexpected end of line at column 15",
        );
        check_err(b"{\"text\":\"I feel", "sites/a.jsonl:1: bad JSON: unexpected end of line at column 15");
    }

    #[test]
    fn a_misspelled_key_is_named_as_unknown() {
        check_err(
            b"{\"text\":\"hi\",\"lable\":\"a\"}\n",
            "sites/a.jsonl:1: unknown field \"lable\", expected \"text\" and \"label\" (missing field \"label\")",
        );
        check_err(
            b"{\"txt\":\"hi\",\"label\":\"a\"}\n",
            "sites/a.jsonl:1: unknown field \"txt\", expected \"text\" and \"label\" (missing field \"text\")",
        );
        // Extra keys beside both fields stay allowed (exported datasets carry ids).
        let r = jsonl(
            b"{\"id\":7,\"text\":\"hi\",\"label\":\"a\"}\n{\"text\":\"x\",\"label\":\"b\"}\n",
            &ReadOptions::default(),
        );
        assert_eq!(r.expect("extra keys").examples.len(), 2);
    }

    #[test]
    fn empty_text() {
        check_err(b"{\"text\":\"  \",\"label\":\"a\"}\n", "sites/a.jsonl:1: empty text");
    }

    #[test]
    fn invalid_utf8() {
        check_err(
            b"{\"text\":\"a\",\"label\":\"a\"}\n{\"text\":\"\xff\",\"label\":\"a\"}\n",
            "sites/a.jsonl:2: invalid UTF-8",
        );
    }

    #[test]
    fn unknown_label() {
        let opts = ReadOptions {
            labels: Some(LabelSet::new(vec!["a".into(), "b".into()]).expect("valid set")),
            ..Default::default()
        };
        let err = jsonl(b"{\"text\":\"x\",\"label\":\"c\"}\n", &opts).expect_err("refused");
        assert_eq!(err.to_string(), "sites/a.jsonl:1: label \"c\" is not in the job's label set");
    }

    #[test]
    fn error_never_quotes_the_text() {
        let err = jsonl(b"{\"text\":\"my secret\", \"label\": 3.5, }\n", &ReadOptions::default()).expect_err("refused");
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn skip_invalid_counts_every_skipped_line() {
        let opts = ReadOptions { skip_invalid: true, ..Default::default() };
        let r = jsonl(
            b"{\"text\":\"a\",\"label\":\"x\"}\nnope\n{\"text\":\"\",\"label\":\"x\"}\n{\"label\":\"x\"}\n",
            &opts,
        )
        .expect("skipping");
        assert_eq!(r.examples.len(), 1);
        let lines: Vec<u64> = r.skipped.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 4]);
        assert_eq!(r.skipped_by_kind().get("bad_json"), Some(&1));
    }

    #[cfg(unix)]
    #[test]
    fn written_records_are_readable_by_the_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("train.jsonl");
        std::fs::write(&path, "old").expect("an older, world-readable file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = Example { text: "a".into(), label: "calm".into() };
        write_jsonl(&path, &[e]).expect("write");
        assert_eq!(std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777, 0o600);
        write_jsonl(&dir.path().join("new.jsonl"), &[]).expect("write");
        let mode = std::fs::metadata(dir.path().join("new.jsonl")).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn empty_file_is_an_error() {
        check_err(b"\n\n", "sites/a.jsonl: no valid records");
    }

    fn csv(input: &[u8], opts: &ReadOptions) -> Result<ReadReport, DataError> {
        read_csv(input, Path::new("b.csv"), opts)
    }

    #[test]
    fn csv_named_columns() {
        let opts =
            ReadOptions { text_column: Some("post".into()), label_column: Some("sub".into()), ..Default::default() };
        let r = csv(b"id,post,sub\n1,\"hello, world\",anx\n2,\"multi\nline\",dep\n", &opts).expect("valid csv");
        assert_eq!(r.examples.len(), 2);
        assert_eq!(r.examples[1].text, "multi\nline");
    }

    fn check_csv_err(input: &[u8], expected: &str) {
        let err = csv(input, &ReadOptions::default()).expect_err("input must be refused");
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn csv_missing_column_lists_available() {
        check_csv_err(b"id,post\n1,x\n", "b.csv: CSV header has no column \"text\" (columns: id, post)");
    }

    #[test]
    fn csv_line_numbers_count_multiline_records() {
        check_csv_err(b"text,label\n\"a\nb\",x\n,y\n", "b.csv:4: empty text");
    }

    #[test]
    fn csv_invalid_utf8() {
        check_csv_err(b"text,label\nok,x\n\xfe,y\n", "b.csv:3: invalid UTF-8");
    }

    #[test]
    fn numeric_table_reads_features_and_reports_bad_cells() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("phq.csv");
        std::fs::write(&path, "q1,q2,severity\n1,2,mild\n3,x,severe\n2,2,mild\n").expect("write");
        let err = read_table(&path, "severity", &ReadOptions::default()).expect_err("refused");
        assert_eq!(err.to_string(), format!("{}:3: column \"q2\" is not a finite number", path.display()));
        let t = read_table(&path, "severity", &ReadOptions { skip_invalid: true, ..Default::default() }).expect("skip");
        assert_eq!(t.columns, vec!["q1", "q2"]);
        assert_eq!(t.rows, vec![vec![1.0, 2.0], vec![2.0, 2.0]]);
        assert_eq!(t.skipped.len(), 1);
    }

    #[test]
    fn debug_hides_text() {
        let e = Example { text: "private words".into(), label: "a".into() };
        assert_eq!(format!("{e:?}"), "Example { text: <13 chars>, label: \"a\" }");
    }
}
