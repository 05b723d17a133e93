//! Field ownership and server-side apply, as structured-merge-diff does it
//! (simplified): each manager owns a set of field paths; an apply sets what
//! it names, and removes what its manager applied before and no longer
//! names, unless someone else owns it too.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// How a list merges, from the schema's `x-kubernetes-list-type`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListType {
    /// Replaced as a whole (the default).
    Atomic,
    /// Each distinct value owned on its own (`metadata.finalizers`).
    Set,
    /// Items identified by these key fields (conditions by `type`).
    Map(Vec<String>),
}

/// One step into an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    Field(String),
    /// The item of a list-map with these key values (as JSON text).
    Item(Vec<(String, String)>),
    /// A value of a set-list, as JSON text.
    Member(String),
}

pub type FieldPath = Vec<Step>;
pub type FieldSet = BTreeSet<FieldPath>;

/// `.status.conditions[type="Ready"].reason`, as the apiserver shows paths
/// in conflict messages.
pub fn display(path: &FieldPath) -> String {
    path.iter()
        .map(|step| match step {
            Step::Field(name) => format!(".{name}"),
            Step::Item(keys) => {
                let keys: Vec<String> = keys.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("[{}]", keys.join(","))
            }
            Step::Member(value) => format!("[{value}]"),
        })
        .collect()
}

/// Tells the list type at a schema path (field names, `[]` for items).
pub type Lists<'a> = &'a dyn Fn(&[String]) -> ListType;

/// The fields an object or an applied configuration sets: every leaf, and
/// every item of a list-map or set. TypeMeta and the metadata the server
/// owns (name, uid, resourceVersion, ...) belong to no one.
pub fn fields_of(obj: &Value, lists: Lists) -> FieldSet {
    let mut out = FieldSet::new();
    let Some(map) = obj.as_object() else { return out };
    for (name, value) in map {
        let mut path = vec![Step::Field(name.clone())];
        let mut schema = vec![name.clone()];
        match name.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                for field in ["labels", "annotations", "finalizers", "ownerReferences"] {
                    if let Some(v) = value.get(field) {
                        path.push(Step::Field(field.into()));
                        schema.push(field.into());
                        collect(v, &mut path, &mut schema, lists, &mut out);
                        path.pop();
                        schema.pop();
                    }
                }
            }
            _ => collect(value, &mut path, &mut schema, lists, &mut out),
        }
    }
    out
}

