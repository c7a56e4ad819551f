//! What the built-in functions of the expression language do: casts, ratios, key renaming,
//! defaults, concatenation, dropping sub-fields, value maps and comparisons.
//!
//! Kept apart from the parser so the rules that decide a target value (what a decimal string
//! may look like, what `ratio` does with a zero, how a key becomes camelCase) read on their own.
//! Absent values propagate (a cast of an absent field writes nothing) and null stays null;
//! anything else that does not fit is an error naming the offending value.
//!
//! The inverses of the invertible ones (casts, value maps, `camel_keys`) live here too, beside
//! the rules they undo: [`backward`] turns a service value back into the monolith's form, taking
//! the monolith's current value as the model for its type, lexical form and key spelling.

use std::borrow::Cow;
use std::cmp::Ordering;

use bson::{Bson, DateTime, Decimal128, Document};

use super::value::{Cast, CmpOp, Func, Value, ValueMap};

impl Cast {
    pub(super) fn apply(self, v: &Bson) -> Result<Bson, String> {
        let cast = match self {
            Cast::Decimal => to_decimal(v),
            Cast::Double => to_number(v).map(Bson::Double),
            Cast::Int => to_int(v),
            Cast::String => to_string(v),
            Cast::Date => to_date(v),
        };
        cast.ok_or_else(|| format!("cannot cast {} to {}", describe(v), self.name()))
    }
}

/// An integer the way MongoDB drivers store one: Int32 when it fits.
pub(super) fn int_value(i: i64) -> Bson {
    i32::try_from(i).map_or(Bson::Int64(i), Bson::Int32)
}

fn to_decimal(v: &Bson) -> Option<Bson> {
    let text = match v {
        Bson::Decimal128(_) => return Some(v.clone()),
        Bson::String(s) => s.trim().to_string(),
        Bson::Int32(i) => i.to_string(),
        Bson::Int64(i) => i.to_string(),
        Bson::Double(f) if f.is_finite() => f.to_string(),
        _ => return None,
    };
    // The Decimal128 parser also takes NaN and Infinity, which are not amounts.
    let lower = text.to_ascii_lowercase();
    if !lower.bytes().any(|b| b.is_ascii_digit()) || lower.contains("inf") || lower.contains("nan") {
        return None;
    }
    text.parse::<Decimal128>().ok().map(Bson::Decimal128)
}

/// A number as a float: from any numeric type, or from a numeric string for the `double` cast.
fn to_number(v: &Bson) -> Option<f64> {
    let f = match v {
        Bson::String(s) => s.trim().parse().ok()?,
        other => numeric(other)?,
    };
    f.is_finite().then_some(f)
}

/// The value of a numeric BSON type (strings are not numbers here).
fn numeric(v: &Bson) -> Option<f64> {
    match v {
        Bson::Int32(i) => Some(f64::from(*i)),
        Bson::Int64(i) => Some(*i as f64),
        Bson::Double(f) => Some(*f),
        Bson::Decimal128(d) => d.to_string().parse().ok(),
        _ => None,
    }
}

fn to_int(v: &Bson) -> Option<Bson> {
    match v {
        Bson::Int32(i) => Some(Bson::Int32(*i)),
        Bson::Int64(i) => Some(int_value(*i)),
        Bson::String(s) => s.trim().parse().ok().map(int_value),
        other => {
            let f = numeric(other)?;
            // Whole, and inside i64's range: [-2^63, 2^63), both ends exact as floats.
            let range = i64::MIN as f64..-(i64::MIN as f64);
            let whole = f.fract() == 0.0 && range.contains(&f);
            whole.then(|| int_value(f as i64))
        }
    }
}

fn to_string(v: &Bson) -> Option<Bson> {
    let s = match v {
        Bson::String(_) => return Some(v.clone()),
        Bson::Int32(i) => i.to_string(),
        Bson::Int64(i) => i.to_string(),
        Bson::Double(f) if f.is_finite() => f.to_string(),
        Bson::Decimal128(d) => d.to_string(),
        Bson::Boolean(b) => b.to_string(),
        Bson::ObjectId(oid) => oid.to_hex(),
        Bson::DateTime(d) => d.try_to_rfc3339_string().ok()?,
        _ => return None,
    };
    Some(Bson::String(s))
}

