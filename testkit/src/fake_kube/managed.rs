//! `metadata.managedFields` as a kube-apiserver returns them on every
//! object: one entry per field manager (and subresource), with the fields
//! it owns in the FieldsV1 format (`f:` a field, `k:` an item of a list-map
//! by its keys, `v:` a member of a set, `.` the node itself), the operation
//! of its last write (`Apply` or `Update`), the object's apiVersion and the
//! time. Caches of clients that keep whole objects keep these too, so the
//! fake must send them for a memory measurement to mean anything.
//!
//! Simplified: an `Update` entry marks every map it owns fields under as
//! its own (`.`), as a create does; a real apiserver marks only the maps
//! that write created. An `Apply` entry marks only list-map items.

use serde_json::{Map, Value, json};

use super::fields::{FieldSet, Manager, Ownership, Step};

/// The last write of one manager.
#[derive(Clone, Debug)]
struct Write {
    apply: bool,
    time: String,
}

/// The managers of one object, in the order they first wrote (as the
/// apiserver keeps its entries), with their last write.
#[derive(Clone, Debug, Default)]
pub struct Writes(Vec<(Manager, Write)>);

impl Writes {
    /// `manager` wrote the object now, with an apply or not.
    pub fn wrote(&mut self, manager: &Manager, apply: bool, time: String) {
        let write = Write { apply, time };
        match self.0.iter_mut().find(|(m, _)| m == manager) {
            Some((_, last)) => *last = write,
            None => self.0.push((manager.clone(), write)),
        }
    }

    /// The `metadata.managedFields` of an object of `api_version` whose
    /// fields `ownership` says who owns. Managers that own nothing any more
    /// have no entry.
    pub fn render(&mut self, ownership: &Ownership, api_version: &str) -> Value {
        let owned: Vec<(&Manager, &FieldSet)> = ownership.managers().collect();
        self.0.retain(|(m, _)| owned.iter().any(|(o, _)| *o == m));
        let entries: Vec<Value> = self
            .0
            .iter()
            .filter_map(|(manager, write)| {
                let (_, fields) = owned.iter().find(|(o, _)| *o == manager)?;
                let mut entry = json!({
                    "manager": manager.0,
                    "operation": if write.apply { "Apply" } else { "Update" },
                    "apiVersion": api_version,
                    "time": write.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": fields_v1(fields, !write.apply),
                });
                if !manager.1.is_empty() {
                    entry["subresource"] = json!(manager.1);
                }
                Some(entry)
            })
            .collect();
        Value::Array(entries)
    }
}

/// One step as FieldsV1 names it.
fn step_key(step: &Step) -> String {
    match step {
        Step::Field(name) => format!("f:{name}"),
        Step::Item(keys) => {
            let keys: Map<String, Value> = keys
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::from_str(v).unwrap_or(Value::Null)))
                .collect();
            format!("k:{}", Value::Object(keys))
        }
        Step::Member(value) => format!("v:{value}"),
    }
}

fn node<'a>(root: &'a mut Map<String, Value>, path: &[Step]) -> &'a mut Map<String, Value> {
    let mut node = root;
    for step in path {
        node = node
            .entry(step_key(step))
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("FieldsV1 nodes are objects");
    }
    node
}

/// A set of fields in the FieldsV1 format.
pub fn fields_v1(set: &FieldSet, update: bool) -> Value {
    let mut root = Map::new();
    for path in set {
        node(&mut root, path);
        if update {
            // Every map above the field, `metadata` aside (it is never
            // anyone's own).
            for depth in 1..path.len() {
                let above = &path[..depth];
                if above != [Step::Field("metadata".into())] {
                    node(&mut root, above).insert(".".into(), json!({}));
                }
            }
        }
    }
    // An owned item (or field) with owned fields inside: `.` is the item.
    for path in set {
        let n = node(&mut root, path);
        if n.keys().any(|k| k != ".") {
            n.insert(".".into(), json!({}));
        }
    }
    Value::Object(root)
}
