//! Human tables for the site's CLI (`data split`, `train-local`, `finetune`). The same
//! look as the coordinator's (`maeum_coordinator::client::table`); the two binaries
//! share no CLI crate, and these few lines are not worth one.

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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Every line of a rendered table has the same display width (the columns align).
    pub(crate) fn assert_aligned(t: &Table) {
        let text = t.to_string();
        let widths: Vec<usize> = text.lines().map(unicode_width::UnicodeWidthStr::width).collect();
        assert!(widths.len() > 2, "{text}");
        assert!(widths.iter().all(|w| *w == widths[0]), "widths {widths:?} in\n{text}");
    }
}
