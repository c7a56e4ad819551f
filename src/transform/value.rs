//! The values expressions compute with and the vocabulary they share with the built-ins: the
//! evaluation value, the functions an expression calls, value maps, comparisons and casts.
//!
//! The parser and evaluator (`expr`) and the functions' rules (`builtins`) both speak these
//! types; kept here on their own, neither of those two modules has to import the other's.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use bson::Bson;

/// A value during evaluation: `None` when the path is absent (which differs from BSON null).
pub(super) type Value<'a> = Option<Cow<'a, Bson>>;

/// A function an expression calls.
#[derive(Debug, Clone)]
pub(super) enum Func {
    Cast(Cast),
    Ratio,
    CamelKeys,
    Default,
    Concat,
    Drop,
    /// A value map declared in the file's `[maps]`.
    Map(Arc<ValueMap>),
}

/// A named value map (`[maps.role] bot = "assistant"`); values it does not list pass through.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ValueMap {
    pub name: String,
    pub entries: BTreeMap<String, Bson>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    pub(super) fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

/// The casts (`ltv | decimal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cast {
    /// To Decimal128, for money: exact, keeps the source's digits (`"1290.50"` stays 1290.50).
    Decimal,
    /// To a 64-bit float, for ratios, durations and scores.
    Double,
    /// To a whole number: Int32 when it fits, Int64 otherwise; a fraction is an error.
    Int,
    /// To text: numbers in decimal, ObjectIds in hex, dates in RFC 3339.
    String,
    /// To a BSON date: from a date, an RFC 3339 string, or milliseconds since the epoch.
    Date,
}
impl Cast {
    pub(super) fn name(self) -> &'static str {
        match self {
            Cast::Decimal => "decimal",
            Cast::Double => "double",
            Cast::Int => "int",
            Cast::String => "string",
            Cast::Date => "date",
        }
    }
}
