//! Reading the RON text into a [`Config`], with every problem the parser lets us find at once:
//! each located by line, column and path (`routes[0].backends[1].weight`), in words
//! (`expected an integer, found a string`), with a "did you mean" for a misspelt name.
//!
//! RON's parser stops at its first error. A value of the wrong type, or a field of an unknown
//! name, is a problem of one field only, so the reader blanks that field out (spaces in place
//! of its text, so every line and column stays where it was; a list's element is put in place
//! by a value of the type it should have, so the elements after it keep their index) and
//! reads again, up to [`PROBLEMS_MAX`] times. A syntax error (a missing comma, an unclosed bracket) ends the read:
//! after it nothing can be located with confidence.

use serde::de::IgnoredAny;

use super::Config;
use crate::error::Misread;

/// Problems reported from one file at most; past them the reader stops.
const PROBLEMS_MAX: usize = 20;

fn options() -> ron::Options {
    ron::Options::default().with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
}

/// The config `text` holds, or every problem found in it (at least one).
pub(super) fn read(text: &str) -> Result<Config, Vec<Misread>> {
    let mut text = text.to_string();
    let mut problems: Vec<Misread> = Vec::new();
    loop {
        let error = match read_once(&text) {
            Ok(config) if problems.is_empty() => return Ok(config),
            Ok(_) => return Err(problems),
            Err(error) => error,
        };
        // A required field missing once a field was blanked is the blank's doing, not the file's.
        if !problems.is_empty() && matches!(error.code, ron::Error::MissingStructField { .. }) {
            return Err(problems);
        }
        let mend = mend(&text, &error);
        problems.push(misread(&text, &error));
        match mend {
            Some((start, end, with)) if problems.len() < PROBLEMS_MAX => put_in_place(&mut text, start, end, with),
            _ => return Err(problems),
        }
    }
}

/// What one read found: the error, where, and the path serde was at.
struct Found {
    code: ron::Error,
    span: ron::error::Span,
    path: String,
}

/// The config, or what stopped the read (boxed: a RON error is large, a config no smaller).
fn read_once(text: &str) -> Result<Config, Box<Found>> {
    let spanned = |e: ron::error::SpannedError| {
        Box::new(Found {
            code: e.code,
            span: e.span,
            path: String::new(),
        })
    };
    let mut de = ron::Deserializer::from_str_with_options(text, &options()).map_err(spanned)?;
    let config = match serde_path_to_error::deserialize::<_, Config>(&mut de) {
        Ok(config) => config,
        Err(e) => {
            let path = e.path().to_string();
            let error = de.span_error(e.into_inner());
            let path = if path == "." { String::new() } else { path };
            return Err(Box::new(Found {
                path,
                ..*spanned(error)
            }));
        }
    };
    de.end().map_err(|e| spanned(de.span_error(e)))?;
    Ok(config)
}

/// A problem in words, with its place (the value's first character, not the space before
/// it where RON's span starts) and path.
fn misread(text: &str, found: &Found) -> Misread {
    let mut at = offset(text, found.span.start).min(text.len());
    at += text[at..].len() - text[at..].trim_start().len();
    let what = || found_here(&text[at..]);
    let message = match &found.code {
        ron::Error::ExpectedInteger => format!("expected an integer, found {}", what()),
        ron::Error::ExpectedFloat => format!("expected a number, found {}", what()),
        ron::Error::ExpectedString | ron::Error::ExpectedStringEnd => {
            format!("expected a string in double quotes, found {}", what())
        }
        ron::Error::ExpectedBoolean => format!("expected true or false, found {}", what()),
        ron::Error::ExpectedArray => format!("expected a list [ … ], found {}", what()),
        ron::Error::ExpectedMap => format!("expected a map {{ \"name\": … }}, found {}", what()),
        ron::Error::ExpectedStructLike | ron::Error::ExpectedNamedStructLike(_) => {
            format!("expected ( field: value, … ), found {}", what())
        }
        ron::Error::IntegerOutOfBounds => "the number is out of range for this field".into(),
        ron::Error::InvalidValueForType { expected, found } => format!("expected {expected}, found {found}"),
        code @ (ron::Error::NoSuchStructField { expected, found, .. }
        | ron::Error::NoSuchEnumVariant { expected, found, .. }) => {
            let kind = match code {
                ron::Error::NoSuchStructField { .. } => "field",
                _ => "variant",
            };
            let known = expected.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
            match suggestion(expected, found) {
                Some(near) => format!("no {kind} named `{found}`; did you mean `{near}`?"),
                None => format!("no {kind} named `{found}` (known: {known})"),
            }
        }
        other => other.to_string(),
    };
    let line = text[..at].matches('\n').count() + 1;
    let col = text[..at].rsplit('\n').next().unwrap_or_default().chars().count() + 1;
    Misread {
        line,
        col,
        path: found.path.clone(),
        message,
    }
}

