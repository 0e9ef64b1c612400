//! Human tables for both CLIs (the coordinator's `jobs`, `sites`, `models` and demo
//! tables; the site's `data split`, `train-local` and `finetune`), so they look alike.

use comfy_table::{CellAlignment, LineStyle, Table, TableStyle};

/// Plain columns with a rule under the header: no box drawing, so the output pastes
/// into mail and tickets as it looks.
const STYLE: TableStyle = TableStyle::new().header_separator(LineStyle::none().fill('-').junction('-'));

/// A table for people: column widths by display width (Korean labels take two cells a
/// character and still align) and the columns `right` (numbers) right-aligned.
/// Print it with `{}`; every line has the same display width.
pub fn table(header: &[&str], right: &[usize]) -> Table {
    let mut t = Table::new();
    t.load_style(STYLE);
    t.set_header(header.to_vec());
    for &i in right {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// Test support: panics unless every line of the rendered table has the same display
/// width (the columns align).
#[cfg(feature = "test-support")]
pub fn assert_aligned(t: &Table) {
    let text = t.to_string();
    let widths: Vec<usize> = text.lines().map(unicode_width::UnicodeWidthStr::width).collect();
    assert!(widths.len() > 2, "{text}");
    assert!(widths.iter().all(|w| *w == widths[0]), "widths {widths:?} in\n{text}");
}