fn collect(value: &Value, path: &mut FieldPath, schema: &mut Vec<String>, lists: Lists, out: &mut FieldSet) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (name, v) in map {
                path.push(Step::Field(name.clone()));
                schema.push(name.clone());
                collect(v, path, schema, lists, out);
                path.pop();
                schema.pop();
            }
        }
        Value::Array(items) => match lists(schema) {
            ListType::Atomic => {
                out.insert(path.clone());
            }
            ListType::Set => {
                for item in items {
                    path.push(Step::Member(identity(Some(item))));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            ListType::Map(keys) => {
                schema.push("[]".into());
                for item in items {
                    path.push(Step::Item(item_keys(item, &keys)));
                    out.insert(path.clone());
                    collect(item, path, schema, lists, out);
                    path.pop();
                }
                schema.pop();
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// A value as it identifies a list item: its JSON text (paths must be
/// ordered, and JSON values are not).
fn identity(value: Option<&Value>) -> String {
    value.unwrap_or(&Value::Null).to_string()
}

fn item_keys(item: &Value, keys: &[String]) -> Vec<(String, String)> {
    keys.iter().map(|k| (k.clone(), identity(item.get(k)))).collect()
}

fn matches_item(item: &Value, keys: &[(String, String)]) -> bool {
    keys.iter().all(|(k, v)| identity(item.get(k)) == *v)
}

fn matches_step(item: &Value, step: &Step) -> bool {
    match step {
        Step::Item(keys) => matches_item(item, keys),
        Step::Member(value) => identity(Some(item)) == *value,
        Step::Field(_) => false,
    }
}

pub fn value_at<'v>(obj: &'v Value, path: &FieldPath) -> Option<&'v Value> {
    path.iter().try_fold(obj, |v, step| match step {
        Step::Field(name) => v.get(name),
        step => v.as_array()?.iter().find(|item| matches_step(item, step)),
    })
}

fn remove_at(obj: &mut Value, path: &FieldPath) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut v = &mut *obj;
    for step in parent {
        let next = match step {
            Step::Field(name) => v.get_mut(name),
            step => v
                .as_array_mut()
                .and_then(|items| items.iter_mut().find(|item| matches_step(item, step))),
        };
        match next {
            Some(next) => v = next,
            None => return,
        }
    }
    match last {
        Step::Field(name) => {
            if let Some(map) = v.as_object_mut() {
                map.remove(name);
            }
        }
        step => {
            if let Some(items) = v.as_array_mut() {
                items.retain(|item| !matches_step(item, step));
            }
        }
    }
    // A map that held only removed fields goes too, as structured merge
    // removes a map its manager owned ("f:pendingCreation: {.: {}}").
    if matches!(parent.last(), Some(Step::Field(_)))
        && value_at(obj, &parent.to_vec()).is_some_and(|p| p.as_object().is_some_and(|m| m.is_empty()))
    {
        remove_at(obj, &parent.to_vec());
    }
}

/// Sets every field of `applied` in `target`: maps merge key by key,
/// list-maps item by item, sets value by value; anything else is replaced.
fn merge(target: &mut Value, applied: &Value, schema: &mut Vec<String>, lists: Lists) {
    match (target, applied) {
        (Value::Object(target), Value::Object(applied)) => {
            for (name, v) in applied {
                schema.push(name.clone());
                match target.get_mut(name) {
                    Some(existing) => merge(existing, v, schema, lists),
                    None => {
                        target.insert(name.clone(), v.clone());
                    }
                }
                schema.pop();
            }
        }
        (Value::Array(target), Value::Array(applied)) => match lists(schema) {
            ListType::Atomic => target.clone_from(applied),
            ListType::Set => {
                for v in applied {
                    if !target.contains(v) {
                        target.push(v.clone());
                    }
                }
            }
            ListType::Map(keys) => {
                schema.push("[]".into());
                for item in applied {
                    let id = item_keys(item, &keys);
                    match target.iter_mut().find(|t| matches_item(t, &id)) {
                        Some(existing) => merge(existing, item, schema, lists),
                        None => target.push(item.clone()),
                    }
                }
                schema.pop();
            }
        },
        (target, applied) => target.clone_from(applied),
    }
}

/// A field manager, as managedFields names one: by name and by the
/// subresource it wrote through (`""` for the object itself).
pub type Manager = (String, &'static str);

/// Who owns which fields of one object.
#[derive(Clone, Debug, Default)]
pub struct Ownership {
    managers: BTreeMap<Manager, FieldSet>,
}

/// Another manager owns a field an apply sets to another value.
pub struct Conflicts(pub Vec<(String, FieldPath)>);

impl Ownership {
    /// Each manager and the fields it owns, for `metadata.managedFields`.
    pub fn managers(&self) -> impl Iterator<Item = (&Manager, &FieldSet)> {
        self.managers.iter()
    }

    /// A write that is no apply (create, update, patch): its manager owns
    /// every field it set or changed, taken from whoever owned it; fields it
    /// removed are no one's.
    pub fn update(&mut self, manager: Manager, old: &Value, new: &Value, lists: Lists) {
        let before = fields_of(old, lists);
        let after = fields_of(new, lists);
        let changed: FieldSet = after
            .iter()
            .filter(|p| value_at(old, p) != value_at(new, p))
            .cloned()
            .collect();
        let removed: FieldSet = before.difference(&after).cloned().collect();
        for set in self.managers.values_mut() {
            set.retain(|p| !changed.contains(p) && !removed.contains(p));
        }
        if !changed.is_empty() {
            self.managers.entry(manager).or_default().extend(changed);
        }
        self.managers.retain(|_, set| !set.is_empty());
    }

    /// Server-side apply of `applied` by `manager` to `current`: the object
    /// it yields, or the conflicts that refuse it (none when `force`, which
    /// takes the fields over instead).
    pub fn apply(
        &mut self,
        manager: Manager,
        current: &Value,
        applied: &Value,
        force: bool,
        lists: Lists,
    ) -> Result<Value, Conflicts> {
        let fields = fields_of(applied, lists);
        let mut conflicts = Vec::new();
        for (other, set) in self.managers.iter().filter(|(m, _)| **m != manager) {
            for path in set.intersection(&fields) {
                // An item of a list-map conflicts through its fields only.
                let is_item = matches!(path.last(), Some(Step::Item(_)));
                if !is_item && value_at(current, path) != value_at(applied, path) {
                    conflicts.push((other.clone(), path.clone()));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(Conflicts(
                conflicts.into_iter().map(|((name, _), path)| (name, path)).collect(),
            ));
        }
        for (other, path) in &conflicts {
            if let Some(set) = self.managers.get_mut(other) {
                set.remove(path);
            }
        }
        let previous = self.managers.remove(&manager).unwrap_or_default();
        let mut obj = current.clone();
        for path in previous.difference(&fields) {
            let shared = self
                .managers
                .values()
                .any(|set| set.iter().any(|p| p.starts_with(path)));
            if !shared {
                remove_at(&mut obj, path);
            }
        }
        merge(&mut obj, applied, &mut Vec::new(), lists);
        self.managers.insert(manager, fields);
        self.managers.retain(|_, set| !set.is_empty());
        Ok(obj)
    }
}