fn to_date(v: &Bson) -> Option<Bson> {
    match v {
        Bson::DateTime(_) => Some(v.clone()),
        Bson::String(s) => DateTime::parse_rfc3339_str(s.trim()).ok().map(Bson::DateTime),
        Bson::Int32(ms) => Some(Bson::DateTime(DateTime::from_millis(i64::from(*ms)))),
        Bson::Int64(ms) => Some(Bson::DateTime(DateTime::from_millis(*ms))),
        _ => None,
    }
}

fn is_null(v: &Value<'_>) -> bool {
    matches!(v.as_deref(), Some(Bson::Null))
}

/// The value unless it is absent or null.
fn present(v: Value<'_>) -> Value<'_> {
    v.filter(|b| !matches!(**b, Bson::Null))
}

/// Calls a function on evaluated arguments. An error names the argument (by index) it is about.
pub(super) fn call<'a>(func: &Func, args: Vec<Value<'a>>) -> Result<Value<'a>, (usize, String)> {
    let mut args = args.into_iter();
    let first = args.next().flatten();
    let owned = |b: Bson| Some(Cow::Owned(b));
    match func {
        Func::Default => Ok(present(first).or_else(|| args.next().flatten())),
        Func::Ratio => {
            let (Some(a), Some(b)) = (present(first), present(args.next().flatten())) else {
                return Ok(None);
            };
            let x = numeric(&a).ok_or_else(|| (0, format!("expected a number, found {}", found(&a))))?;
            let y = numeric(&b).ok_or_else(|| (1, format!("expected a number, found {}", found(&b))))?;
            Ok(owned(Bson::Double(if y == 0.0 { 0.0 } else { x / y })))
        }
        Func::Concat => {
            let mut out = String::new();
            for (i, v) in std::iter::once(first).chain(args).enumerate() {
                match v.as_deref() {
                    None | Some(Bson::Null) => return Ok(None),
                    Some(Bson::String(s)) => out.push_str(s),
                    Some(Bson::Int32(n)) => out.push_str(&n.to_string()),
                    Some(Bson::Int64(n)) => out.push_str(&n.to_string()),
                    Some(Bson::ObjectId(oid)) => out.push_str(&oid.to_hex()),
                    Some(other) => return Err((i, format!("expected text, found {}", found(other)))),
                }
            }
            Ok(owned(Bson::String(out)))
        }
        // Every other function passes absent and null through untouched.
        _ if first.is_none() || is_null(&first) => Ok(first),
        Func::Cast(cast) => {
            let v = first.as_deref().unwrap_or(&Bson::Null);
            cast.apply(v).map(owned).map_err(|e| (0, e))
        }
        Func::CamelKeys => {
            let v = first.as_deref().unwrap_or(&Bson::Null);
            camel_keys(v).map(owned).map_err(|e| (0, e))
        }
        Func::Drop => match first.as_deref() {
            Some(Bson::Document(d)) => {
                let mut d = d.clone();
                for path in args.flatten() {
                    if let Bson::String(p) = path.as_ref() {
                        remove_path(&mut d, p);
                    }
                }
                Ok(owned(Bson::Document(d)))
            }
            other => Err((0, format!("expected a document, found {}", found(other.unwrap_or(&Bson::Null))))),
        },
        Func::Map(map) => {
            let mapped = match first.as_deref() {
                Some(Bson::String(s)) => map.entries.get(s).cloned(),
                _ => None,
            };
            Ok(mapped.map_or(first, owned))
        }
    }
}

fn remove_path(doc: &mut Document, path: &str) {
    match path.split_once('.') {
        None => {
            doc.remove(path);
        }
        Some((head, rest)) => {
            if let Some(Bson::Document(inner)) = doc.get_mut(head) {
                remove_path(inner, rest);
            }
        }
    }
}

