//! What a transform into a key-value store declares (`[redis]`): the key template that names
//! each entry from its target fields, the shape of its value, the field holding its expiry.
//!
//! Templates are parsed when the definitions load and rendered here, purely, from a target
//! document's values (an upsert) or from the before-state (a delete), so the transform hands
//! the sink a finished key in the write's `id`. How keys, values and expiry are laid down in
//! Redis is the sink's (`sink::redis`); this module only knows the declaration.

use bson::Bson;

/// A key template: `cache:{kind}:{key}`, literal text and `{field}` placeholders naming
/// top-level target fields holding a single value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    pub source: String,
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Field(String),
}

/// How an entry's value is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueShape {
    /// A hash: one hash field per top-level target field.
    Hash,
    /// A string: the text of one target field (`value = "<field>"`).
    String,
    /// A string: the whole target document as relaxed Extended JSON.
    Json,
}

impl ValueShape {
    pub fn parse(s: &str) -> Option<ValueShape> {
        match s {
            "hash" => Some(ValueShape::Hash),
            "string" => Some(ValueShape::String),
            "json" => Some(ValueShape::Json),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ValueShape::Hash => "hash",
            ValueShape::String => "string",
            ValueShape::Json => "json",
        }
    }
}

/// A transform's `[redis]` declaration, once checked: every field it names is a top-level
/// target field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTarget {
    pub key: KeyTemplate,
    pub shape: ValueShape,
    /// The target field holding the entry's absolute expiry (a date).
    pub expire_at: String,
    /// For `shape = "string"`: the target field whose text is the value.
    pub value: Option<String>,
}

impl KeyTemplate {
    /// Parses a template; the error says what is wrong with it.
    pub fn parse(source: &str) -> Result<KeyTemplate, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = source;
        while let Some(open) = rest.find(['{', '}']) {
            if rest[open..].starts_with('}') {
                return Err(format!("`{source}`: a `}}` without its `{{`"));
            }
            text.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or_else(|| format!("`{source}`: a `{{` without its `}}`"))?;
            let name = &after[..close];
            if name.is_empty() || name.contains(['{', '.', '$', ' ']) {
                return Err(format!("`{source}`: `{{{name}}}` must name one top-level target field"));
            }
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(Part::Field(name.to_string()));
            rest = &after[close + 1..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        if !parts.iter().any(|p| matches!(p, Part::Field(_))) {
            return Err(format!("`{source}` names no field: every entry would get the same key"));
        }
        Ok(KeyTemplate { source: source.to_string(), parts })
    }

    /// The fields it names, in order.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f.as_str()),
            Part::Text(_) => None,
        })
    }

    /// Renders the key from each field's value; the error names the field and what is wrong.
    pub fn render<'a>(&self, value_of: impl Fn(&str) -> Option<&'a Bson>) -> Result<String, (String, String)> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => out.push_str(&key_text(value_of(f)).map_err(|why| (f.clone(), why))?),
            }
        }
        Ok(out)
    }
}

/// A key part: present, non-empty text, a whole number or an ObjectId.
fn key_text(v: Option<&Bson>) -> Result<String, String> {
    match v {
        None => Err("has no value: the entry's key cannot be rendered".into()),
        Some(Bson::Null) => Err("is null: the entry's key cannot be rendered".into()),
        Some(Bson::String(s)) if s.is_empty() => Err("is an empty string: the entry's key cannot be rendered".into()),
        Some(Bson::String(s)) => Ok(s.clone()),
        Some(Bson::Int32(i)) => Ok(i.to_string()),
        Some(Bson::Int64(i)) => Ok(i.to_string()),
        Some(Bson::ObjectId(o)) => Ok(o.to_hex()),
        Some(other) => {
            Err(format!("is {:?}: a key part must be text, a whole number or an ObjectId", other.element_type()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn a_template_renders_from_the_fields_it_names() {
        let t = KeyTemplate::parse("cache:{kind}:{key}").unwrap();
        assert_eq!(t.fields().collect::<Vec<_>>(), ["kind", "key"]);
        let d = doc! { "kind": "research", "key": "q-1", "n": 5 };
        assert_eq!(t.render(|f| d.get(f)).unwrap(), "cache:research:q-1");
        let n = KeyTemplate::parse("{n}").unwrap();
        assert_eq!(n.render(|f| d.get(f)).unwrap(), "5");
    }

    #[test]
    fn a_missing_or_unusable_part_names_its_field() {
        let t = KeyTemplate::parse("cache:{kind}:{key}").unwrap();
        let d = doc! { "kind": Bson::Null, "key": "k" };
        let (field, why) = t.render(|f| d.get(f)).unwrap_err();
        assert_eq!(field, "kind");
        assert!(why.contains("null"), "{why}");
        let d = doc! { "kind": "ai_response" };
        let (field, why) = t.render(|f| d.get(f)).unwrap_err();
        assert_eq!((field.as_str(), why.contains("no value")), ("key", true));
        let d = doc! { "kind": "x", "key": { "a": 1 } };
        assert!(t.render(|f| d.get(f)).unwrap_err().1.contains("a key part must be text"));
    }

    #[test]
    fn broken_templates_say_why() {
        for (bad, says) in [
            ("cache:{kind", "without its `}`"),
            ("cache:kind}", "without its `{`"),
            ("cache:{}", "must name one top-level target field"),
            ("cache:{a.b}", "must name one top-level target field"),
            ("cache:all", "names no field"),
        ] {
            let e = KeyTemplate::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
