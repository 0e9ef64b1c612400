//! What this site says about its own failures to the coordinator. A failed work item is
//! reported (the coordinator drops the site from the attempt at once, and logs why), and
//! the report reaches the audit log that every site and auditor reads: it carries this
//! crate's own words only, never a record and never a local path.

/// What a failed work item tells the coordinator: the outermost message (this crate's
/// own words) with local paths replaced by `<path>`, and, for an I/O error, its kind.
/// The causes below it stay in the site's log: a library's message (a parser's, say) may
/// quote the local file it read, and the coordinator (and, through the audit log, every
/// site) must never see a record; nor how the site lays out its disks.
pub(crate) fn failure_summary(e: &anyhow::Error) -> String {
    let io = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>()).map(|io| format!(": {}", io.kind()));
    let text = format!("{}{}", without_paths(&e.to_string()), io.unwrap_or_default());
    text.chars().take(400).collect()
}

/// Whether `w` starts like a file path: absolute, `~/`, `./`, `../` or a Windows drive.
fn is_path(w: &str) -> bool {
    let b = w.as_bytes();
    w.starts_with('/')
        || ["~/", "./", "../"].iter().any(|p| w.starts_with(p))
        || (b.len() > 2 && b[0].is_ascii_alphabetic() && b[1] == b':' && (b[2] == b'\\' || b[2] == b'/'))
}

/// `text` with every file path replaced by `<path>`: a quoted path (`"…"`, `'…'`,
/// `` `…` ``, spaces included) up to its closing quote, an unquoted one up to the next
/// space, its trailing punctuation kept.
fn without_paths(text: &str) -> String {
    const OPEN: [char; 4] = ['"', '\'', '(', '`'];
    const CLOSE: [char; 7] = [':', ',', ';', ')', '"', '\'', '`'];
    let mut unquoted = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(['"', '\'', '`']) {
        let quote = rest[at..].chars().next().unwrap_or('"');
        let after = &rest[at + 1..];
        match after.find(quote) {
            Some(end) if is_path(&after[..end]) => {
                unquoted.push_str(&rest[..at]);
                unquoted.push(quote);
                unquoted.push_str("<path>");
                unquoted.push(quote);
                rest = &after[end + 1..];
            }
            _ => {
                unquoted.push_str(&rest[..=at]);
                rest = after;
            }
        }
    }
    unquoted.push_str(rest);
    let words: Vec<String> = unquoted
        .split(' ')
        .map(|word| {
            let inner = word.trim_start_matches(OPEN);
            let lead = &word[..word.len() - inner.len()];
            if !is_path(inner) {
                return word.to_string();
            }
            let path = inner.trim_end_matches(CLOSE).trim_end_matches('.');
            format!("{lead}<path>{}", &inner[path.len()..])
        })
        .collect();
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_report_keeps_the_outer_message_and_the_io_kind_only() {
        let record = "I feel like ending it all tonight";
        let parse = anyhow::anyhow!("invalid type: string {record:?}, expected a label");
        let e = parse.context("reading train.jsonl line 4");
        assert_eq!(failure_summary(&e), "reading train.jsonl line 4", "the cause that quotes the record stays home");
        let full = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::StorageFull))
            .context("writing the model download /srv/psychiatry-ward/models/x.part");
        assert_eq!(failure_summary(&full), "writing the model download <path>: no storage space");
    }

    #[test]
    fn a_failure_report_names_no_local_path() {
        for (text, want) in [
            ("reading \"/data/ward 7/notes.jsonl\": bad line", "reading \"<path>\": bad line"),
            ("it's 'not/a path' or `/srv/a b`", "it's 'not/a path' or `<path>`"),
            ("opening ./site/train.jsonl, then ~/x.", "opening <path>, then <path>."),
            ("C:\\Data\\site.jsonl: locked", "<path>: locked"),
            ("cache (../cache/vectors) full", "cache (<path>) full"),
            ("round 3 of 5/7 sites: 1/2 done", "round 3 of 5/7 sites: 1/2 done"),
        ] {
            assert_eq!(without_paths(text), want, "{text}");
        }
    }
}
