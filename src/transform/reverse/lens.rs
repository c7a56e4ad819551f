//! The lens of one field run both ways, and where the routing key is in a service document.
//!
//! A [`Lens`] is planned at load (`invert`) as a monolith path and its invertible steps; here
//! are its two directions: forward through the steps, and `put`, which keeps the monolith's
//! lexical form, type and key spelling where the service value allows. Both `put` and the law
//! check (`laws`) run them.

use bson::Bson;

use crate::transform::builtins;
use crate::transform::builtins::same;
use crate::transform::model::{DocumentPlan, How, Key, Lens, Target, Transform};

/// Where a transform's routing key is in a service document: the target field, and the lens
/// that turns its value back into the monolith's (`None`: the value as it is, the `_id` kept).
pub(in crate::transform) fn route_field<'p>(
    t: &Transform,
    plan: &'p DocumentPlan,
) -> Option<(String, Option<&'p Lens>)> {
    if t.route == "_id" && matches!(t.target, Target::Document { key: Key::SourceId, .. }) {
        return Some(("_id".to_string(), None));
    }
    plan.scope.fields.iter().find_map(|f| match &f.how {
        How::Lens(lens) if lens.path == t.route => Some((f.target.clone(), Some(lens))),
        _ => None,
    })
}

impl Lens {
    /// The steps applied forward to a monolith value.
    pub(super) fn forward(&self, v: &Bson) -> Result<Option<Bson>, String> {
        let mut cur = Some(v.clone());
        for step in &self.steps {
            cur = match cur {
                Some(x) => builtins::forward(step, &x)?,
                None => None,
            };
        }
        Ok(cur)
    }

    /// The monolith value for service value `v`, given the monolith's current value. Step by
    /// step from the last: where the forward of the current intermediate value already equals
    /// the value to write back, that intermediate is kept (its lexical form, its type, its key
    /// spelling); otherwise the step's inverse writes it in the current value's form.
    pub(super) fn put(&self, v: &Bson, current: Option<&Bson>) -> Result<Bson, String> {
        let mut chain: Vec<Option<Bson>> = vec![current.cloned()];
        for step in &self.steps {
            let next = match chain.last().and_then(Option::as_ref) {
                Some(x) => builtins::forward(step, x).ok().flatten(),
                None => None,
            };
            chain.push(next);
        }
        let mut value = v.clone();
        for (i, step) in self.steps.iter().enumerate().rev() {
            let (before, after) = (chain[i].as_ref(), chain[i + 1].as_ref());
            value = match (before, after) {
                (Some(before), Some(after)) if same(after, &value) => before.clone(),
                _ => builtins::backward(step, &value, before)?,
            };
        }
        Ok(value)
    }
}
