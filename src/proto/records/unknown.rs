//! Forward compatibility: record kinds and fields this version does not know are kept as
//! canonical CBOR (ciborium's encoding of the decoded value) and written back unchanged, so a
//! node relays what newer nodes wrote without losing any of it.
//!
//! Records are decoded kind by kind: a record whose kind is unknown, or whose body does not
//! decode as its kind, becomes [`Record::Unknown`] instead of failing the whole message it
//! came in (validation then refuses the latter alone).

use std::collections::BTreeMap;
use std::fmt;

use ciborium::Value;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::ser::{self, SerializeMap};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Record;

/// Names of the record kinds this version decodes (the tags of [`Record`]'s encoding).
pub const KNOWN_KINDS: [&str; 5] = ["Node", "Admin", "Master", "Job", "History"];

/// Fields of a struct that this version does not know, by name, each as canonical CBOR.
/// Written back after the known fields, in name order.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extra(BTreeMap<String, Vec<u8>>);

impl Extra {
    /// The canonical CBOR of the unknown field `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.0.get(name).map(Vec::as_slice)
    }

    /// Keep `value` as the unknown field `name`.
    pub fn insert(&mut self, name: &str, value: &Value) {
        self.0.insert(name.to_string(), canonical(value));
    }

    /// Number of unknown fields.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The unknown fields of an encoded struct: every text key of `value` (a map) not in
    /// `known`.
    pub(crate) fn of(value: &Value, known: &[&str]) -> Extra {
        let mut extra = Extra::default();
        if let Value::Map(entries) = value {
            for (key, field) in entries {
                if let Value::Text(name) = key {
                    if !known.contains(&name.as_str()) {
                        extra.insert(name, field);
                    }
                }
            }
        }
        extra
    }

    /// Serialize `known` (a struct) with these fields appended to its map.
    pub(crate) fn serialize_with<T: Serialize, S: Serializer>(
        &self,
        known: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        if self.is_empty() {
            return known.serialize(serializer);
        }
        let value = Value::serialized(known).map_err(ser::Error::custom)?;
        let Value::Map(mut entries) = value else {
            return Err(ser::Error::custom("a struct did not encode as a map"));
        };
        for (name, raw) in &self.0 {
            entries.push((Value::Text(name.clone()), decode_canonical(raw)?));
        }
        Wire(&Value::Map(entries)).serialize(serializer)
    }
}

/// ciborium's encoding of `value` (definite lengths, shortest heads and floats).
pub(crate) fn canonical(value: &Value) -> Vec<u8> {
    let mut bytes = Vec::new();
    // Encoding a decoded value into a Vec cannot fail.
    let _ = ciborium::into_writer(value, &mut bytes);
    bytes
}

/// A decoded value written through any serde serializer as the CBOR it came from. ciborium's
/// own `Serialize` for `Value` writes null as serde's unit, which the request-response codec
/// (cbor4ii) encodes as an empty array; this writes it as `none`, which both encode as null.
/// Tags follow ciborium's convention and so survive only the ciborium paths (gossip, store);
/// our encodings never contain tags.
struct Wire<'a>(&'a Value);

impl Serialize for Wire<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeSeq, SerializeTupleVariant};
        match self.0 {
            Value::Null => serializer.serialize_none(),
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&Wire(item))?;
                }
                seq.end()
            }
            Value::Map(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    map.serialize_entry(&Wire(key), &Wire(value))?;
                }
                map.end()
            }
            Value::Tag(tag, value) => {
                let mut acc = serializer.serialize_tuple_variant("@@TAG@@", 0, "@@TAGGED@@", 2)?;
                acc.serialize_field(tag)?;
                acc.serialize_field(&Wire(value))?;
                acc.end()
            }
            scalar => scalar.serialize(serializer),
        }
    }
}

fn decode_canonical<E: ser::Error>(raw: &[u8]) -> Result<Value, E> {
    ciborium::from_reader(raw).map_err(E::custom)
}

/// Serde for a struct that keeps unknown fields in its `extra: Extra` field: the struct
/// derives its own serde with `#[serde(remote = "Self")]` and `#[serde(skip)]` on `extra`;
/// this wraps it, with the list of field names the derive knows.
macro_rules! keep_unknown_fields {
    ($ty:ty, $fields:expr) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                struct Known<'a>(&'a $ty);
                impl serde::Serialize for Known<'_> {
                    fn serialize<S: serde::Serializer>(
                        &self,
                        serializer: S,
                    ) -> Result<S::Ok, S::Error> {
                        <$ty>::serialize(self.0, serializer)
                    }
                }
                self.extra.serialize_with(&Known(self), serializer)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Known($ty);
                impl<'de> serde::Deserialize<'de> for Known {
                    fn deserialize<D: serde::Deserializer<'de>>(
                        deserializer: D,
                    ) -> Result<Self, D::Error> {
                        <$ty>::deserialize(deserializer).map(Known)
                    }
                }
                let value = <ciborium::Value as serde::Deserialize>::deserialize(deserializer)?;
                let Known(mut known) = value
                    .deserialized()
                    .map_err(<D::Error as serde::de::Error>::custom)?;
                known.extra = $crate::proto::records::Extra::of(&value, $fields);
                Ok(known)
            }
        }
    };
}
pub(crate) use keep_unknown_fields;

