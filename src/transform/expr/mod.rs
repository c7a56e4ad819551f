//! The expression language of transform definitions, parsed once at load, evaluated per event.
//!
//! Every value a transform writes, its filter and its rollup group are expressions such as
//! `user_id`, `ltv | decimal`, `ratio(sold, views)`, `stock > 0` or `kind == 'audit'`. Parsing
//! them when the definitions load turns a typo, an unknown function or a misplaced `$group` into
//! a definition error naming file and field, instead of a surprise on the first event. Evaluation
//! is pure: it reads the event and either yields a value or names the operand that failed and
//! why, in words fit for a dead-letter record.
//!
//! Grammar (lowest precedence first):
//!
//! ```text
//! expr    := and ('or' and)*
//! and     := not ('and' not)*
//! not     := 'not' not | compare
//! compare := pipe (('==' | '!=' | '<' | '<=' | '>' | '>=') pipe)?
//! pipe    := primary ('|' NAME ('(' args ')')?)*      -- `x | f(a)` is `f(x, a)`
//! primary := 'text' | "text" | number | true | false | null
//!          | NAME '(' args ')' | path | '(' expr ')'
//! path    := name ('.' (name | index))*  |  $doc[.path] | $event.<id|time|type|subject|source|sequence>
//!          | $key | $id | $group
//!          | $value | $source[.path]                  -- reverse rules only (`[reverse]`)
//! ```
//!
//! The lexer and its tokens are in `lex`; the parser, the compiled [`Expr`] and its evaluation
//! are here.

mod lex;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bson::{Bson, Document};

use super::builtins;
use super::value::{Cast, CmpOp, Func, Value, ValueMap};
use crate::event::CanonicalEvent;
use crate::event::mapping::get_path;
use lex::{Tok, lex};

/// A compiled expression.
#[derive(Debug, Clone)]
pub(super) enum Expr {
    Literal(Bson),
    Path { root: Root, path: String },
    Call { func: Func, args: Vec<Expr>, piped: bool },
    Compare { op: CmpOp, left: Box<Expr>, right: Box<Expr> },
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
}

/// What a path starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Root {
    /// The current input: the source document, the derived array element, or inside `each`
    /// the array element.
    Input,
    /// `$doc`: the whole source document (the after-state; the before-state when keying a delete).
    Doc,
    /// `$event.<field>`: the canonical event's envelope.
    Event(EventField),
    /// `$key`: the aggregate id (`data.key`).
    Key,
    /// `$id`: the source document's `_id`.
    Id,
    /// `$group`: the rollup group value (only in `[rollup.fields]`).
    Group,
    /// `$value`: the target field's new value in the service (only in `[reverse]` rules).
    Value,
    /// `$source.<path>`: the monolith document (or, inside an array, the monolith element the
    /// service element is aligned with) as it is now (only in `[reverse]` rules).
    Source,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EventField {
    Id,
    Time,
    Type,
    Subject,
    Source,
    Sequence,
}

impl EventField {
    const ALL: [(&'static str, EventField); 6] = [
        ("id", EventField::Id),
        ("time", EventField::Time),
        ("type", EventField::Type),
        ("subject", EventField::Subject),
        ("source", EventField::Source),
        ("sequence", EventField::Sequence),
    ];

    fn name(self) -> &'static str {
        EventField::ALL.iter().find(|(_, f)| *f == self).map_or("", |(n, _)| n)
    }
}

/// The built-in functions, their arity, and what they are for (listed in error messages).
const BUILTINS: [(&str, Arity); 10] = [
    ("decimal", Arity::Exactly(1)),
    ("double", Arity::Exactly(1)),
    ("int", Arity::Exactly(1)),
    ("string", Arity::Exactly(1)),
    ("date", Arity::Exactly(1)),
    ("ratio", Arity::Exactly(2)),
    ("camel_keys", Arity::Exactly(1)),
    ("default", Arity::Exactly(2)),
    ("concat", Arity::AtLeast(2)),
    ("drop", Arity::AtLeast(2)),
];

#[derive(Debug, Clone, Copy)]
enum Arity {
    Exactly(usize),
    AtLeast(usize),
}

/// Whether `name` is a built-in function (value maps may not shadow one).
pub(super) fn is_builtin(name: &str) -> bool {
    BUILTINS.iter().any(|(n, _)| *n == name)
}

