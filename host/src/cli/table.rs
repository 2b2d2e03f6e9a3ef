//! The human output of the CLI: tables with aligned columns and `key: value` blocks, coloured
//! only when asked to (the caller decides: a terminal, and no `NO_COLOR`).
//!
//! Every cell is sanitised: control characters (an ANSI escape in a plugin's error message, a
//! newline in a note) become spaces, so what the API returns can never move the cursor, recolour
//! the terminal or break a row in two.

/// How a cell is drawn when colour is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Plain,
    Good,
    Warn,
    Bad,
    Dim,
}

impl Style {
    fn code(self) -> Option<&'static str> {
        match self {
            Style::Plain => None,
            Style::Good => Some("32"),
            Style::Warn => Some("33"),
            Style::Bad => Some("31"),
            Style::Dim => Some("2"),
        }
    }
}

/// One cell: its text (sanitised) and style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    text: String,
    style: Style,
}

impl Cell {
    pub fn new(text: impl AsRef<str>, style: Style) -> Cell {
        Cell { text: sanitise(text.as_ref()), style }
    }

    /// A saga or step status, coloured by what it means to an operator: done, undone, stuck.
    pub fn status(status: &str) -> Cell {
        let style = match status {
            "COMPLETED" | "succeeded" | "compensated" => Style::Good,
            "CANCELLED" | "COMPENSATING" | "compensating" | "failed" | "retrying" | "waiting" => Style::Warn,
            "COMPENSATION_FAILED" | "compensation_failed" => Style::Bad,
            _ => Style::Plain,
        };
        Cell::new(status, style)
    }

    /// An absent value: `-`, dimmed.
    pub fn none() -> Cell {
        Cell::new("-", Style::Dim)
    }

    /// The text, or `-` when absent or empty.
    pub fn opt(text: Option<&str>) -> Cell {
        match text {
            Some(t) if !t.is_empty() => Cell::from(t),
            _ => Cell::none(),
        }
    }

    fn width(&self) -> usize {
        self.text.chars().count()
    }

    fn paint(&self, colour: bool, out: &mut String) {
        match self.style.code().filter(|_| colour) {
            Some(code) => {
                out.push_str("\x1b[");
                out.push_str(code);
                out.push('m');
                out.push_str(&self.text);
                out.push_str("\x1b[0m");
            }
            None => out.push_str(&self.text),
        }
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Cell {
        Cell::new(text, Style::Plain)
    }
}

impl From<String> for Cell {
    fn from(text: String) -> Cell {
        Cell::new(text, Style::Plain)
    }
}

/// Control characters (escapes, newlines, tabs) and those that hide or reorder text become
/// spaces.
fn sanitise(text: &str) -> String {
    crate::text::shown(text)
}

/// Rows under a header, each column as wide as its widest cell, two spaces apart. The last
/// column is not padded, so a long message at the end of a row leaves no trailing blanks.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Table {
        Table { headers: headers.to_vec(), rows: Vec::new() }
    }

    /// Adds a row; it must have one cell per header.
    pub fn row(&mut self, cells: Vec<Cell>) {
        assert_eq!(cells.len(), self.headers.len(), "a row of {} cells under {:?}", cells.len(), self.headers);
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self, colour: bool) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.width());
            }
        }
        let mut out = String::new();
        let header: Vec<Cell> = self.headers.iter().map(|h| Cell::new(h, Style::Plain)).collect();
        line(&header, &widths, colour, true, &mut out);
        for row in &self.rows {
            line(row, &widths, colour, false, &mut out);
        }
        out
    }
}

fn line(cells: &[Cell], widths: &[usize], colour: bool, bold: bool, out: &mut String) {
    let last = cells.len().saturating_sub(1);
    let start = out.len();
    for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
        if bold && colour {
            out.push_str("\x1b[1m");
            cell.paint(false, out);
            out.push_str("\x1b[0m");
        } else {
            cell.paint(colour, out);
        }
        if i < last {
            out.extend(std::iter::repeat_n(' ', width - cell.width() + 2));
        }
    }
    // An empty last cell would leave the padding of the one before it.
    let trimmed = out[start..].trim_end().len();
    out.truncate(start + trimmed);
    out.push('\n');
}

