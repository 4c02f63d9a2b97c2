//! Output: human-readable text or one JSON object per line (`--json`), plus the small
//! formatting helpers (times, hex, terminal-safe text) the commands share.

use parley_sdk::Timestamp;
use std::io::Write as _;
use zeroize::Zeroizing;

/// Where command results go: stdout, as text for people or as JSON lines.
#[derive(Debug, Clone)]
pub struct Out {
    json: bool,
}

impl Out {
    /// An output in JSON mode or not.
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    /// Whether `--json` was given.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Prints one result: `value` as a JSON line with `--json`, otherwise the text `human`
    /// builds.
    pub fn record(&self, value: serde_json::Value, human: impl FnOnce() -> String) {
        if self.json {
            print_line(&value.to_string());
        } else {
            print_line(&human());
        }
    }

    /// Prints `value` as a JSON line with `--json`; nothing otherwise.
    pub fn json_only(&self, value: serde_json::Value) {
        if self.json {
            print_line(&value.to_string());
        }
    }

    /// Prints text for people only (nothing with `--json`).
    pub fn note(&self, text: &str) {
        if !self.json {
            print_line(text);
        }
    }
}

/// Writes one line to stdout. A closed stdout (`parley history | head -1`) is not an error:
/// the command still finishes its work (the local store must stay consistent).
pub fn print_line(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

/// A UTC time `YYYY-MM-DD HH:MM:SS` from milliseconds since the Unix epoch.
pub fn format_ts(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", of_day / 3600, of_day % 3600 / 60, of_day % 60)
}

/// [`format_ts`] of a wire timestamp (one beyond `i64` milliseconds shows as the latest time).
pub fn format_time(ts: Timestamp) -> String {
    format_ts(i64::try_from(ts).unwrap_or(i64::MAX))
}

/// The proleptic Gregorian date of a day number (days since 1970-01-01), after Howard
/// Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> Zeroizing<String> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Zeroizing::new(String::with_capacity(bytes.len() * 2));
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)] as char);
        out.push(DIGITS[usize::from(byte & 0xf)] as char);
    }
    out
}

/// Hex in groups of 8 digits, easier to copy by hand.
pub fn grouped_hex(bytes: &[u8]) -> Zeroizing<String> {
    let plain = hex(bytes);
    let mut out = Zeroizing::new(String::with_capacity(plain.len() + plain.len() / 8));
    for (i, c) in plain.chars().enumerate() {
        if i > 0 && i % 8 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// Parses a 32-byte secret written as 64 hex digits; whitespace and `-` between digits are
/// ignored.
pub fn parse_secret(text: &str) -> Result<Zeroizing<[u8; 32]>, &'static str> {
    let digits: Zeroizing<Vec<u8>> = Zeroizing::new(text.bytes().filter(|b| !b.is_ascii_whitespace() && *b != b'-').collect());
    if digits.len() != 64 {
        return Err("the recovery secret is 64 hex digits");
    }
    let mut secret = Zeroizing::new([0u8; 32]);
    for (out, pair) in secret.iter_mut().zip(digits.chunks_exact(2)) {
        let value = |d: u8| (d as char).to_digit(16).ok_or("the recovery secret may only contain hex digits (0-9, a-f)");
        *out = ((value(pair[0])? << 4) | value(pair[1])?) as u8;
    }
    Ok(secret)
}

/// `text` safe to print on a terminal: control characters (other than newline and tab),
/// which a peer could use to rewrite the screen, are shown escaped.
pub fn terminal_safe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A message body for a one-entry display: terminal-safe, continuation lines indented.
pub fn indent_body(body: &str, indent: usize) -> String {
    terminal_safe(body).replace('\n', &format!("\n{}", " ".repeat(indent)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(format_ts(0), "1970-01-01 00:00:00");
        assert_eq!(format_ts(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(format_ts(1_709_251_199_999), "2024-02-29 23:59:59");
        assert_eq!(format_ts(4_102_444_800_000), "2100-01-01 00:00:00");
        assert_eq!(format_ts(-1000), "1969-12-31 23:59:59");
    }

    #[test]
    fn secrets_round_trip() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 37) as u8);
        assert_eq!(parse_secret(&hex(&bytes)).unwrap().as_slice(), bytes);
        assert_eq!(parse_secret(&grouped_hex(&bytes)).unwrap().as_slice(), bytes);
        assert_eq!(parse_secret(&hex(&bytes).to_uppercase()).unwrap().as_slice(), bytes);
        assert!(parse_secret("abc").is_err());
        assert!(parse_secret(&"zz".repeat(32)).is_err());
        assert!(parse_secret(&"é".repeat(32)).is_err());
        assert_eq!(grouped_hex(&bytes).split(' ').count(), 8);
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(terminal_safe("hi\x1b[2Jthere\r\nok\t!"), "hi\\u{1b}[2Jthere\\r\nok\t!");
        assert_eq!(indent_body("a\nb", 2), "a\n  b");
    }
}
