//! Errors found in definitions and configuration, collected rather than thrown.
//!
//! Start-up and `ficus validate` load every file, keep going past the first problem and report
//! them all at once, each naming the file and the field, so one run shows everything to fix.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionError {
    pub file: PathBuf,
    /// Dotted path of the offending field; empty when the problem is the whole file.
    pub field: String,
    pub message: String,
}

impl DefinitionError {
    pub fn new(file: &Path, field: impl Into<String>, message: impl Into<String>) -> Self {
        DefinitionError { file: file.to_path_buf(), field: field.into(), message: message.into() }
    }
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.field, self.message)
        }
    }
}

/// Reports a problem with a field (its dotted path) of the file being checked.
pub type Problem<'a> = &'a mut dyn FnMut(&str, String);

/// Every problem found, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub errors: Vec<DefinitionError>,
}

impl Report {
    pub fn push(&mut self, e: DefinitionError) {
        self.errors.push(e);
    }
    pub fn extend(&mut self, other: Report) {
        self.errors.extend(other.errors);
    }
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }
    /// `Ok(value)` when nothing was found, the report otherwise.
    pub fn into_result<T>(self, value: T) -> Result<T, Report> {
        if self.errors.is_empty() { Ok(value) } else { Err(self) }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} problem(s) found:", self.errors.len())?;
        for e in &self.errors {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Report {}

/// Reads and parses one TOML file, turning I/O, syntax and type problems into a
/// [`DefinitionError`] that names the field (its dotted path) and the line TOML reports.
pub fn read_toml<T: serde::de::DeserializeOwned>(file: &Path) -> Result<T, DefinitionError> {
    let text =
        std::fs::read_to_string(file).map_err(|e| DefinitionError::new(file, "", format!("cannot read: {e}")))?;
    parse_toml(&text).map_err(|(field, message)| DefinitionError::new(file, field, message))
}

/// Parses TOML text into `T`; an error comes as (dotted path of the field, message with line).
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, (String, String)> {
    let describe = |e: &toml::de::Error| {
        let at = e.span().map(|s| format!(" (line {})", text[..s.start].lines().count().max(1))).unwrap_or_default();
        format!("{}{at}", e.message().trim_end())
    };
    let de = toml::Deserializer::parse(text).map_err(|e| (String::new(), describe(&e)))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        (field, describe(e.inner()))
    })
}

/// The `*.toml` files directly in `dir`, sorted, or an error naming the directory.
pub fn toml_files(dir: &Path) -> Result<Vec<PathBuf>, DefinitionError> {
    let rd =
        std::fs::read_dir(dir).map_err(|e| DefinitionError::new(dir, "", format!("cannot read directory: {e}")))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct File {
        tail: Tail,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Tail {
        lease_ttl_ms: u64,
    }

    #[test]
    fn a_type_error_names_the_field_and_the_line() {
        let (field, message) = parse_toml::<File>("[tail]\n\nlease_ttl_ms = \"soon\"\n").unwrap_err();
        assert_eq!(field, "tail.lease_ttl_ms");
        assert!(message.contains("line 3"), "{message}");
        let (field, message) = parse_toml::<File>("[tail]\nlease_ttl_ms = 1\nttl = 2\n").unwrap_err();
        assert_eq!(field, "tail.ttl");
        assert!(message.contains("unknown field"), "{message}");
        let (field, message) = parse_toml::<File>("[tail\n").unwrap_err();
        assert_eq!(field, "");
        assert!(message.contains("line 1"), "{message}");
    }
}
