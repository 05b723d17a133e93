//! What the fake serves: REST paths, kinds, and what the CRDs say about
//! their schemas (status subresource, list types).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde_json::Value;

use super::fields::ListType;

/// A kind of resource, as its collection is served.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Resource {
    /// `/api/v1` or `/apis/GROUP/VERSION`.
    pub prefix: String,
    pub plural: String,
}

impl Resource {
    pub fn namespaces() -> Self {
        Resource {
            prefix: "/api/v1".into(),
            plural: "namespaces".into(),
        }
    }

    pub fn group(&self) -> &str {
        self.prefix
            .strip_prefix("/apis/")
            .map_or("", |gv| gv.split('/').next().unwrap_or(""))
    }

    /// `plural.group` (just `plural` in the core group), as the apiserver
    /// names a resource in its messages.
    pub fn qualified(&self) -> String {
        match self.group() {
            "" => self.plural.clone(),
            group => format!("{}.{group}", self.plural),
        }
    }

    /// The apiVersion of its objects.
    pub fn api_version(&self) -> &str {
        self.prefix.trim_start_matches("/apis/").trim_start_matches("/api/")
    }

    pub fn kind(&self) -> String {
        KINDS
            .iter()
            .find(|(_, plural)| *plural == self.plural)
            .map(|(kind, _)| kind.to_string())
            .or_else(|| CRDS.get(&self.plural).map(|crd| crd.kind.clone()))
            .unwrap_or_else(|| "Unknown".into())
    }

    /// Whether writes to the object leave `.status` alone (and `/status`
    /// writes leave everything else alone): the CRDs with a status
    /// subresource.
    pub fn has_status_subresource(&self) -> bool {
        CRDS.get(&self.plural).is_some_and(|crd| crd.status_subresource)
    }

    /// How lists at `schema_path` (field names, `[]` for list items) merge.
    pub fn list_type(&self, schema_path: &[String]) -> ListType {
        match schema_path {
            [m, f] if m == "metadata" && f == "finalizers" => ListType::Set,
            [m, f] if m == "metadata" && f == "ownerReferences" => ListType::Map(vec!["uid".into()]),
            _ => CRDS
                .get(&self.plural)
                .and_then(|crd| crd.lists.get(schema_path).cloned())
                .unwrap_or(ListType::Atomic),
        }
    }

    /// The path of an object of this resource.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match namespace {
            Some(ns) => format!("{}/namespaces/{ns}/{}/{name}", self.prefix, self.plural),
            None => format!("{}/{}/{name}", self.prefix, self.plural),
        }
    }
}

/// What a request path names.
#[derive(Clone, Debug)]
pub enum Target {
    /// `.../R` (all namespaces) or `.../namespaces/NS/R`.
    Collection {
        resource: Resource,
        namespace: Option<String>,
    },
    /// One object, or a subresource of it (`status`).
    Object {
        resource: Resource,
        namespace: Option<String>,
        name: String,
        subresource: Option<String>,
    },
}

pub fn parse(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => (format!("/api/{version}"), rest),
        ["apis", group, version, rest @ ..] => (format!("/apis/{group}/{version}"), rest),
        _ => return None,
    };
    let resource = |plural: &str| Resource {
        prefix: prefix.clone(),
        plural: plural.to_string(),
    };
    let object = |plural: &str, namespace: Option<&str>, name: &str, subresource: Option<&str>| Target::Object {
        resource: resource(plural),
        namespace: namespace.map(str::to_string),
        name: name.to_string(),
        subresource: subresource.map(str::to_string),
    };
    Some(match rest {
        [plural] => Target::Collection {
            resource: resource(plural),
            namespace: None,
        },
        ["namespaces", ns, plural] => Target::Collection {
            resource: resource(plural),
            namespace: Some(ns.to_string()),
        },
        ["namespaces", ns, plural, name] => object(plural, Some(ns), name, None),
        ["namespaces", ns, plural, name, sub] => object(plural, Some(ns), name, Some(sub)),
        [plural, name] => object(plural, None, name, None),
        [plural, name, sub] => object(plural, None, name, Some(sub)),
        _ => return None,
    })
}

/// The built-in kinds the operator touches.
const KINDS: &[(&str, &str)] = &[
    ("Secret", "secrets"),
    ("Event", "events"),
    ("Lease", "leases"),
    ("Namespace", "namespaces"),
];

/// The plural of a kind, for [`super::path_of`].
pub fn plural(kind: &str) -> String {
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, plural)| plural.to_string())
        .or_else(|| {
            CRDS.iter()
                .find(|(_, crd)| crd.kind == kind)
                .map(|(plural, _)| plural.clone())
        })
        .unwrap_or_else(|| format!("{}s", kind.to_lowercase()))
}

struct Crd {
    kind: String,
    status_subresource: bool,
    /// The list types its schema declares (`x-kubernetes-list-type`), by
    /// schema path.
    lists: BTreeMap<Vec<String>, ListType>,
}

/// The operator's own CRDs, by plural: the fake serves them as an
/// apiserver with them installed would.
static CRDS: LazyLock<BTreeMap<String, Crd>> = LazyLock::new(|| {
    use serde::Deserialize;
    let yaml = matrix_user_operator::api::crds_yaml().expect("the CRDs render");
    serde_yaml::Deserializer::from_str(&yaml)
        .map(|doc| Value::deserialize(doc).expect("a CRD"))
        .map(|crd| {
            let version = &crd["spec"]["versions"][0];
            let mut lists = BTreeMap::new();
            collect_lists(&version["schema"]["openAPIV3Schema"], &mut Vec::new(), &mut lists);
            let plural = crd["spec"]["names"]["plural"].as_str().expect("plural").to_string();
            let kind = crd["spec"]["names"]["kind"].as_str().expect("kind").to_string();
            let status_subresource = !version["subresources"]["status"].is_null();
            (
                plural,
                Crd {
                    kind,
                    status_subresource,
                    lists,
                },
            )
        })
        .collect()
});

fn collect_lists(schema: &Value, path: &mut Vec<String>, out: &mut BTreeMap<Vec<String>, ListType>) {
    match schema["x-kubernetes-list-type"].as_str() {
        Some("map") => {
            let keys = schema["x-kubernetes-list-map-keys"]
                .as_array()
                .map(|keys| keys.iter().filter_map(|k| k.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            out.insert(path.clone(), ListType::Map(keys));
        }
        Some("set") => {
            out.insert(path.clone(), ListType::Set);
        }
        _ => {}
    }
    if let Some(properties) = schema["properties"].as_object() {
        for (name, property) in properties {
            path.push(name.clone());
            collect_lists(property, path, out);
            path.pop();
        }
    }
    if schema["items"].is_object() {
        path.push("[]".into());
        collect_lists(&schema["items"], path, out);
        path.pop();
    }
}
