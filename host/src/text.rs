//! Text from outside (a plugin's messages, a saga's input, an operator's note) on its way to a
//! terminal or a log line.

/// Control characters (escapes, newlines, NUL) and characters that hide or reorder the text
/// around them (bidirectional overrides and isolates, zero-width marks, the BOM): shown as they
/// are they could move a terminal's cursor, forge a line, or make a line read otherwise than it
/// says ("refunded" spelt backwards behind a right-to-left override).
pub fn hides_or_reorders(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{61c}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// `text` with every character [`hides_or_reorders`] as a space.
pub fn shown(text: &str) -> String {
    text.chars().map(|c| if hides_or_reorders(c) { ' ' } else { c }).collect()
}
