//! Tests of the expression language: parsing, the errors it reports, and evaluation.

use super::*;
use crate::event::{EventData, Op, Position};
use bson::{DateTime, Timestamp, doc};

fn maps() -> BTreeMap<String, Arc<ValueMap>> {
    let role = ValueMap { name: "role".into(), entries: [("bot".to_string(), Bson::from("assistant"))].into() };
    [("role".to_string(), Arc::new(role))].into()
}

fn compile(src: &str) -> Result<Expr, String> {
    parse(src, &Context { maps: &maps(), allow_group: false, reverse: false })
}

fn event(after: Document) -> CanonicalEvent {
    CanonicalEvent {
        id: "e1".into(),
        source: "ficus://linechatbot/products".into(),
        event_type: "product.updated".into(),
        subject: "S1".into(),
        time: DateTime::from_millis(1_000),
        position: Position { cluster_time: Timestamp { time: 1, increment: 2 }, index: 3, resume_token: None },
        schema_version: 1,
        origin: None,
        data: EventData {
            op: Op::Update,
            collection: "products".into(),
            key: Bson::from("S1"),
            document_id: Bson::Int32(7),
            after: Some(after),
            before: None,
            changed: None,
            removed: vec![],
            truncated: Vec::new(),
            derived: None,
        },
    }
}

fn eval(src: &str, doc: Document) -> Result<Option<Bson>, String> {
    let expr = compile(src)?;
    let ev = event(doc);
    let after = ev.data.after.as_ref().unwrap();
    let scope = Scope::forward(&ev, after, after);
    expr.eval(&scope).map(|v| v.map(Cow::into_owned)).map_err(|e| e.to_string())
}

#[test]
fn precedence_and_rendering() {
    let e = compile("not a == 1 and b != 'x' or c").unwrap();
    assert_eq!(e.to_string(), "((not a == 1 and b != 'x') or c)");
    let e = compile("ltv|decimal").unwrap();
    assert_eq!(e.to_string(), "ltv | decimal");
    let e = compile("x | default(\"it's\") | role").unwrap();
    assert_eq!(e.to_string(), "x | default('it\\'s') | role");
    assert_eq!(compile("concat(a.0.b, -1.5, $event.id)").unwrap().to_string(), "concat(a.0.b, -1.5, $event.id)");
}

#[test]
fn evaluates_paths_roots_logic_and_pipes() {
    let d = doc! { "a": { "b": [10, { "c": "x" }] }, "stock": 0, "from": "bot", "kind": "audit" };
    assert_eq!(eval("a.b.1.c", d.clone()), Ok(Some(Bson::from("x"))));
    assert_eq!(eval("a.zz", d.clone()), Ok(None));
    assert_eq!(eval("stock > 0 or kind == 'audit'", d.clone()), Ok(Some(Bson::Boolean(true))));
    assert_eq!(eval("not (stock > 0)", d.clone()), Ok(Some(Bson::Boolean(true))));
    assert_eq!(eval("from | role", d.clone()), Ok(Some(Bson::from("assistant"))));
    assert_eq!(eval("kind | role", d.clone()), Ok(Some(Bson::from("audit"))), "unlisted values pass through");
    assert_eq!(eval("missing | role | decimal", d.clone()), Ok(None));
    assert_eq!(eval("missing | default(42)", d.clone()), Ok(Some(Bson::Int32(42))));
    assert_eq!(eval("$key", d.clone()), Ok(Some(Bson::from("S1"))));
    assert_eq!(eval("$id", d.clone()), Ok(Some(Bson::Int32(7))));
    assert_eq!(eval("$event.sequence", d.clone()), Ok(Some(Bson::from("000000000100000000020000000003"))));
    assert_eq!(eval("$doc.a.b.0", d.clone()), Ok(Some(Bson::Int32(10))));
    assert_eq!(eval("concat($event.type, ':', $id)", d.clone()), Ok(Some(Bson::from("product.updated:7"))));
    assert_eq!(eval("concat('a', missing)", d.clone()), Ok(None));
}

#[test]
fn evaluation_errors_name_the_operand() {
    let d = doc! { "kind": "audit", "n": "12" };
    assert_eq!(eval("kind and true", d.clone()), Err("`kind`: expected true or false, found \"audit\"".into()));
    assert_eq!(eval("ratio(n, 2)", d.clone()), Err("`n`: expected a number, found a string \"12\"".into()));
    assert_eq!(eval("n > 3", d.clone()), Err("`n > 3`: cannot compare a string \"12\" with a number 3".into()));
    assert_eq!(eval("kind | camel_keys", d), Err("`kind`: expected a document, found a string \"audit\"".into()));
}

#[test]
fn parse_errors_say_where() {
    assert_eq!(compile("a ==").unwrap_err(), "expected a value at column 5, found the end");
    assert_eq!(compile("(a").unwrap_err(), "expected `)` at column 3, found the end");
    assert_eq!(compile("a b").unwrap_err(), "unexpected `b` at column 3");
    assert_eq!(compile("a # b").unwrap_err(), "unexpected character `#` at column 3");
    assert_eq!(compile("$nope").unwrap_err(), "unknown `$nope` (known: $doc, $event.<field>, $key, $id, $group)");
    assert_eq!(compile("$key.x").unwrap_err(), "`$key` is a single value; `$key.x` reaches into it");
    assert!(compile("x | 3").unwrap_err().starts_with("expected a function after `|` at column 5"));
    assert!(compile("role(a, b)").unwrap_err().starts_with("map `role` takes one value"));
}
