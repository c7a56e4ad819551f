//! A rollup's group document, computed from its members: the one definition the sink writes
//! and `ficus verify` expects.
//!
//! A group document holds the count of its current members and, per distinct field, the
//! distinct values the members have (nulls and absent values left out), sorted so the document
//! is the same whatever order the members' events arrived in.

use bson::{Bson, Document};

/// A group's aggregates over its members.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupTally {
    count: i64,
    distinct: Vec<(String, Vec<Bson>)>,
}

impl GroupTally {
    /// An empty group with these distinct fields, in the transform's order.
    pub fn new<'a>(distinct_fields: impl IntoIterator<Item = &'a str>) -> Self {
        GroupTally { count: 0, distinct: distinct_fields.into_iter().map(|f| (f.to_string(), Vec::new())).collect() }
    }

    /// Adds one member with its value for each distinct field.
    pub fn add<'a>(&mut self, value_of: impl Fn(&str) -> Option<&'a Bson>) {
        self.count += 1;
        for (field, seen) in &mut self.distinct {
            if let Some(v) = value_of(field).filter(|v| !matches!(v, Bson::Null))
                && !seen.contains(v)
            {
                seen.push(v.clone());
            }
        }
    }

    pub fn count(&self) -> i64 {
        self.count
    }

    /// The aggregates as group document fields: `count_field` and each distinct field.
    pub fn fields(&self, count_field: &str) -> Document {
        let mut out = Document::new();
        out.insert(count_field, self.count);
        for (field, seen) in &self.distinct {
            let mut sorted = seen.clone();
            sorted.sort_by_key(|b| b.to_string());
            out.insert(field.as_str(), sorted);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn the_group_document_does_not_depend_on_member_order() {
        let members = [
            doc! { "sub": "daily" },
            doc! { "sub": "beauty" },
            doc! { "sub": Bson::Null },
            doc! {},
            doc! { "sub": "daily" },
        ];
        let tally = |order: &[usize]| {
            let mut t = GroupTally::new(["sub"]);
            for &i in order {
                t.add(|f| members[i].get(f));
            }
            t.fields("productCount")
        };
        let a = tally(&[0, 1, 2, 3, 4]);
        assert_eq!(a, doc! { "productCount": 5_i64, "sub": ["beauty", "daily"] });
        assert_eq!(tally(&[4, 3, 2, 1, 0]), a);
        assert_eq!(GroupTally::new(["sub"]).fields("n"), doc! { "n": 0_i64, "sub": [] });
    }
}