/// What the text at a value's start is, in a word.
fn found_here(rest: &str) -> &'static str {
    match rest.trim_start().chars().next() {
        Some('"') => "a string",
        Some('[') => "a list",
        Some('{') => "a map",
        Some('(') => "( … )",
        Some(c) if c.is_ascii_digit() || c == '-' || c == '+' => "a number",
        Some(_) if rest.starts_with("true") || rest.starts_with("false") => "a boolean",
        Some(_) => "a name",
        None => "the end of the file",
    }
}

/// The known name nearest to a misspelt one (as HAProxy offers one), when one is near enough
/// to be what was meant: at most a third of its letters off.
fn suggestion(expected: &[&'static str], found: &str) -> Option<&'static str> {
    // Optimal string alignment: a swap of two neighbours is one edit (`Tpc` is one from `Tcp`).
    let distance = |name: &str| strsim::osa_distance(name, found);
    let best = *expected.iter().min_by_key(|name| distance(name))?;
    (distance(best) <= best.len().max(found.len()) / 3).then_some(best)
}

/// The byte offset of a 1-based line and column (in characters).
fn offset(text: &str, at: ron::error::Position) -> usize {
    let line_start: usize = text
        .split_inclusive('\n')
        .take(at.line.saturating_sub(1))
        .map(str::len)
        .sum();
    let line = &text[line_start.min(text.len())..];
    let col: usize = line.chars().take(at.col.saturating_sub(1)).map(char::len_utf8).sum();
    line_start + col
}

/// How to read past a problem of one field's value or name, or one list element's: the
/// bytes to put something in place of, and what (a field goes, an element is put in place by
/// a value of the type it should have). `None` when the problem is not one of those.
fn mend(text: &str, found: &Found) -> Option<(usize, usize, &'static str)> {
    let at = offset(text, found.span.start);
    let typed = match &found.code {
        ron::Error::ExpectedInteger | ron::Error::ExpectedFloat | ron::Error::IntegerOutOfBounds => Some("0"),
        ron::Error::ExpectedString => Some("\"\""),
        ron::Error::ExpectedBoolean => Some("false"),
        ron::Error::ExpectedArray => Some("[]"),
        ron::Error::ExpectedMap => Some("{}"),
        ron::Error::ExpectedStructLike | ron::Error::ExpectedNamedStructLike(_) => Some("()"),
        ron::Error::InvalidValueForType { .. } | ron::Error::NoSuchEnumVariant { .. } => None,
        ron::Error::NoSuchStructField { .. } => None,
        _ => return None,
    };
    let (start, value, with) = match &found.code {
        // The span is the unknown name: the value follows its colon.
        ron::Error::NoSuchStructField { .. } => {
            let colon = at + text[at..].find(':')?;
            (at, colon + 1, "")
        }
        _ => {
            // A sign before a number out of bounds is the value's too.
            let value = text[..at].trim_end_matches(['-', '+']).len();
            match found.path.ends_with(']') {
                // A list's element: a value of its type in its place.
                true => (value, value, typed?),
                // A field: gone, from its name, `name: value`.
                false => {
                    let before = text[..value].trim_end().strip_suffix(':')?.trim_end();
                    let name = before.trim_end_matches(|c: char| c.is_alphanumeric() || c == '_');
                    (name.len(), value, "")
                }
            }
        }
    };
    let mut de = ron::Deserializer::from_str_with_options(&text[value..], &options()).ok()?;
    serde::Deserialize::deserialize(&mut de).map(|IgnoredAny| ()).ok()?;
    let mut end = text.len() - de.remainder().len();
    if with.is_empty() {
        // A field goes with the comma after it.
        let after = &text[end..];
        let trimmed = after.trim_start();
        if trimmed.starts_with(',') {
            end += after.len() - trimmed.len() + 1;
        }
    }
    (end > start).then_some((start, end, with))
}

/// `with` in place of `text[start..end]`, padded with spaces and its line ends kept: what
/// follows stays at its line and column (unless `with` is longer than what it replaces).
fn put_in_place(text: &mut String, start: usize, end: usize, with: &str) {
    let old = &text[start..end];
    let lead = old.len() - old.trim_start().len();
    let mut new: String = old[..lead].to_string();
    new.push_str(with);
    let rest = old[lead..].chars().skip(with.chars().count());
    new.extend(rest.map(|c| if c == '\n' { '\n' } else { ' ' }));
    text.replace_range(start..end, &new);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        read(text).unwrap_err().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn every_type_error_and_unknown_field_is_named_by_its_path_at_once() {
        let text = r#"(
    workers: "3",
    splice: 1,
    wrokers: 4,
    routes: [
        (name: "r", lisen: "127.0.0.1:0", protocol: Tpc,
         backends: [(addr: "127.0.0.1:1"), (addr: "127.0.0.1:2", weight: "3")],
         connect: (allow_ports: [443, "x", 70000])),
    ],
)"#;
        assert_eq!(
            problems(text),
            [
                "2:14: workers: expected an integer, found a string",
                "3:13: splice: expected true or false, found a number",
                "4:5: wrokers: no field named `wrokers`; did you mean `workers`?",
                "6:21: routes[0].lisen: no field named `lisen`; did you mean `listen`?",
                "6:53: routes[0].protocol: no variant named `Tpc`; did you mean `Tcp`?",
                "7:74: routes[0].backends[1].weight: expected an integer, found a string",
                "8:39: routes[0].connect.allow_ports[1]: expected an integer, found a string",
                "8:44: routes[0].connect.allow_ports[2]: the number is out of range for this field",
            ]
        );
    }

    #[test]
    fn a_syntax_error_ends_the_read_with_what_came_before_it() {
        let found = problems("(workers: \"3\", splice: true routes: [])");
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0], "1:11: workers: expected an integer, found a string");
        assert!(found[1].starts_with("1:29: "), "{found:?}");
    }

    #[test]
    fn a_field_far_from_every_known_name_gets_the_list_instead_of_a_guess() {
        let found = problems(r#"(routes: [(name: "r", frobnicate: 1)])"#);
        assert_eq!(found.len(), 1);
        assert!(
            found[0].contains("no field named `frobnicate` (known: `name`, `listen`"),
            "{found:?}"
        );
        assert!(!found[0].contains("did you mean"));
    }

    #[test]
    fn what_is_put_in_place_keeps_the_lines_and_columns_of_what_follows() {
        let mut text = "(a: \"é\",\n b: 1)".to_string();
        put_in_place(&mut text, 1, 9, "");
        assert_eq!(text.lines().nth(1), Some(" b: 1)"));
        assert_eq!(text.chars().count(), "(a: \"é\",\n b: 1)".chars().count());
        let mut list = "[ \"x\", 2]".to_string();
        put_in_place(&mut list, 1, 5, "0");
        assert_eq!(list, "[ 0  , 2]");
    }
}