/// `avg_response_time` → `avgResponseTime`; leading underscores stay (`_id`).
pub(super) fn camel_case(key: &str) -> Cow<'_, str> {
    let body = key.trim_start_matches('_');
    if !body.contains('_') {
        return Cow::Borrowed(key);
    }
    let mut out = String::with_capacity(key.len());
    out.push_str(&key[..key.len() - body.len()]);
    let mut upper = false;
    for c in body.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Renames every key of a document, at every depth (inside arrays too), to camelCase.
fn camel_keys(v: &Bson) -> Result<Bson, String> {
    match v {
        Bson::Document(d) => {
            let mut out = Document::new();
            for (k, v) in d {
                let new = camel_case(k);
                if out.contains_key(new.as_ref()) {
                    let first = d.keys().find(|p| camel_case(p) == new).map_or("", String::as_str);
                    // Named in sorted order: source key order does not survive every hop.
                    let (a, b) = if first <= k.as_str() { (first, k.as_str()) } else { (k.as_str(), first) };
                    return Err(format!("keys `{a}` and `{b}` both become `{new}`"));
                }
                let value = match v {
                    Bson::Document(_) | Bson::Array(_) => camel_keys(v)?,
                    other => other.clone(),
                };
                out.insert(new.into_owned(), value);
            }
            Ok(Bson::Document(out))
        }
        Bson::Array(a) => a
            .iter()
            .map(|e| match e {
                Bson::Document(_) | Bson::Array(_) => camel_keys(e),
                other => Ok(other.clone()),
            })
            .collect::<Result<_, _>>()
            .map(Bson::Array),
        other => Err(format!("expected a document, found {}", found(other))),
    }
}

/// Compares two values; absent counts as null. Numbers compare by value whatever their BSON
/// type, strings and dates in their natural order; ordering anything against null is false.
pub(super) fn compare(op: CmpOp, l: Option<&Bson>, r: Option<&Bson>) -> Result<bool, String> {
    let (l, r) = (l.unwrap_or(&Bson::Null), r.unwrap_or(&Bson::Null));
    let ord = match (l, r) {
        (Bson::String(a), Bson::String(b)) => Some(a.cmp(b)),
        (Bson::DateTime(a), Bson::DateTime(b)) => Some(a.cmp(b)),
        _ => numeric(l).zip(numeric(r)).and_then(|(x, y)| x.partial_cmp(&y)),
    };
    match (op, ord) {
        (CmpOp::Eq, Some(o)) => Ok(o == Ordering::Equal),
        (CmpOp::Ne, Some(o)) => Ok(o != Ordering::Equal),
        (CmpOp::Lt, Some(o)) => Ok(o.is_lt()),
        (CmpOp::Le, Some(o)) => Ok(o.is_le()),
        (CmpOp::Gt, Some(o)) => Ok(o.is_gt()),
        (CmpOp::Ge, Some(o)) => Ok(o.is_ge()),
        (CmpOp::Eq, None) => Ok(l == r),
        (CmpOp::Ne, None) => Ok(l != r),
        _ if matches!(l, Bson::Null) || matches!(r, Bson::Null) => Ok(false),
        _ => Err(format!("cannot compare {} with {}", found(l), found(r))),
    }
}

/// A value as relaxed Extended JSON, shortened: for error messages.
pub(super) fn describe(v: &Bson) -> String {
    const MAX: usize = 80;
    let text = v.clone().into_relaxed_extjson().to_string();
    if text.chars().count() <= MAX {
        return text;
    }
    let cut: String = text.chars().take(MAX).collect();
    format!("{cut}…")
}

/// A value with its kind, for "expected …, found …".
pub(super) fn found(v: &Bson) -> String {
    let kind = match v {
        Bson::String(_) => "a string",
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => "a number",
        Bson::Boolean(_) => "a boolean",
        Bson::Null => return "null".into(),
        Bson::Document(_) => "a document",
        Bson::Array(_) => "an array",
        Bson::DateTime(_) => "a date",
        Bson::ObjectId(_) => "an ObjectId",
        _ => "a value",
    };
    format!("{kind} {}", describe(v))
}

