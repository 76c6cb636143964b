//! The macros that declare event records and topic events; the per-topic modules invoke
//! them, so every record has the five common fields and every topic the same impls.

/// Declares an event record: the five common fields first, then the record's own fields, and
/// its [`Record`] impl.
macro_rules! event_record {
    (
        $(#[$meta:meta])*
        $name:ident = $full:literal {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[doc = ""]
        #[doc = concat!("Avro record `", $full, "`.")]
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub struct $name {
            /// Unique id of the event, a UUIDv7 ([`new_event_id`]).
            #[serde(with = "uuid_text")]
            pub event_id: Uuid,
            /// When the event happened: microseconds since the Unix epoch, UTC ([`now_micros`]).
            pub occurred_at: i64,
            /// Tenant workspace.
            pub workspace_id: String,
            /// W3C traceparent; "" when none.
            pub traceparent: String,
            /// W3C tracestate.
            pub tracestate: Option<String>,
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl Record for $name {
            const FULL_NAME: &'static str = $full;
            fn event_id(&self) -> Uuid { self.event_id }
            fn occurred_at(&self) -> i64 { self.occurred_at }
            fn workspace_id(&self) -> &str { &self.workspace_id }
            fn traceparent(&self) -> &str { &self.traceparent }
            fn tracestate(&self) -> Option<&str> { self.tracestate.as_deref() }
        }
    };
}

/// A topic whose value schema is a union of records: one enum variant per branch, named like
/// the record's Rust type.
macro_rules! union_topic {
    (
        $(#[$meta:meta])*
        $enum:ident { topic: $topic:literal, key: $key:ident,
                      records: [ $( $variant:ident ),+ $(,)? ] }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub enum $enum {
            $( $variant($variant), )+
        }

        $(
            impl From<$variant> for $enum {
                fn from(e: $variant) -> Self {
                    Self::$variant(e)
                }
            }
        )+

        impl TopicEvent for $enum {
            const TOPIC: &'static str = $topic;
            const SCHEMA: &'static str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas/", $topic, ".avsc"));

            fn from_record(name: &str, value: Value) -> Result<Self, EventError> {
                $(
                    if name == <$variant as Record>::FULL_NAME {
                        return record_from_value::<$variant>(value).map(Self::$variant);
                    }
                )+
                Err(EventError::UnknownRecord(name.to_owned(), Self::TOPIC))
            }

            fn to_record(&self) -> Result<(&'static str, Value), EventError> {
                match self {
                    $( Self::$variant(e) => record_to_value(Self::TOPIC, e), )+
                }
            }

            fn write_datum(&self, out: &mut Vec<u8>) -> Result<(), EventError> {
                match self {
                    $( Self::$variant(e) => write_record(Self::TOPIC, e, out), )+
                }
            }

            fn key(&self) -> &str {
                match self {
                    $( Self::$variant(e) => &e.$key, )+
                }
            }

            fn event_id(&self) -> Uuid {
                match self {
                    $( Self::$variant(e) => e.event_id, )+
                }
            }

            fn workspace_id(&self) -> &str {
                match self {
                    $( Self::$variant(e) => &e.workspace_id, )+
                }
            }

            fn traceparent(&self) -> &str {
                match self {
                    $( Self::$variant(e) => &e.traceparent, )+
                }
            }

            fn tracestate(&self) -> Option<&str> {
                match self {
                    $( Self::$variant(e) => e.tracestate.as_deref(), )+
                }
            }

            fn with_traceparent(&self, traceparent: String) -> Option<Self> {
                let mut e = self.clone();
                match &mut e {
                    $( Self::$variant(r) => r.traceparent = traceparent, )+
                }
                Some(e)
            }
        }
    };
}

/// A topic whose value schema is a single record: the record type itself is the topic event.
macro_rules! record_topic {
    ($record:ident { topic: $topic:literal, key: $key:ident }) => {
        impl TopicEvent for $record {
            const TOPIC: &'static str = $topic;
            const SCHEMA: &'static str = include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../schemas/",
                $topic,
                ".avsc"
            ));

            fn from_record(name: &str, value: Value) -> Result<Self, EventError> {
                if name == <$record as Record>::FULL_NAME {
                    record_from_value::<$record>(value)
                } else {
                    Err(EventError::UnknownRecord(name.to_owned(), Self::TOPIC))
                }
            }

            fn to_record(&self) -> Result<(&'static str, Value), EventError> {
                record_to_value(Self::TOPIC, self)
            }

            fn write_datum(&self, out: &mut Vec<u8>) -> Result<(), EventError> {
                write_record(Self::TOPIC, self, out)
            }

            fn key(&self) -> &str {
                &self.$key
            }

            fn event_id(&self) -> Uuid {
                self.event_id
            }

            fn workspace_id(&self) -> &str {
                &self.workspace_id
            }

            fn traceparent(&self) -> &str {
                &self.traceparent
            }

            fn tracestate(&self) -> Option<&str> {
                self.tracestate.as_deref()
            }

            fn with_traceparent(&self, traceparent: String) -> Option<Self> {
                Some(Self {
                    traceparent,
                    ..self.clone()
                })
            }
        }
    };
}
