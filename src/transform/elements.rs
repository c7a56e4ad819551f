//! The three-way merge of an array by element id (pure).
//!
//! Both sides of a migration change one array at once: a customer's purchases get a `$push` from
//! the monolith's own code while the service marks another purchase refunded. A change says what
//! it did to the array (`base` → `theirs`); the other side's array has meanwhile become
//! `current`, possibly of another length and order. Laying the change over `current` by index
//! writes the wrong element, or none; comparing the arrays whole makes every such pair a
//! conflict, one side's change lost. Merged element by element, by the field that identifies an
//! element (`purchaseId`), both changes stand:
//!
//! - an element the change added is added (after its predecessor in `theirs`, where the merge
//!   has it; at the front when it came first; else at the end);
//! - an element the change removed is removed, unless the other side changed it meanwhile: a
//!   conflict;
//! - an element the change modified is replaced, unless the other side modified it too,
//!   differently: a conflict;
//! - elements only the other side added or changed stay as they are, where they are.
//!
//! A conflict is decided by policy ([`Wins`]): the change's version where the changer owns the
//! document (a write-back), the current one otherwise, and reported with the base and both
//! versions. Arrays whose elements cannot be told apart (no id field, scalars, an element
//! without its id, two elements sharing one) are merged as one value: whichever side changed it,
//! or a conflict when both did.

use std::collections::HashMap;

use bson::Bson;

use super::builtins::same;

/// Which version stands where both sides changed one element (or one array).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wins {
    /// The change's (`theirs`): the changer owns the document.
    Change,
    /// The other side's (`current`): the changer does not own it.
    Current,
}

/// An element both sides changed, differently (or the whole array, when its elements carry no
/// id). `None` versions are absent: not there yet, or removed.
#[derive(Debug, Clone, PartialEq)]
pub struct ElementConflict {
    /// The element's id; `None` for a whole array merged as one value.
    pub id: Option<Bson>,
    /// Before the change.
    pub base: Option<Bson>,
    /// The change's version.
    pub theirs: Option<Bson>,
    /// The other side's version now.
    pub current: Option<Bson>,
}

/// What a merge comes to.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MergedArray {
    /// The merged value (`None`: absent).
    pub value: Option<Bson>,
    pub conflicts: Vec<ElementConflict>,
}

/// Merges a change of an array (`base` → `theirs`) into the other side's `current`, elements
/// identified by the document field `id` (`None`: merged as one value), conflicts decided by
/// `wins`. Any of the three may be absent (`None`); an absent `base` is an array that was not
/// there yet, so every element of the others is new.
pub fn merge(
    base: Option<&Bson>,
    theirs: Option<&Bson>,
    current: Option<&Bson>,
    id: Option<&str>,
    wins: Wins,
) -> MergedArray {
    let empty = Vec::new();
    if let (Some(field), Some(Bson::Array(t)), Some(Bson::Array(c))) = (id, theirs, current) {
        let b = match base {
            Some(Bson::Array(b)) => Some(b),
            None => Some(&empty),
            Some(_) => None,
        };
        if let Some(merged) = b.and_then(|b| by_id(b, t, c, field, wins)) {
            return merged;
        }
    }
    whole(base, theirs, current, wins)
}

/// The three arrays as one value each.
fn whole(base: Option<&Bson>, theirs: Option<&Bson>, current: Option<&Bson>, wins: Wins) -> MergedArray {
    let value = |v: Option<&Bson>| MergedArray { value: v.cloned(), conflicts: Vec::new() };
    if same_opt(theirs, base) || same_opt(theirs, current) {
        return value(current);
    }
    if same_opt(current, base) {
        return value(theirs);
    }
    let conflict =
        ElementConflict { id: None, base: base.cloned(), theirs: theirs.cloned(), current: current.cloned() };
    let stands = match wins {
        Wins::Change => theirs,
        Wins::Current => current,
    };
    MergedArray { value: stands.cloned(), conflicts: vec![conflict] }
}