/// Structural equality as the reverse sees it: documents compare whatever their key order,
/// doubles by value (NaN equal to itself), everything else exactly (so Decimal128 `1290.50` and
/// `1290.5` differ, as their lexical forms do).
pub(super) fn same(a: &Bson, b: &Bson) -> bool {
    match (a, b) {
        (Bson::Document(x), Bson::Document(y)) => same_doc(x, y),
        (Bson::Array(x), Bson::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same(v, w)),
        (Bson::Double(x), Bson::Double(y)) => x == y || (x.is_nan() && y.is_nan()),
        _ => a == b,
    }
}

/// [`same`] for two documents.
pub(super) fn same_doc(x: &Document, y: &Document) -> bool {
    x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
}

/// [`same`] over possibly absent values: absent equals only absent.
pub(super) fn same_opt(a: Option<&Bson>, b: Option<&Bson>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => same(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// One invertible step (a cast, a value map, `camel_keys`) applied forward to a present value.
pub(super) fn forward(func: &Func, v: &Bson) -> Result<Option<Bson>, String> {
    call(func, vec![Some(Cow::Borrowed(v))]).map(|out| out.map(Cow::into_owned)).map_err(|(_, why)| why)
}

/// The inverse of one invertible step: a value that `func` turns into `v`, written in the form
/// `like` (the monolith's current value) has, where the step allows. Null stays null.
pub(super) fn backward(func: &Func, v: &Bson, like: Option<&Bson>) -> Result<Bson, String> {
    if matches!(v, Bson::Null) {
        return Ok(Bson::Null);
    }
    match func {
        Func::Cast(cast) => uncast(*cast, v, like),
        Func::Map(map) => unmap(map, v),
        Func::CamelKeys => uncamel(v, like),
        _ => Err("this function has no inverse".into()),
    }
}

/// What a cast's service value must be: a number for `decimal`, `double` and `int`, a date for
/// `date`, text for `string`.
fn cast_accepts(cast: Cast, v: &Bson) -> bool {
    match cast {
        Cast::Decimal | Cast::Double | Cast::Int => numeric_kind(v),
        Cast::Date => matches!(v, Bson::DateTime(_)),
        Cast::String => matches!(v, Bson::String(_)),
    }
}

fn numeric_kind(v: &Bson) -> bool {
    matches!(v, Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_))
}

/// The inverse of a cast. The value is written in the BSON type the monolith holds now (text
/// stays text, a double a double, integers integral, a date a date, epoch milliseconds
/// milliseconds); with no value there, in the cast's default form: a decimal string for
/// `decimal` (money, as the monolith stores it), a double, an integer, text, a date. The result
/// must cast back to exactly the service's value, or it is an error: nothing is rounded or
/// retyped silently.
fn uncast(cast: Cast, v: &Bson, like: Option<&Bson>) -> Result<Bson, String> {
    if !cast_accepts(cast, v) {
        let wanted = match cast {
            Cast::Decimal | Cast::Double | Cast::Int => "a number",
            Cast::Date => "a date",
            Cast::String => "text",
        };
        return Err(format!("expected {wanted}, found {}", found(v)));
    }
    // The value the forward would produce from it: Int32(3) in a double field means 3.0.
    let target = cast.apply(v)?;
    let like = like.filter(|l| !matches!(l, Bson::Null)).filter(|l| cast.apply(l).is_ok());
    let candidate = match (cast, like) {
        (Cast::Date, like) => undate(&target, like),
        (Cast::String, like) => unstring(&target, like),
        (_, Some(like)) => renumber(&target, like),
        (Cast::Decimal, None) => to_string(&target),
        (_, None) => Some(target.clone()),
    };
    let kind = like.map_or("default", bson_kind);
    let fail = || format!("{} cannot be written back exactly as the monolith's {kind} value", describe(v));
    let candidate = candidate.ok_or_else(fail)?;
    match cast.apply(&candidate) {
        Ok(back) if same(&back, &target) => Ok(candidate),
        _ => Err(fail()),
    }
}

/// A number (a cast's output) in the numeric or text form of `like`.
fn renumber(target: &Bson, like: &Bson) -> Option<Bson> {
    let text = match target {
        Bson::Decimal128(d) => d.to_string(),
        Bson::Int32(i) => i.to_string(),
        Bson::Int64(i) => i.to_string(),
        Bson::Double(f) if f.is_finite() => f.to_string(),
        _ => return None,
    };
    let whole = || -> Option<i64> {
        text.parse::<i64>().ok().or_else(|| {
            let f: f64 = text.parse().ok()?;
            let range = i64::MIN as f64..-(i64::MIN as f64);
            (f.fract() == 0.0 && range.contains(&f)).then_some(f as i64)
        })
    };
    match like {
        Bson::String(_) => Some(Bson::String(text)),
        Bson::Int32(_) => whole().map(int_value),
        Bson::Int64(_) => whole().map(Bson::Int64),
        Bson::Double(_) => text.parse::<f64>().ok().map(Bson::Double),
        Bson::Decimal128(_) => text.parse::<Decimal128>().ok().map(Bson::Decimal128),
        _ => None,
    }
}

/// A date in the form of `like`: a date, RFC 3339 text or epoch milliseconds.
fn undate(target: &Bson, like: Option<&Bson>) -> Option<Bson> {
    let Bson::DateTime(d) = target else { return None };
    match like {
        Some(Bson::String(_)) => d.try_to_rfc3339_string().ok().map(Bson::String),
        Some(Bson::Int32(_)) => Some(int_value(d.timestamp_millis())),
        Some(Bson::Int64(_)) => Some(Bson::Int64(d.timestamp_millis())),
        _ => Some(target.clone()),
    }
}

/// Text back into the type `like` has: a number, a boolean, an ObjectId, a date, or text.
fn unstring(target: &Bson, like: Option<&Bson>) -> Option<Bson> {
    let Bson::String(text) = target else { return None };
    Some(match like {
        Some(Bson::Int32(_)) => int_value(text.parse().ok()?),
        Some(Bson::Int64(_)) => Bson::Int64(text.parse().ok()?),
        Some(Bson::Double(_)) => Bson::Double(text.parse().ok()?),
        Some(Bson::Decimal128(_)) => Bson::Decimal128(text.parse().ok()?),
        Some(Bson::Boolean(_)) => Bson::Boolean(text.parse().ok()?),
        Some(Bson::ObjectId(_)) => Bson::ObjectId(bson::oid::ObjectId::parse_str(text).ok()?),
        Some(Bson::DateTime(_)) => Bson::DateTime(DateTime::parse_rfc3339_str(text).ok()?),
        _ => target.clone(),
    })
}

fn bson_kind(v: &Bson) -> &'static str {
    match v {
        Bson::String(_) => "text",
        Bson::Int32(_) => "Int32",
        Bson::Int64(_) => "Int64",
        Bson::Double(_) => "double",
        Bson::Decimal128(_) => "Decimal128",
        Bson::DateTime(_) => "date",
        Bson::Boolean(_) => "boolean",
        Bson::ObjectId(_) => "ObjectId",
        _ => "other",
    }
}

