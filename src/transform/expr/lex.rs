//! The tokens of the expression language, and the lexer that splits an expression into them,
//! each with its column for error messages.

use crate::transform::value::CmpOp;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
    Word(String),
    Str(String),
    Int(i64),
    Float(f64),
    LParen,
    RParen,
    Comma,
    Pipe,
    Cmp(CmpOp),
}

impl Tok {
    pub(super) fn describe(&self) -> String {
        match self {
            Tok::Word(w) => format!("`{w}`"),
            Tok::Str(s) => format!("'{s}'"),
            Tok::Int(i) => i.to_string(),
            Tok::Float(f) => f.to_string(),
            Tok::LParen => "`(`".into(),
            Tok::RParen => "`)`".into(),
            Tok::Comma => "`,`".into(),
            Tok::Pipe => "`|`".into(),
            Tok::Cmp(op) => format!("`{}`", op.symbol()),
        }
    }
}

/// Splits an expression into tokens, each with its 1-based column.
pub(super) fn lex(src: &str) -> Result<Vec<(usize, Tok)>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let col = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        let (tok, len) = match (c, two.as_str()) {
            (_, "==") => (Tok::Cmp(CmpOp::Eq), 2),
            (_, "!=") => (Tok::Cmp(CmpOp::Ne), 2),
            (_, "<=") => (Tok::Cmp(CmpOp::Le), 2),
            (_, ">=") => (Tok::Cmp(CmpOp::Ge), 2),
            ('<', _) => (Tok::Cmp(CmpOp::Lt), 1),
            ('>', _) => (Tok::Cmp(CmpOp::Gt), 1),
            ('(', _) => (Tok::LParen, 1),
            (')', _) => (Tok::RParen, 1),
            (',', _) => (Tok::Comma, 1),
            ('|', _) => (Tok::Pipe, 1),
            ('\'' | '"', _) => {
                let mut s = String::new();
                let mut j = i + 1;
                loop {
                    match chars.get(j) {
                        None => return Err(format!("unterminated string starting at column {col}")),
                        Some('\\') => {
                            let Some(&next) = chars.get(j + 1) else {
                                return Err(format!("unterminated string starting at column {col}"));
                            };
                            s.push(next);
                            j += 2;
                        }
                        Some(&q) if q == c => break,
                        Some(&other) => {
                            s.push(other);
                            j += 1;
                        }
                    }
                }
                (Tok::Str(s), j + 1 - i)
            }
            _ if c.is_ascii_digit() || (c == '-' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) => {
                let mut j = i + 1;
                while chars.get(j).is_some_and(char::is_ascii_digit) {
                    j += 1;
                }
                let is_float = chars.get(j) == Some(&'.') && chars.get(j + 1).is_some_and(char::is_ascii_digit);
                if is_float {
                    j += 1;
                    while chars.get(j).is_some_and(char::is_ascii_digit) {
                        j += 1;
                    }
                }
                let text: String = chars[i..j].iter().collect();
                let tok = if is_float {
                    Tok::Float(text.parse().map_err(|_| format!("bad number `{text}` at column {col}"))?)
                } else {
                    Tok::Int(text.parse().map_err(|_| format!("number `{text}` at column {col} is out of range"))?)
                };
                (tok, j - i)
            }
            _ if c.is_alphabetic() || c == '_' || c == '$' => {
                let mut j = i + 1;
                while chars.get(j).is_some_and(|&d| d.is_alphanumeric() || d == '_' || d == '.') {
                    j += 1;
                }
                (Tok::Word(chars[i..j].iter().collect()), j - i)
            }
            _ => return Err(format!("unexpected character `{c}` at column {col}")),
        };
        out.push((col, tok));
        i += len;
    }
    Ok(out)
}
