//! Text from outside (adapters, hubs, model files) made safe to print: control characters — terminal
//! escapes among them — are shown escaped, and length is bounded on a character boundary, never by
//! slicing bytes.

/// `text` with control and bidi-override characters escaped, cut to at most `max_chars` characters.
pub fn printable(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars * 2));
    for (i, c) in text.chars().enumerate() {
        if i == max_chars {
            out.push('…');
            break;
        }
        if c.is_control() || is_bidi_control(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Characters that reorder what a terminal shows (Trojan Source).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

pub fn human_count(n: u64) -> String {
    if n >= 950_000_000 { format!("{:.2}B", n as f64 / 1e9) } else { format!("{:.0}M", n as f64 / 1e6) }
}


#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn escapes_and_bounds() {
        assert_eq!(printable("plain", 10), "plain");
        assert_eq!(printable("\x1b[2Jgone", 20), "\\u{1b}[2Jgone");
        assert_eq!(printable("a\nb\rc", 20), "a\\nb\\rc");
        assert_eq!(printable("abc\u{202E}def", 20), "abc\\u{202e}def");
        assert_eq!(printable("ééééé", 3), "ééé…");
        assert_eq!(printable("", 3), "");
    }
}