/// `key: value` lines with the values aligned, for one resource.
pub fn pairs(pairs: &[(&str, Cell)], colour: bool) -> String {
    let width = pairs.iter().map(|(k, _)| k.chars().count() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        out.push_str(key);
        out.push(':');
        out.extend(std::iter::repeat_n(' ', width - key.chars().count() - 1 + 1));
        value.paint(colour, &mut out);
        out.push('\n');
    }
    out
}

/// A digest shortened for a table: `sha256:` and the first 12 hex digits.
pub fn short_digest(digest: &str) -> String {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() > 12 => format!("sha256:{}", &hex[..12]),
        _ => digest.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_the_widest_cell_and_the_last_is_not_padded() {
        let mut t = Table::new(&["ID", "STATUS", "REASON"]);
        t.row(vec!["a".into(), Cell::status("COMPLETED"), Cell::none()]);
        t.row(vec!["bbbb".into(), Cell::status("CANCELLED"), "payment: card declined".into()]);
        assert_eq!(
            t.render(false),
            "ID    STATUS     REASON\n\
             a     COMPLETED  -\n\
             bbbb  CANCELLED  payment: card declined\n"
        );
    }

    #[test]
    fn an_empty_last_cell_leaves_no_trailing_blanks() {
        let mut t = Table::new(&["KEY", "NOTE"]);
        t.row(vec!["k".into(), "".into()]);
        assert_eq!(t.render(false), "KEY  NOTE\nk\n");
    }

    #[test]
    fn widths_count_characters_not_bytes() {
        let mut t = Table::new(&["N", "X"]);
        t.row(vec!["żółw".into(), "1".into()]);
        t.row(vec!["ab".into(), "2".into()]);
        assert_eq!(t.render(false), "N     X\nżółw  1\nab    2\n");
    }

    #[test]
    fn colour_wraps_styled_cells_only_when_asked_and_alignment_ignores_it() {
        let mut t = Table::new(&["STATUS", "ID"]);
        t.row(vec![Cell::status("COMPENSATION_FAILED"), "x".into()]);
        t.row(vec![Cell::status("CREATED"), "y".into()]);
        let plain = t.render(false);
        assert!(!plain.contains('\x1b'), "{plain:?}");
        let coloured = t.render(true);
        assert!(coloured.contains("\x1b[31mCOMPENSATION_FAILED\x1b[0m  x"), "{coloured:?}");
        // Same layout once the escapes are removed.
        let stripped = coloured.replace("\x1b[31m", "").replace("\x1b[1m", "").replace("\x1b[0m", "");
        assert_eq!(stripped, plain);
    }

    #[test]
    fn control_characters_from_the_api_cannot_reach_the_terminal() {
        let mut t = Table::new(&["ERROR"]);
        t.row(vec!["boom\x1b[2J\nsecond line\tend".into()]);
        let out = t.render(true);
        assert_eq!(out, "\x1b[1mERROR\x1b[0m\nboom [2J second line end\n");
        assert_eq!(pairs(&[("note", "a\rb".into())], false), "note: a b\n");
        // Nor can text reorder or hide what follows it on the line.
        assert_eq!(pairs(&[("reason", "paid \u{202e}dednufer\u{200b}x".into())], false), "reason: paid  dednufer x\n");
    }

    #[test]
    fn pairs_align_their_values() {
        let out =
            pairs(&[("id", "x".into()), ("status", Cell::status("COMPLETED")), ("reason", Cell::opt(None))], false);
        assert_eq!(out, "id:     x\nstatus: COMPLETED\nreason: -\n");
    }

    #[test]
    fn digests_are_shortened_for_tables_only_when_long() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(short_digest(&d), "sha256:abababababab");
        assert_eq!(short_digest("sha256:abc"), "sha256:abc");
        assert_eq!(short_digest("other"), "other");
    }
}