/// What an expression may refer to where it appears.
pub(super) struct Context<'a> {
    pub maps: &'a BTreeMap<String, Arc<ValueMap>>,
    /// `$group` is only meaningful in a rollup's group fields.
    pub allow_group: bool,
    /// A `[reverse]` rule: `$value` and `$source` exist, the event (`$event`, `$key`, `$id`)
    /// does not, and plain paths and `$doc` read the service document.
    pub reverse: bool,
}

/// Parses and checks an expression.
pub(super) fn parse(src: &str, ctx: &Context<'_>) -> Result<Expr, String> {
    let tokens = lex(src)?;
    let mut p = Parser { tokens, pos: 0, ctx, src_len: src.chars().count() };
    let expr = p.expr()?;
    match p.peek() {
        None => Ok(expr),
        Some((col, tok)) => Err(format!("unexpected {} at column {col}", tok.describe())),
    }
}

struct Parser<'c> {
    tokens: Vec<(usize, Tok)>,
    pos: usize,
    ctx: &'c Context<'c>,
    src_len: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&(usize, Tok)> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<(usize, Tok)> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn at_word(&self, word: &str) -> bool {
        matches!(self.peek(), Some((_, Tok::Word(w))) if w == word)
    }

    fn eat(&mut self, tok: &Tok) -> bool {
        if self.peek().is_some_and(|(_, t)| t == tok) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, tok: &Tok) -> Result<(), String> {
        if self.eat(tok) {
            return Ok(());
        }
        Err(match self.peek() {
            Some((col, t)) => format!("expected {} at column {col}, found {}", tok.describe(), t.describe()),
            None => format!("expected {} at column {}, found the end", tok.describe(), self.src_len + 1),
        })
    }

    fn expr(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while self.at_word("or") {
            self.pos += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.not()?;
        while self.at_word("and") {
            self.pos += 1;
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, String> {
        if self.at_word("not") {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.compare()
    }

    fn compare(&mut self) -> Result<Expr, String> {
        let left = self.pipe()?;
        if let Some((_, Tok::Cmp(op))) = self.peek() {
            let op = *op;
            self.pos += 1;
            let right = self.pipe()?;
            return Ok(Expr::Compare { op, left: Box::new(left), right: Box::new(right) });
        }
        Ok(left)
    }

    fn pipe(&mut self) -> Result<Expr, String> {
        let mut value = self.primary()?;
        while self.eat(&Tok::Pipe) {
            let (col, name) = match self.next() {
                Some((col, Tok::Word(w))) => (col, w),
                Some((col, t)) => {
                    return Err(format!("expected a function after `|` at column {col}, found {}", t.describe()));
                }
                None => return Err("expected a function after `|`, found the end".into()),
            };
            let mut args = vec![value];
            if self.eat(&Tok::LParen) {
                args.extend(self.args()?);
            }
            value = self.call(col, &name, args, true)?;
        }
        Ok(value)
    }

    fn args(&mut self) -> Result<Vec<Expr>, String> {
        let mut args = Vec::new();
        if self.eat(&Tok::RParen) {
            return Ok(args);
        }
        loop {
            args.push(self.expr()?);
            if self.eat(&Tok::RParen) {
                return Ok(args);
            }
            self.expect(&Tok::Comma)?;
        }
    }

    fn primary(&mut self) -> Result<Expr, String> {
        let Some((col, tok)) = self.next() else {
            return Err(format!("expected a value at column {}, found the end", self.src_len + 1));
        };
        match tok {
            Tok::Str(s) => Ok(Expr::Literal(Bson::String(s))),
            Tok::Int(i) => Ok(Expr::Literal(builtins::int_value(i))),
            Tok::Float(f) => Ok(Expr::Literal(Bson::Double(f))),
            Tok::LParen => {
                let e = self.expr()?;
                self.expect(&Tok::RParen)?;
                Ok(e)
            }
            Tok::Word(w) => match w.as_str() {
                "true" => Ok(Expr::Literal(Bson::Boolean(true))),
                "false" => Ok(Expr::Literal(Bson::Boolean(false))),
                "null" => Ok(Expr::Literal(Bson::Null)),
                "and" | "or" | "not" => Err(format!("expected a value at column {col}, found `{w}`")),
                _ if self.eat(&Tok::LParen) => {
                    let args = self.args()?;
                    self.call(col, &w, args, false)
                }
                _ => path(&w, self.ctx),
            },
            other => Err(format!("expected a value at column {col}, found {}", other.describe())),
        }
    }

    fn call(&self, col: usize, name: &str, args: Vec<Expr>, piped: bool) -> Result<Expr, String> {
        let func = if let Some(map) = self.ctx.maps.get(name) {
            if args.len() != 1 {
                return Err(format!("map `{name}` takes one value, given {}", args.len()));
            }
            Func::Map(map.clone())
        } else {
            let Some((_, arity)) = BUILTINS.iter().find(|(n, _)| *n == name) else {
                let mut known: Vec<&str> = BUILTINS.iter().map(|(n, _)| *n).collect();
                known.extend(self.ctx.maps.keys().map(String::as_str));
                return Err(format!("unknown function or map `{name}` at column {col} (known: {})", known.join(", ")));
            };
            let ok = match arity {
                Arity::Exactly(n) => args.len() == *n,
                Arity::AtLeast(n) => args.len() >= *n,
            };
            if !ok {
                let wanted = match arity {
                    Arity::Exactly(n) => format!("{n}"),
                    Arity::AtLeast(n) => format!("at least {n}"),
                };
                return Err(format!("`{name}` takes {wanted} argument(s), given {}", args.len()));
            }
            match name {
                "decimal" => Func::Cast(Cast::Decimal),
                "double" => Func::Cast(Cast::Double),
                "int" => Func::Cast(Cast::Int),
                "string" => Func::Cast(Cast::String),
                "date" => Func::Cast(Cast::Date),
                "ratio" => Func::Ratio,
                "camel_keys" => Func::CamelKeys,
                "default" => Func::Default,
                "concat" => Func::Concat,
                _ => {
                    for a in &args[1..] {
                        match a {
                            Expr::Literal(Bson::String(p)) if valid_path(p) => {}
                            other => {
                                return Err(format!("`drop` takes field paths as quoted text, given `{other}`"));
                            }
                        }
                    }
                    Func::Drop
                }
            }
        };
        Ok(Expr::Call { func, args, piped })
    }
}

fn valid_path(p: &str) -> bool {
    !p.is_empty() && p.split('.').all(|s| !s.is_empty() && !s.starts_with('$'))
}

fn path(word: &str, ctx: &Context<'_>) -> Result<Expr, String> {
    let (head, rest) = match word.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (word, None),
    };
    if word.split('.').any(str::is_empty) {
        return Err(format!("`{word}` is not a field path"));
    }
    let no_rest = |root: Root| match rest {
        None => Ok(Expr::Path { root, path: String::new() }),
        Some(_) => Err(format!("`{head}` is a single value; `{word}` reaches into it")),
    };
    if ctx.reverse && matches!(head, "$event" | "$key" | "$id" | "$group") {
        return Err(format!(
            "`{head}` does not exist in a reverse rule: it writes a service value back, with no event \
             (use $value, $source.<path> for the monolith's document, and plain paths for the service's)"
        ));
    }
    match head {
        "$doc" => Ok(Expr::Path { root: Root::Doc, path: rest.unwrap_or_default().to_string() }),
        "$value" if ctx.reverse => no_rest(Root::Value),
        "$source" if ctx.reverse => Ok(Expr::Path { root: Root::Source, path: rest.unwrap_or_default().to_string() }),
        "$value" | "$source" => Err(format!("`{head}` only exists in [reverse] rules")),
        "$event" => {
            let field = rest.and_then(|r| EventField::ALL.iter().find(|(n, _)| *n == r));
            match field {
                Some((_, f)) => Ok(Expr::Path { root: Root::Event(*f), path: String::new() }),
                None => Err(format!(
                    "unknown `{word}`; the event has {}",
                    EventField::ALL.iter().map(|(n, _)| format!("$event.{n}")).collect::<Vec<_>>().join(", ")
                )),
            }
        }
        "$key" => no_rest(Root::Key),
        "$id" => no_rest(Root::Id),
        "$group" if ctx.allow_group => no_rest(Root::Group),
        "$group" => Err("`$group` only exists in [rollup.fields]".into()),
        _ if head.starts_with('$') && ctx.reverse => {
            Err(format!("unknown `{head}` (known in reverse rules: $value, $source.<path>, $doc.<path>)"))
        }
        _ if head.starts_with('$') => Err(format!("unknown `{head}` (known: $doc, $event.<field>, $key, $id, $group)")),
        _ if word.split('.').any(|s| s.contains('$')) => Err(format!("`{word}` is not a field path")),
        _ => Ok(Expr::Path { root: Root::Input, path: word.to_string() }),
    }
}

impl Expr {
    /// Whether the expression reads the source document or the event (anything but literals
    /// and `$group`): rollup group fields must not, or members would disagree.
    pub(super) fn reads_source(&self) -> bool {
        match self {
            Expr::Literal(_) => false,
            Expr::Path { root, .. } => !matches!(root, Root::Group | Root::Value),
            Expr::Call { args, .. } => args.iter().any(Expr::reads_source),
            Expr::Compare { left, right, .. } | Expr::And(left, right) | Expr::Or(left, right) => {
                left.reads_source() || right.reads_source()
            }
            Expr::Not(e) => e.reads_source(),
        }
    }

    /// Whether the expression reads a path from `root`.
    pub(super) fn reads_root(&self, root: Root) -> bool {
        match self {
            Expr::Literal(_) => false,
            Expr::Path { root: r, .. } => *r == root,
            Expr::Call { args, .. } => args.iter().any(|a| a.reads_root(root)),
            Expr::Compare { left, right, .. } | Expr::And(left, right) | Expr::Or(left, right) => {
                left.reads_root(root) || right.reads_root(root)
            }
            Expr::Not(e) => e.reads_root(root),
        }
    }

    /// Whether the expression reads the event's envelope (`$event.*`), which the monolith
    /// document alone cannot reproduce.
    pub(super) fn reads_event(&self) -> bool {
        match self {
            Expr::Literal(_) => false,
            Expr::Path { root, .. } => matches!(root, Root::Event(_)),
            Expr::Call { args, .. } => args.iter().any(Expr::reads_event),
            Expr::Compare { left, right, .. } | Expr::And(left, right) | Expr::Or(left, right) => {
                left.reads_event() || right.reads_event()
            }
            Expr::Not(e) => e.reads_event(),
        }
    }

    /// The paths the expression reads from the input (plain paths) and from `$doc`.
    pub(super) fn input_paths(&self, out: &mut Vec<String>) {
        match self {
            Expr::Literal(_) => {}
            Expr::Path { root: Root::Input | Root::Doc, path } => out.push(path.clone()),
            Expr::Path { .. } => {}
            Expr::Call { args, .. } => args.iter().for_each(|a| a.input_paths(out)),
            Expr::Compare { left, right, .. } | Expr::And(left, right) | Expr::Or(left, right) => {
                left.input_paths(out);
                right.input_paths(out);
            }
            Expr::Not(e) => e.input_paths(out),
        }
    }

    /// Evaluates the expression.
    pub(super) fn eval<'a>(&'a self, scope: &Scope<'a>) -> Result<Value<'a>, EvalError> {
        match self {
            Expr::Literal(b) => Ok(Some(Cow::Borrowed(b))),
            Expr::Path { root, path } => Ok(scope.resolve(*root, path)),
            Expr::Call { func, args, .. } => {
                let values = args.iter().map(|a| a.eval(scope)).collect::<Result<Vec<_>, _>>()?;
                builtins::call(func, values)
                    .map_err(|(arg, reason)| EvalError { expr: args.get(arg).unwrap_or(self).to_string(), reason })
            }
            Expr::Compare { op, left, right } => {
                let (l, r) = (left.eval(scope)?, right.eval(scope)?);
                builtins::compare(*op, l.as_deref(), r.as_deref())
                    .map(|b| Some(Cow::Owned(Bson::Boolean(b))))
                    .map_err(|reason| EvalError { expr: self.to_string(), reason })
            }
            Expr::And(l, r) => {
                let v = l.truthy(scope)? && r.truthy(scope)?;
                Ok(Some(Cow::Owned(Bson::Boolean(v))))
            }
            Expr::Or(l, r) => {
                let v = l.truthy(scope)? || r.truthy(scope)?;
                Ok(Some(Cow::Owned(Bson::Boolean(v))))
            }
            Expr::Not(e) => Ok(Some(Cow::Owned(Bson::Boolean(!e.truthy(scope)?)))),
        }
    }

    /// Evaluates a condition: true, or false when false, null or absent; anything else is an error.
    pub(super) fn truthy(&self, scope: &Scope<'_>) -> Result<bool, EvalError> {
        match self.eval(scope)?.as_deref() {
            Some(Bson::Boolean(b)) => Ok(*b),
            None | Some(Bson::Null) => Ok(false),
            Some(other) => Err(EvalError {
                expr: self.to_string(),
                reason: format!("expected true or false, found {}", builtins::describe(other)),
            }),
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Literal(Bson::String(s)) => write!(f, "'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
            Expr::Literal(b) => write!(f, "{b}"),
            Expr::Path { root, path } => {
                let head = match root {
                    Root::Input => return f.write_str(path),
                    Root::Doc => "$doc",
                    Root::Event(field) => return write!(f, "$event.{}", field.name()),
                    Root::Key => "$key",
                    Root::Id => "$id",
                    Root::Group => "$group",
                    Root::Value => "$value",
                    Root::Source => "$source",
                };
                if path.is_empty() { f.write_str(head) } else { write!(f, "{head}.{path}") }
            }
            Expr::Call { func, args, piped } => {
                let name = match func {
                    Func::Cast(c) => c.name(),
                    Func::Ratio => "ratio",
                    Func::CamelKeys => "camel_keys",
                    Func::Default => "default",
                    Func::Concat => "concat",
                    Func::Drop => "drop",
                    Func::Map(m) => m.name.as_str(),
                };
                let list = |args: &[Expr]| args.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                match (piped, args.split_first()) {
                    (true, Some((first, []))) => write!(f, "{first} | {name}"),
                    (true, Some((first, rest))) => write!(f, "{first} | {name}({})", list(rest)),
                    _ => write!(f, "{name}({})", list(args)),
                }
            }
            Expr::Compare { op, left, right } => write!(f, "{left} {} {right}", op.symbol()),
            Expr::And(l, r) => write!(f, "({l} and {r})"),
            Expr::Or(l, r) => write!(f, "({l} or {r})"),
            Expr::Not(e) => write!(f, "not {e}"),
        }
    }
}

/// What paths read during one evaluation.
pub(super) struct Scope<'a> {
    /// The event being transformed; `None` in a reverse rule, which has none.
    pub event: Option<&'a CanonicalEvent>,
    /// `$doc`: the whole source document (in a reverse rule, the whole service document).
    pub doc: &'a Document,
    /// Plain paths: the document, the derived element, or the `each` element.
    pub input: &'a Document,
    pub group: Option<&'a Bson>,
    /// `$value` (reverse rules).
    pub value: Option<&'a Bson>,
    /// `$source` (reverse rules): the monolith document or element; `None` when it has none.
    pub source: Option<&'a Document>,
}

impl<'a> Scope<'a> {
    /// A scope for transforming `ev`, reading `doc` as `$doc` and `input` with plain paths.
    pub(super) fn forward(ev: &'a CanonicalEvent, doc: &'a Document, input: &'a Document) -> Scope<'a> {
        Scope { event: Some(ev), doc, input, group: None, value: None, source: None }
    }

    /// The same scope reading `input` (an array element) for plain paths.
    pub(super) fn with_input<'b>(&self, input: &'b Document) -> Scope<'b>
    where
        'a: 'b,
    {
        Scope { input, ..*self }
    }

    fn resolve(&self, root: Root, path: &str) -> Value<'a> {
        let owned = |b: Bson| Some(Cow::Owned(b));
        let event = |field: EventField| {
            let ev = self.event?;
            let value = match field {
                EventField::Id => Bson::String(ev.id.clone()),
                EventField::Time => Bson::DateTime(ev.time),
                EventField::Type => Bson::String(ev.event_type.clone()),
                EventField::Subject => Bson::String(ev.subject.clone()),
                EventField::Source => Bson::String(ev.source.clone()),
                EventField::Sequence => Bson::String(ev.position.sequence()),
            };
            owned(value)
        };
        match root {
            Root::Input => get_path(self.input, path).map(Cow::Borrowed),
            Root::Doc if path.is_empty() => owned(Bson::Document(self.doc.clone())),
            Root::Doc => get_path(self.doc, path).map(Cow::Borrowed),
            Root::Event(field) => event(field),
            Root::Key => self.event.map(|ev| Cow::Borrowed(&ev.data.key)),
            Root::Id => self.event.map(|ev| Cow::Borrowed(&ev.data.document_id)),
            Root::Group => self.group.map(Cow::Borrowed),
            Root::Value => self.value.map(Cow::Borrowed),
            Root::Source if path.is_empty() => self.source.map(|d| Cow::Owned(Bson::Document(d.clone()))),
            Root::Source => self.source.and_then(|d| get_path(d, path)).map(Cow::Borrowed),
        }
    }
}

/// Why an expression could not be evaluated: the operand and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct EvalError {
    pub expr: String,
    pub reason: String,
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.expr, self.reason)
    }
}

#[cfg(test)]
mod tests;