impl Serialize for Record {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The same bytes as serde's externally tagged enum: a one-entry map, kind → body.
        let mut map = serializer.serialize_map(Some(1))?;
        match self {
            Record::Node(node) => map.serialize_entry("Node", node)?,
            Record::Admin(admin) => map.serialize_entry("Admin", admin)?,
            Record::Master(master) => map.serialize_entry("Master", master)?,
            Record::Job(job) => map.serialize_entry("Job", job)?,
            Record::History(horizon) => map.serialize_entry("History", horizon)?,
            Record::Unknown { kind, raw } => {
                map.serialize_entry(kind, &Wire(&decode_canonical::<S::Error>(raw)?))?
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Record {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RecordVisitor)
    }
}

struct RecordVisitor;

impl<'de> Visitor<'de> for RecordVisitor {
    type Value = Record;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a record: a map of one kind name to its body")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Record, A::Error> {
        let Some(kind) = map.next_key::<String>()? else {
            return Err(de::Error::custom("a record without a kind"));
        };
        let body: Value = map.next_value()?;
        if map.next_key::<IgnoredAny>()?.is_some() {
            return Err(de::Error::custom("a record with more than one kind"));
        }
        Ok(Record::from_parts(kind, body))
    }
}

impl Record {
    /// The record of `kind` whose body is `body`; `Unknown` when the kind is not one this
    /// version knows or the body does not decode as that kind.
    fn from_parts(kind: String, body: Value) -> Record {
        let known = match kind.as_str() {
            "Node" => body.deserialized().map(Record::Node).ok(),
            "Admin" => body.deserialized().map(Record::Admin).ok(),
            "Master" => body.deserialized().map(Record::Master).ok(),
            "Job" => body.deserialized().map(Record::Job).ok(),
            "History" => body.deserialized().map(Record::History).ok(),
            _ => None,
        };
        known.unwrap_or_else(|| Record::Unknown {
            kind,
            raw: canonical(&body),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Key, NodeAdmin, NodeInfo, RecordError};
    use super::*;
    use crate::proto::crdt::{Lww, Stamp};
    use crate::proto::hlc::Hlc;
    use crate::proto::jobs::{JobRecord, JobSpec};

    fn encode<T: Serialize>(value: &T) -> Vec<u8> {
        let mut bytes = Vec::new();
        ciborium::into_writer(value, &mut bytes).unwrap();
        bytes
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    /// What a newer version might write: a record of a kind this one does not know.
    fn notice_bytes() -> Vec<u8> {
        let body = Value::Map(vec![
            (text("text"), text("maintenance at noon")),
            (text("level"), Value::Integer(3.into())),
            (text("ratio"), Value::Float(1.5)),
            (
                text("tags"),
                Value::Array(vec![text("a"), Value::Bool(true)]),
            ),
        ]);
        encode(&Value::Map(vec![(text("Notice"), body)]))
    }

    #[test]
    fn a_record_of_an_unknown_kind_round_trips_byte_identically() {
        let bytes = notice_bytes();
        let record: Record = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert!(matches!(&record, Record::Unknown { kind, .. } if kind == "Notice"));
        assert_eq!(encode(&record), bytes);
        let key = Key::parse("notice/2026-12-03").unwrap();
        assert_eq!(key, Key::Other("notice/2026-12-03".into()));
        assert!(record.validate(&key).is_ok());
        assert!(matches!(
            record.validate(&Key::Master),
            Err(RecordError::KindMismatch(_))
        ));
    }

    #[test]
    fn known_kinds_encode_as_the_derived_enum_did() {
        #[derive(Serialize)]
        enum Derived<'a> {
            Admin(&'a NodeAdmin),
        }
        let admin = NodeAdmin {
            draining: Some(Lww::new(
                Stamp {
                    at: Hlc::default(),
                    by: "n1".into(),
                },
                true,
            )),
            ..NodeAdmin::default()
        };
        let record = Record::Admin(admin.clone());
        assert_eq!(encode(&record), encode(&Derived::Admin(&admin)));
        let back: Record = ciborium::from_reader(encode(&record).as_slice()).unwrap();
        assert_eq!(back, record);
    }

    #[test]
    fn one_undecodable_record_does_not_fail_its_page() {
        let good = Record::Admin(NodeAdmin::default());
        let broken = Value::Map(vec![(text("Job"), text("not a job"))]);
        let notice: Value = ciborium::from_reader(notice_bytes().as_slice()).unwrap();
        let page = Value::Array(vec![
            Value::Array(vec![text("admin/a"), Value::serialized(&good).unwrap()]),
            Value::Array(vec![text("job/x"), broken]),
            Value::Array(vec![text("notice/n1"), notice]),
        ]);
        let decoded: Vec<(String, Record)> =
            ciborium::from_reader(encode(&page).as_slice()).unwrap();
        assert_eq!(decoded.len(), 3);
        assert_eq!(decoded[0].1, good);
        // The undecodable job is refused on its own, under any key.
        assert!(matches!(&decoded[1].1, Record::Unknown { kind, .. } if kind == "Job"));
        assert!(decoded[1].1.validate(&Key::Other("x/y".into())).is_err());
        assert!(matches!(&decoded[2].1, Record::Unknown { kind, .. } if kind == "Notice"));
    }

    #[test]
    fn unknown_versions_merge_to_the_same_record_in_any_order() {
        let a = Record::Unknown {
            kind: "Notice".into(),
            raw: vec![0x01],
        };
        let b = Record::Unknown {
            kind: "Notice".into(),
            raw: vec![0x02],
        };
        let (mut ab, mut ba) = (a.clone(), b.clone());
        assert!(ab.merge(&b));
        assert!(!ba.merge(&a));
        assert_eq!(ab, ba);
        assert!(!ab.merge(&ab.clone()));
    }

    #[test]
    fn keys_of_unknown_kinds_are_accepted_when_well_formed() {
        for good in [
            "notice",
            "notice/x",
            "user/alice/settings",
            "setting-v2/a.b:c",
        ] {
            assert_eq!(Key::parse(good), Ok(Key::Other(good.into())), "{good}");
            assert_eq!(Key::Other(good.into()).encode(), good);
        }
        let long = format!("notice/{}", "x".repeat(300));
        for bad in [
            "",
            "/x",
            "Notice/x",
            "notice/",
            "notice//x",
            "notice/a b",
            "job/x",
            "node/a/b",
            "admin/",
            "master/x",
            "9lives/x",
            &long,
        ] {
            assert!(Key::parse(bad).is_err(), "{bad}");
        }
    }

    /// A spec as a newer version writes it: one more field, after the ones known here.
    fn spec_with_priority() -> (JobSpec, Vec<u8>) {
        let spec = JobSpec::for_tests("fix the bug");
        let Value::Map(mut entries) = Value::serialized(&spec).unwrap() else {
            panic!("a spec encodes as a map");
        };
        entries.push((text("priority"), Value::Integer(7.into())));
        (spec, encode(&Value::Map(entries)))
    }

    #[test]
    fn an_unknown_spec_field_survives_decoding_and_encoding() {
        let (plain, bytes) = spec_with_priority();
        let spec: JobSpec = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert_eq!(spec.extra.get("priority"), Some(&[0x07][..]));
        assert_eq!(encode(&spec), bytes);
        // Inside a job record inside a record, too.
        let record = Record::Job(Box::new(JobRecord {
            compacted: false,
            spec: spec.clone(),
            ..crate::proto::jobs::tests::queued_record()
        }));
        let back: Record = ciborium::from_reader(encode(&record).as_slice()).unwrap();
        assert_eq!(back, record);
        // Known fields only: nothing extra (every field name is in the lists).
        let mut full = plain;
        full.idempotency_key = Some("k".into());
        let back: JobSpec = ciborium::from_reader(encode(&full).as_slice()).unwrap();
        assert!(back.extra.is_empty());
        let record = crate::proto::jobs::tests::queued_record();
        let back: JobRecord = ciborium::from_reader(encode(&record).as_slice()).unwrap();
        assert!(back.extra.is_empty() && back.spec.extra.is_empty());
    }

    #[test]
    fn every_node_info_field_is_known() {
        let info = NodeInfo {
            id: "n1".into(),
            name: "n1".into(),
            tags: vec!["t".into()],
            slots: 1,
            settings_stamp: Stamp {
                at: Hlc::default(),
                by: "n1".into(),
            },
            master_eligible: true,
            os: "linux".into(),
            arch: "x86_64".into(),
            cpus: 2,
            memory_bytes: 1,
            gpus: Vec::new(),
            version: "1".into(),
            addrs: Vec::new(),
            api_url: Some("http://x".into()),
            started_at_ms: 1,
            heartbeat_ms: 1,
            agents: Vec::new(),
            local_repos: true,
            extra: Extra::default(),
        };
        let back: NodeInfo = ciborium::from_reader(encode(&info).as_slice()).unwrap();
        assert_eq!(back, info);
        let Value::Map(mut entries) = Value::serialized(&info).unwrap() else {
            panic!("a node info encodes as a map");
        };
        entries.push((text("zone"), text("eu-1")));
        let bytes = encode(&Value::Map(entries));
        let back: NodeInfo = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert_eq!(back.extra.len(), 1);
        assert_eq!(encode(&back), bytes);
    }

    #[test]
    fn the_spec_merge_keeps_the_copy_with_more_fields() {
        use crate::proto::crdt::Crdt;
        let (plain, bytes) = spec_with_priority();
        let richer: JobSpec = ciborium::from_reader(bytes.as_slice()).unwrap();
        let job = |spec: &JobSpec| JobRecord {
            compacted: false,
            spec: spec.clone(),
            ..crate::proto::jobs::tests::queued_record()
        };
        let mut lost = job(&plain);
        assert!(lost.merge(&job(&richer)));
        assert_eq!(lost.spec, richer);
        let mut kept = job(&richer);
        assert!(!kept.merge(&job(&plain)));
        assert_eq!(kept.spec, richer);
    }
}