fn same_opt(a: Option<&Bson>, b: Option<&Bson>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => same(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// An array's elements by id: each element's id and its position. `None` when an element is
/// not a document, lacks the id (or holds null there), or shares it with another.
struct Ids<'a> {
    items: &'a [Bson],
    ids: Vec<&'a Bson>,
    at: HashMap<String, usize>,
}

impl<'a> Ids<'a> {
    fn of(items: &'a [Bson], field: &str) -> Option<Ids<'a>> {
        let mut ids = Vec::with_capacity(items.len());
        let mut at = HashMap::with_capacity(items.len());
        for (i, e) in items.iter().enumerate() {
            let id = match e {
                Bson::Document(d) => d.get(field).filter(|v| !matches!(v, Bson::Null))?,
                _ => return None,
            };
            if at.insert(key(id), i).is_some() {
                return None;
            }
            ids.push(id);
        }
        Some(Ids { items, ids, at })
    }

    fn get(&self, id: &Bson) -> Option<&'a Bson> {
        self.at.get(&key(id)).map(|&i| &self.items[i])
    }
}

/// An id as a lookup key: its type and value (`"1"` and `1` are different ids).
fn key(id: &Bson) -> String {
    format!("{id:?}")
}

/// The merge element by element; `None` when an array's elements cannot be told apart.
fn by_id(base: &[Bson], theirs: &[Bson], current: &[Bson], field: &str, wins: Wins) -> Option<MergedArray> {
    let (b, t, c) = (Ids::of(base, field)?, Ids::of(theirs, field)?, Ids::of(current, field)?);
    let mut conflicts = Vec::new();
    let mut conflict = |id: &Bson, base: Option<&Bson>, theirs: Option<&Bson>, current: Option<&Bson>| {
        conflicts.push(ElementConflict {
            id: Some(id.clone()),
            base: base.cloned(),
            theirs: theirs.cloned(),
            current: current.cloned(),
        });
        match wins {
            Wins::Change => theirs.cloned(),
            Wins::Current => current.cloned(),
        }
    };
    // The other side's elements, in its order, each as the change leaves it.
    let mut out: Vec<(&Bson, Bson)> = Vec::with_capacity(current.len().max(theirs.len()));
    for (id, ce) in c.ids.iter().zip(current) {
        let kept = match (b.get(id), t.get(id)) {
            // Only the other side has it (added there), or the change did not touch it.
            (None, None) => Some(ce.clone()),
            (Some(be), Some(te)) if same(te, be) => Some(ce.clone()),
            // Only the change touched it, or both made it the same.
            (Some(be), Some(te)) if same(ce, be) => Some(te.clone()),
            (_, Some(te)) if same(ce, te) => Some(ce.clone()),
            // The change removed it: gone, unless the other side changed it meanwhile.
            (Some(be), None) if same(ce, be) => None,
            (base, te) => conflict(id, base, te, Some(ce)),
        };
        if let Some(e) = kept {
            out.push((id, e));
        }
    }
    // The change's elements the other side does not have: new ones, and ones it removed.
    for (pos, (id, te)) in t.ids.iter().zip(theirs).enumerate() {
        if c.get(id).is_some() {
            continue;
        }
        let added = match b.get(id) {
            None => Some(te.clone()),
            // Removed on the other side; the change left it as it was: it stays removed.
            Some(be) if same(te, be) => None,
            Some(be) => conflict(id, Some(be), Some(te), None),
        };
        let Some(e) = added else { continue };
        // After its nearest predecessor in `theirs` that the merge holds; at the front when it
        // came first; else at the end.
        let after = t.ids[..pos].iter().rev().find_map(|p| out.iter().position(|(o, _)| o == p));
        let at = match after {
            Some(i) => i + 1,
            None if pos == 0 => 0,
            None => out.len(),
        };
        out.insert(at, (id, e));
    }
    let value = Some(Bson::Array(out.into_iter().map(|(_, e)| e).collect()));
    Some(MergedArray { value, conflicts })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    /// A purchase: its id and status.
    fn p(id: &str, status: &str) -> Bson {
        Bson::Document(doc! { "purchaseId": id, "status": status })
    }

    fn arr(items: &[Bson]) -> Bson {
        Bson::Array(items.to_vec())
    }

    /// Merges by `purchaseId`.
    fn run(base: &[Bson], theirs: &[Bson], current: &[Bson], wins: Wins) -> MergedArray {
        merge(Some(&arr(base)), Some(&arr(theirs)), Some(&arr(current)), Some("purchaseId"), wins)
    }

    fn merged(items: &[Bson]) -> MergedArray {
        MergedArray { value: Some(arr(items)), conflicts: Vec::new() }
    }

    fn conflict(id: &str, base: Option<Bson>, theirs: Option<Bson>, current: Option<Bson>) -> ElementConflict {
        ElementConflict { id: Some(Bson::String(id.into())), base, theirs, current }
    }

    #[test]
    fn an_element_changed_by_index_lands_on_its_own_element_in_an_array_of_another_shape() {
        // The service refunded P1 (its element 1); meanwhile the monolith dropped P0 and pushed
        // P3, so P1 is element 0 there. By index the refund would land on P2.
        let base = [p("P0", "paid"), p("P1", "paid"), p("P2", "paid")];
        let theirs = [p("P0", "paid"), p("P1", "refunded"), p("P2", "paid")];
        let current = [p("P1", "paid"), p("P2", "paid"), p("P3", "paid")];
        for wins in [Wins::Change, Wins::Current] {
            assert_eq!(
                run(&base, &theirs, &current, wins),
                merged(&[p("P1", "refunded"), p("P2", "paid"), p("P3", "paid")]),
                "no conflict, whoever would win one"
            );
        }
    }

    #[test]
    fn a_push_on_each_side_keeps_both_after_their_predecessors() {
        let base = [p("P0", "paid"), p("P1", "paid")];
        // The change pushed P8; the other side pushed P9 and removed P0 meanwhile.
        let theirs = [p("P0", "paid"), p("P1", "paid"), p("P8", "paid")];
        let current = [p("P1", "paid"), p("P9", "paid")];
        assert_eq!(
            run(&base, &theirs, &current, Wins::Change),
            merged(&[p("P1", "paid"), p("P8", "paid"), p("P9", "paid")])
        );
        // Pushed onto an array the other side emptied: at the end. Put first: at the front.
        assert_eq!(run(&base, &theirs, &[p("P9", "paid")], Wins::Change), merged(&[p("P9", "paid"), p("P8", "paid")]));
        let prepended = [p("P7", "paid"), p("P0", "paid"), p("P1", "paid")];
        assert_eq!(
            run(&base, &prepended, &current, Wins::Change),
            merged(&[p("P7", "paid"), p("P1", "paid"), p("P9", "paid")])
        );
        // Two pushed in a row keep their order.
        let two = [p("P0", "paid"), p("P1", "paid"), p("P5", "paid"), p("P6", "paid")];
        assert_eq!(
            run(&base, &two, &current, Wins::Current),
            merged(&[p("P1", "paid"), p("P5", "paid"), p("P6", "paid"), p("P9", "paid")])
        );
    }

    #[test]
    fn a_removal_stands_unless_the_other_side_changed_the_element() {
        let base = [p("P0", "paid"), p("P1", "paid"), p("P2", "paid")];
        // The change removed P0 and P1 (a shrinking pipeline update); the other side refunded
        // P1 meanwhile and pushed P3.
        let theirs = [p("P2", "paid")];
        let current = [p("P0", "paid"), p("P1", "refunded"), p("P2", "paid"), p("P3", "paid")];
        let lost = conflict("P1", Some(p("P1", "paid")), None, Some(p("P1", "refunded")));
        assert_eq!(
            run(&base, &theirs, &current, Wins::Change),
            MergedArray { value: Some(arr(&[p("P2", "paid"), p("P3", "paid")])), conflicts: vec![lost.clone()] }
        );
        assert_eq!(
            run(&base, &theirs, &current, Wins::Current),
            MergedArray {
                value: Some(arr(&[p("P1", "refunded"), p("P2", "paid"), p("P3", "paid")])),
                conflicts: vec![lost]
            }
        );
        // Removed on both sides: simply gone.
        assert_eq!(run(&base, &theirs, &[p("P2", "paid")], Wins::Current), merged(&[p("P2", "paid")]));
    }

    #[test]
    fn an_element_modified_on_both_sides_is_a_conflict_decided_by_policy() {
        let base = [p("P0", "paid"), p("P1", "paid")];
        let theirs = [p("P0", "refunded"), p("P1", "paid")];
        let current = [p("P0", "disputed"), p("P1", "void")];
        let both = conflict("P0", Some(p("P0", "paid")), Some(p("P0", "refunded")), Some(p("P0", "disputed")));
        let change = run(&base, &theirs, &current, Wins::Change);
        assert_eq!(change.value, Some(arr(&[p("P0", "refunded"), p("P1", "void")])));
        assert_eq!(change.conflicts, std::slice::from_ref(&both));
        let current_wins = run(&base, &theirs, &current, Wins::Current);
        assert_eq!(current_wins.value, Some(arr(&[p("P0", "disputed"), p("P1", "void")])));
        assert_eq!(current_wins.conflicts, [both]);
        // The same modification on both sides agrees; key order is not a modification.
        let reordered = Bson::Document(doc! { "status": "refunded", "purchaseId": "P0" });
        assert_eq!(
            run(&base, &theirs, &[reordered.clone(), p("P1", "paid")], Wins::Current),
            merged(&[reordered, p("P1", "paid")])
        );
    }

    #[test]
    fn a_modification_of_an_element_the_other_side_removed_is_a_conflict() {
        let base = [p("P0", "paid"), p("P1", "paid")];
        let theirs = [p("P0", "refunded"), p("P1", "paid")];
        let current = [p("P1", "paid")];
        let gone = conflict("P0", Some(p("P0", "paid")), Some(p("P0", "refunded")), None);
        let change = run(&base, &theirs, &current, Wins::Change);
        assert_eq!(
            change,
            MergedArray { value: Some(arr(&[p("P0", "refunded"), p("P1", "paid")])), conflicts: vec![gone.clone()] }
        );
        let current_wins = run(&base, &theirs, &current, Wins::Current);
        assert_eq!(current_wins, MergedArray { value: Some(arr(&[p("P1", "paid")])), conflicts: vec![gone] });
    }

    #[test]
    fn an_element_both_sides_added_under_one_id_agrees_or_conflicts() {
        let theirs = [p("P5", "paid")];
        assert_eq!(run(&[], &theirs, &[p("P5", "paid")], Wins::Change), merged(&[p("P5", "paid")]));
        let m = run(&[], &theirs, &[p("P5", "pending")], Wins::Current);
        assert_eq!(m.value, Some(arr(&[p("P5", "pending")])));
        assert_eq!(m.conflicts, [conflict("P5", None, Some(p("P5", "paid")), Some(p("P5", "pending")))]);
        // An array that was not there before: every element is new on both sides.
        let m = merge(None, Some(&arr(&theirs)), Some(&arr(&[p("P6", "paid")])), Some("purchaseId"), Wins::Change);
        assert_eq!(m, merged(&[p("P5", "paid"), p("P6", "paid")]));
    }

    #[test]
    fn elements_that_cannot_be_told_apart_merge_as_one_value() {
        let (b, t, c) =
            (arr(&["a".into(), "b".into()]), arr(&["a".into()]), arr(&["a".into(), "b".into(), "c".into()]));
        // Scalars (no id field): whichever side changed it.
        assert_eq!(merge(Some(&b), Some(&t), Some(&b), None, Wins::Current).value, Some(t.clone()));
        assert_eq!(merge(Some(&b), Some(&b), Some(&c), None, Wins::Change).value, Some(c.clone()));
        // Both changed: a conflict on the whole array, decided by policy.
        let m = merge(Some(&b), Some(&t), Some(&c), None, Wins::Change);
        assert_eq!(m.value, Some(t.clone()));
        assert_eq!(
            m.conflicts,
            [ElementConflict { id: None, base: Some(b.clone()), theirs: Some(t.clone()), current: Some(c.clone()) }]
        );
        assert_eq!(merge(Some(&b), Some(&t), Some(&c), None, Wins::Current).value, Some(c.clone()));
        // An element without its id, or two sharing one: the same.
        let no_id = [p("P0", "paid"), Bson::Document(doc! { "status": "paid" })];
        let m = run(&[p("P0", "paid")], &no_id, &[p("P0", "void")], Wins::Current);
        assert_eq!((m.value, m.conflicts.len()), (Some(arr(&[p("P0", "void")])), 1));
        let twice = [p("P0", "paid"), p("P0", "void")];
        assert_eq!(run(&[p("P0", "paid")], &[p("P0", "paid")], &twice, Wins::Change), merged(&twice));
        // Removed or absent on a side is a value like any other.
        assert_eq!(merge(Some(&b), None, Some(&b), Some("purchaseId"), Wins::Current).value, None);
        let m = merge(Some(&b), None, Some(&c), Some("purchaseId"), Wins::Change);
        assert_eq!((m.value, m.conflicts.len()), (None, 1));
        assert_eq!(merge(None, None, Some(&c), None, Wins::Change).value, Some(c));
    }

    #[test]
    fn ids_of_different_types_are_different_ids() {
        let one = |id: Bson, s: &str| Bson::Document(doc! { "purchaseId": id, "status": s });
        let base = [one(Bson::Int32(1), "paid")];
        let theirs = [one(Bson::Int32(1), "refunded"), one(Bson::String("1".into()), "paid")];
        let current = [one(Bson::Int32(1), "paid")];
        assert_eq!(
            run(&base, &theirs, &current, Wins::Current),
            merged(&[one(Bson::Int32(1), "refunded"), one(Bson::String("1".into()), "paid")])
        );
    }
}