/// The inverse of an injective value map: the entry that gives `v`; a value no entry gives
/// passes through, unless the map would turn it into something else.
fn unmap(map: &ValueMap, v: &Bson) -> Result<Bson, String> {
    if let Some((from, _)) = map.entries.iter().find(|(_, to)| same(to, v)) {
        return Ok(Bson::String(from.clone()));
    }
    if let Bson::String(s) = v
        && let Some(to) = map.entries.get(s)
    {
        return Err(format!(
            "value map `{}` never gives {}: the monolith's `{s}` becomes {}",
            map.name,
            describe(v),
            describe(to)
        ));
    }
    Ok(v.clone())
}

/// camelCase back to snake_case, for keys the monolith does not have yet: `avgResponseTime` →
/// `avg_response_time`, an upper-case letter after a lower-case letter or a digit starting a
/// new word (`userID` → `user_iD`, `HTTPCode` stays). [`camel_case`] of the result is the key.
pub(super) fn snake_case(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut prev: Option<char> = None;
    for c in key.chars() {
        if c.is_uppercase() && prev.is_some_and(|p| p.is_lowercase() || p.is_ascii_digit()) {
            out.push('_');
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
        prev = Some(c);
    }
    out
}

/// The inverse of `camel_keys`: every key takes the spelling the monolith has at the same place
/// (`error_types` stays `error_types`), and keys the monolith does not have become snake_case
/// ([`snake_case`]). Sub-documents and arrays the service left unchanged keep the monolith's
/// value whole.
fn uncamel(v: &Bson, like: Option<&Bson>) -> Result<Bson, String> {
    if !matches!(v, Bson::Document(_) | Bson::Array(_)) {
        return Err(format!("expected a document, found {}", found(v)));
    }
    let back = uncamel_at(v, like)?;
    match camel_keys(&back) {
        Ok(again) if same(&again, v) => Ok(back),
        Ok(_) => Err("its keys cannot all come from camel_keys".into()),
        Err(why) => Err(why),
    }
}

fn uncamel_at(v: &Bson, like: Option<&Bson>) -> Result<Bson, String> {
    if let Some(like) = like
        && matches!(v, Bson::Document(_) | Bson::Array(_))
        && camel_keys(like).is_ok_and(|again| same(&again, v))
    {
        return Ok(like.clone());
    }
    let nested = |value: &Bson, like: Option<&Bson>| match value {
        Bson::Document(_) | Bson::Array(_) => uncamel_at(value, like),
        other => Ok(other.clone()),
    };
    match v {
        Bson::Document(d) => {
            let like = match like {
                Some(Bson::Document(l)) => Some(l),
                _ => None,
            };
            let mut out = Document::new();
            for (key, value) in d {
                let original = like.and_then(|l| l.iter().find(|(k, _)| camel_case(k) == key.as_str()));
                let name = match original {
                    Some((k, _)) => k.clone(),
                    None => {
                        let snake = snake_case(key);
                        if camel_case(&snake) == key.as_str() {
                            snake
                        } else if camel_case(key) == key.as_str() {
                            key.clone()
                        } else {
                            return Err(format!(
                                "key `{key}` cannot come from camel_keys, which leaves no `_` inside a key"
                            ));
                        }
                    }
                };
                out.insert(name, nested(value, original.map(|(_, v)| v))?);
            }
            Ok(Bson::Document(out))
        }
        Bson::Array(items) => {
            let like = match like {
                Some(Bson::Array(l)) => Some(l),
                _ => None,
            };
            items
                .iter()
                .enumerate()
                .map(|(i, e)| nested(e, like.and_then(|l| l.get(i))))
                .collect::<Result<_, _>>()
                .map(Bson::Array)
        }
        other => Ok(other.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn cast(c: Cast, v: Bson) -> Result<Bson, String> {
        c.apply(&v)
    }

    fn dec(s: &str) -> Bson {
        Bson::Decimal128(s.parse().unwrap())
    }

    #[test]
    fn decimal_keeps_the_digits_and_refuses_non_amounts() {
        assert_eq!(cast(Cast::Decimal, "1290.50".into()), Ok(dec("1290.50")));
        assert_eq!(cast(Cast::Decimal, " 7 ".into()), Ok(dec("7")));
        assert_eq!(cast(Cast::Decimal, Bson::Int32(12)), Ok(dec("12")));
        assert_eq!(cast(Cast::Decimal, Bson::Double(0.1)), Ok(dec("0.1")));
        for bad in ["abc", "1,290.50", "", "NaN", "Infinity", "12abc"] {
            let err = cast(Cast::Decimal, bad.into()).unwrap_err();
            assert_eq!(err, format!("cannot cast \"{bad}\" to decimal"));
        }
        assert!(cast(Cast::Decimal, Bson::Boolean(true)).is_err());
    }

    #[test]
    fn numeric_casts() {
        assert_eq!(cast(Cast::Double, "0.25".into()), Ok(Bson::Double(0.25)));
        assert_eq!(cast(Cast::Double, dec("1.5")), Ok(Bson::Double(1.5)));
        assert_eq!(cast(Cast::Double, Bson::Int32(3)), Ok(Bson::Double(3.0)));
        assert!(cast(Cast::Double, "inf".into()).is_err());
        assert_eq!(cast(Cast::Int, "42".into()), Ok(Bson::Int32(42)));
        assert_eq!(cast(Cast::Int, Bson::Int64(5)), Ok(Bson::Int32(5)));
        assert_eq!(cast(Cast::Int, "9000000000".into()), Ok(Bson::Int64(9_000_000_000)));
        assert_eq!(cast(Cast::Int, Bson::Double(60.0)), Ok(Bson::Int32(60)));
        assert_eq!(cast(Cast::Int, Bson::Double(1.5)), Err("cannot cast 1.5 to int".into()));
        assert_eq!(cast(Cast::Int, "60s".into()), Err("cannot cast \"60s\" to int".into()));
    }

    #[test]
    fn string_and_date_casts() {
        let oid = bson::oid::ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        assert_eq!(cast(Cast::String, Bson::ObjectId(oid)), Ok("65a1b2c3d4e5f60718293a4b".into()));
        assert_eq!(cast(Cast::String, Bson::Int32(7)), Ok("7".into()));
        assert_eq!(cast(Cast::String, dec("1.50")), Ok("1.50".into()));
        let d = DateTime::from_millis(1_767_225_600_000);
        assert_eq!(cast(Cast::String, Bson::DateTime(d)), Ok("2026-01-01T00:00:00Z".into()));
        assert_eq!(cast(Cast::Date, "2026-01-01T00:00:00Z".into()), Ok(Bson::DateTime(d)));
        assert_eq!(cast(Cast::Date, Bson::Int64(1_767_225_600_000)), Ok(Bson::DateTime(d)));
        assert_eq!(cast(Cast::Date, "soon".into()), Err("cannot cast \"soon\" to date".into()));
        assert!(cast(Cast::String, Bson::Document(doc! {})).is_err());
    }

    #[test]
    fn camel_case_keys() {
        assert_eq!(camel_case("avg_response_time"), "avgResponseTime");
        assert_eq!(camel_case("p95_response_time"), "p95ResponseTime");
        assert_eq!(camel_case("_id"), "_id");
        assert_eq!(camel_case("already"), "already");
        assert_eq!(camel_case("a__b_"), "aB");
        let v = Bson::Document(doc! { "error_types": [{ "error_type": "timeout", "n": 1 }], "x_y": { "z_w": 1 } });
        assert_eq!(
            camel_keys(&v),
            Ok(Bson::Document(doc! { "errorTypes": [{ "errorType": "timeout", "n": 1 }], "xY": { "zW": 1 } }))
        );
        let clash = Bson::Document(doc! { "avg_ms": 1, "avgMs": 2 });
        assert_eq!(camel_keys(&clash), Err("keys `avgMs` and `avg_ms` both become `avgMs`".into()));
    }

    #[test]
    fn comparisons() {
        let c = |op, l: Option<Bson>, r: Option<Bson>| compare(op, l.as_ref(), r.as_ref());
        assert_eq!(c(CmpOp::Gt, Some(Bson::Int32(3)), Some(Bson::Int64(0))), Ok(true));
        assert_eq!(c(CmpOp::Gt, Some(Bson::Int32(0)), Some(Bson::Int32(0))), Ok(false));
        assert_eq!(c(CmpOp::Eq, Some(Bson::Double(2.0)), Some(Bson::Int32(2))), Ok(true));
        assert_eq!(c(CmpOp::Eq, Some(dec("2.50")), Some(Bson::Double(2.5))), Ok(true));
        assert_eq!(c(CmpOp::Eq, None, Some(Bson::Null)), Ok(true));
        assert_eq!(c(CmpOp::Ne, Some("a".into()), None), Ok(true));
        assert_eq!(c(CmpOp::Gt, None, Some(Bson::Int32(0))), Ok(false));
        assert_eq!(c(CmpOp::Lt, Some("a".into()), Some("b".into())), Ok(true));
        assert_eq!(
            c(CmpOp::Gt, Some("12".into()), Some(Bson::Int32(0))),
            Err("cannot compare a string \"12\" with a number 0".into())
        );
    }
}
