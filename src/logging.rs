//! The daemon's log output: a line per record on stderr, with the record's key-values.
//!
//! `Pretty` reads well on a terminal; `Json` (ndjson, one object per line) is for collectors.
//! `Format::auto` picks pretty on a terminal and ndjson otherwise. (femme, the usual choice,
//! decides by build profile only, so it cannot follow the terminal or a flag.)

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::SystemTime;

use log::kv::{Key, Value, VisitSource};
use log::{Level, LevelFilter, Log, Metadata, Record};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Pretty,
    Json,
}

impl Format {
    /// Pretty on a terminal, ndjson otherwise.
    pub fn auto() -> Format {
        if std::io::stderr().is_terminal() {
            Format::Pretty
        } else {
            Format::Json
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Format::auto()),
            "pretty" => Ok(Format::Pretty),
            "json" => Ok(Format::Json),
            other => Err(format!("{other:?} is not one of auto, pretty, json")),
        }
    }
}

/// Installs the logger. Records from other crates are shown from `warn` up only.
pub fn init(level: LevelFilter, format: Format) -> Result<(), log::SetLoggerError> {
    let colour = std::io::stderr().is_terminal();
    log::set_boxed_logger(Box::new(Logger { level, format, colour }))?;
    log::set_max_level(level);
    Ok(())
}

struct Logger {
    level: LevelFilter,
    format: Format,
    /// Pretty lines are coloured only on a terminal: a file or a pipe gets plain text.
    colour: bool,
}

impl Log for Logger {
    fn enabled(&self, meta: &Metadata) -> bool {
        let limit = if meta.target().starts_with("relayd") {
            self.level
        } else {
            self.level.min(LevelFilter::Warn)
        };
        meta.level() <= limit
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = match self.format {
            Format::Pretty => pretty(record, self.colour),
            Format::Json => json(record),
        };
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// `time LEVEL message key=value…`: a value with a space, a quote, an `=` or nothing at all
/// is quoted (logfmt's rule), so that a line splits back into its pairs.
fn pretty(record: &Record, colour: bool) -> String {
    let (level, dim, reset) = match (colour, record.level()) {
        (false, _) => ("", "", ""),
        (true, Level::Error) => ("\x1b[31m", "\x1b[2m", "\x1b[0m"),
        (true, Level::Warn) => ("\x1b[33m", "\x1b[2m", "\x1b[0m"),
        (true, Level::Info) => ("\x1b[32m", "\x1b[2m", "\x1b[0m"),
        (true, Level::Debug | Level::Trace) => ("\x1b[36m", "\x1b[2m", "\x1b[0m"),
    };
    let mut line = format!("{} {level}{:<5}{reset} {}", now(), record.level(), record.args());
    let mut pairs = Pairs(|key: &str, value: &Value| {
        let text = value.to_string();
        let bare = !text.is_empty() && !text.contains([' ', '"', '=', '\\', '\n', '\t']);
        let _ = write!(line, " {dim}{key}={reset}");
        match bare {
            true => line.push_str(&text),
            false => quote(&mut line, &text),
        }
    });
    let _ = record.key_values().visit(&mut pairs);
    line.push('\n');
    line
}

fn json(record: &Record) -> String {
    let mut line = format!(
        "{{\"time\":\"{}\",\"level\":\"{}\",\"msg\":",
        now(),
        record.level().as_str().to_lowercase()
    );
    quote(&mut line, &record.args().to_string());
    let mut pairs = Pairs(|key: &str, value: &Value| {
        line.push(',');
        quote(&mut line, key);
        line.push(':');
        match (value.to_u64(), value.to_i64(), value.to_bool()) {
            (Some(n), _, _) => line.push_str(&n.to_string()),
            (_, Some(n), _) => line.push_str(&n.to_string()),
            (_, _, Some(b)) => line.push_str(if b { "true" } else { "false" }),
            _ => quote(&mut line, &value.to_string()),
        }
    });
    let _ = record.key_values().visit(&mut pairs);
    line.push_str("}\n");
    line
}

/// A JSON string literal for `s`.
fn quote(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

struct Pairs<F>(F);

impl<'kvs, F: FnMut(&str, &Value)> VisitSource<'kvs> for Pairs<F> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        (self.0)(key.as_str(), &value);
        Ok(())
    }
}

/// Lets one warning a second through, and counts the ones it held back, so that no client can
/// drive the log's volume. Shared by the tasks that log the same warning (a route's sessions,
/// a listener's refusals); lock-free.
#[derive(Default)]
pub(crate) struct Squelch {
    /// Milliseconds since `epoch` when a line was last let through (0: never).
    last: std::sync::atomic::AtomicU64,
    held: std::sync::atomic::AtomicU64,
    epoch: std::sync::OnceLock<std::time::Instant>,
}

impl Squelch {
    /// `Some(held back since the last line)` when a line may be logged now.
    pub fn admit(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.epoch.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Relaxed);
        if last != 0 && now - last < 1000 || self.last.compare_exchange(last, now, Relaxed, Relaxed).is_err() {
            self.held.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.held.swap(0, Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_escape_strings_and_keep_numbers_bare() {
        let kvs = [("route", Value::from("a\\b")), ("bytes", Value::from(42u64))];
        let line = json(
            &Record::builder()
                .args(format_args!("say \"hi\"\n"))
                .level(Level::Warn)
                .key_values(&kvs)
                .build(),
        );
        assert!(line.contains(r#""level":"warn","msg":"say \"hi\"\n""#), "{line}");
        assert!(line.trim_end().ends_with(r#","route":"a\\b","bytes":42}"#), "{line}");
    }

    #[test]
    fn pretty_lines_quote_values_that_need_it_and_colour_only_when_asked() {
        let kvs = [
            ("why", Value::from("no healthy backend (0 tried)")),
            ("route", Value::from("web")),
        ];
        let record = |kvs: &[(&str, Value<'_>)]| {
            pretty(
                &Record::builder()
                    .args(format_args!("session closed"))
                    .level(Level::Warn)
                    .key_values(&kvs)
                    .build(),
                false,
            )
        };
        let line = record(&kvs);
        assert!(
            line.trim_end()
                .ends_with(r#"session closed why="no healthy backend (0 tried)" route=web"#),
            "{line}"
        );
        assert!(!line.contains('\x1b'), "no colour codes off a terminal: {line:?}");
        let coloured = pretty(
            &Record::builder().args(format_args!("x")).level(Level::Info).build(),
            true,
        );
        assert!(coloured.contains("\x1b[32m"), "{coloured:?}");
    }
}
