//! RFC 6902 JSON Patch: parse, apply atomically, revert.
//!
//! # Invariants
//!
//! - **Exactly the RFC's six operations** (`add`, `remove`, `replace`, `move`, `copy`,
//!   `test`), with the member rules of RFC 6902 §4: `op` and `path` are required strings,
//!   `value` is required for `add`/`replace`/`test` (JSON `null` counts as present), `from`
//!   is a required string for `move`/`copy`, and any other member is ignored (Appendix A.11).
//!   Pointers follow RFC 6901 (see [`crate::pointer`]).
//! - **Atomic.** [`Patch::apply`] applies every operation or none: when an operation fails,
//!   the document is restored to exactly the value it had before the call and the error
//!   names the failing operation's index.
//! - **No clone of the document.** Atomicity comes from an *undo log*, not from a copy: every
//!   primitive mutation is itself all-or-nothing and, once done, pushes the information
//!   needed to reverse it (the replaced or removed value is *moved* into the log, never
//!   cloned). On failure the log is replayed backwards. The cost is proportional to what the
//!   patch touches, not to the document size, so a batch of patches for one workflow never
//!   copies the definition (not per operation, not even per patch). The only deep copies are
//!   the ones the RFC asks for: an operation's `value` inserted into the document (the patch
//!   is borrowed) and `copy`. Applying and reverting a small patch on a large definition
//!   thus costs a small fraction of one clone of it.
//! - **Reversible.** [`Patch::apply_reversible`] hands the undo log to the caller as an
//!   [`UndoLog`], so the materializer can apply a patch, validate the result, and
//!   [`UndoLog::revert`] it if the result is not a valid definition, still without a copy.
//! - **`test` equality** is RFC 6902 §4.6 JSON equality ([`json_equal`]): numbers by value
//!   (`1 == 1.0`), objects unordered, arrays ordered, strings by code points.
//! - No panics: the undo replay cannot fail by construction (see [`Patch::apply`]); the
//!   only assertions are `debug_assert!`s of that invariant, active in debug builds only.
//! - **Bounded work.** Every application runs within a [`Budget`] (operation count, bytes
//!   produced, nesting depth, pointer size, array shifts), checked *while* applying: each
//!   operation is measured before it allocates, so a patch that would exceed the budget
//!   is rejected ([`PatchError::OverBudget`], codes `budget_*`) before memory or the stack
//!   run out, and the document is restored as for any other failure. The undo log holds at
//!   most one entry per operation and only values moved out of the document.
//!
//! # Interpretations of the RFCs (the RFC is silent or leaves a choice)
//!
//! - `remove` with path `""` (the whole document) fails with `invalid_operation`: RFC 6902
//!   does not define a document with nothing in it.
//! - A `test`, `remove`, `replace` or `from` location that does not exist is
//!   `path_not_found` (not `test_failed`); `-` or a malformed index on an array is
//!   `invalid_index`; an `add` index greater than the array length is `invalid_index`.
//! - `move` whose `from` is a proper prefix of `path` is `move_into_child`, checked before
//!   the document is looked at; `move` to the same path is a no-op once `from` is known to
//!   exist (RFC: "The "from" location MUST exist"). `move` from `""` to `""` is therefore a
//!   no-op, and from `""` anywhere else is `move_into_child`.
//! - Duplicate member names (Appendix A.13) cannot be seen in a parsed [`Value`], which keeps
//!   the last one. [`Patch::from_json_str`] parses raw text with [`parse_json_strict`], which
//!   rejects duplicate member names anywhere in the text.
//! - Object member order: serde_json's default map is ordered by key, so an undone `remove`
//!   restores the document exactly. (With serde_json's `preserve_order` feature a reverted
//!   member would move to the end of its object: equal as JSON, different in text.)

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::definition::measure;
use crate::pointer::{json_kind, JsonPointer, PointerError};

/// One JSON Patch operation (RFC 6902 §4).
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    /// §4.1: add `value` at `path` (insert into an array, set an object member, or replace
    /// the whole document when `path` is `""`).
    Add {
        /// Target location; its last token may be `-` on an array.
        path: JsonPointer,
        /// The value to add.
        value: Value,
    },
    /// §4.2: remove the value at `path`, which must exist.
    Remove {
        /// Target location.
        path: JsonPointer,
    },
    /// §4.3: replace the value at `path`, which must exist.
    Replace {
        /// Target location.
        path: JsonPointer,
        /// The replacement value.
        value: Value,
    },
    /// §4.4: remove the value at `from` and add it at `path`.
    Move {
        /// Source location; must exist and must not be a proper prefix of `path`.
        from: JsonPointer,
        /// Target location (as for `add`).
        path: JsonPointer,
    },
    /// §4.5: add a deep copy of the value at `from` at `path`.
    Copy {
        /// Source location; must exist.
        from: JsonPointer,
        /// Target location (as for `add`).
        path: JsonPointer,
    },
    /// §4.6: check that the value at `path` equals `value` (JSON equality).
    Test {
        /// Location to check.
        path: JsonPointer,
        /// The expected value.
        value: Value,
    },
}

impl Operation {
    /// The operation's name as it appears in the `op` member.
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Add { .. } => "add",
            Operation::Remove { .. } => "remove",
            Operation::Replace { .. } => "replace",
            Operation::Move { .. } => "move",
            Operation::Copy { .. } => "copy",
            Operation::Test { .. } => "test",
        }
    }

    /// The `path` member.
    pub fn path(&self) -> &JsonPointer {
        match self {
            Operation::Add { path, .. }
            | Operation::Remove { path }
            | Operation::Replace { path, .. }
            | Operation::Move { path, .. }
            | Operation::Copy { path, .. }
            | Operation::Test { path, .. } => path,
        }
    }

    /// Parses one operation object; `index` is its position in the patch, used in errors.
    pub fn from_value(index: usize, v: &Value) -> Result<Self, PatchError> {
        Self::from_owned(index, v.clone())
    }

    /// Like [`Operation::from_value`], taking the object apart instead of copying its
    /// `value` member (which may be a whole definition).
    pub fn from_owned(index: usize, v: Value) -> Result<Self, PatchError> {
        let invalid = |message: String| PatchError::InvalidOperation { index, message };
        let mut obj = match v {
            Value::Object(obj) => obj,
            other => {
                return Err(invalid(format!(
                    "an operation must be a JSON object, got {}",
                    json_kind(&other)
                )))
            }
        };
        let op = match obj.get("op") {
            None => return Err(invalid("missing member \"op\"".into())),
            Some(Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(invalid(format!(
                    "member \"op\" must be a string, got {}",
                    json_kind(other)
                )))
            }
        };
        let name: &'static str = match op {
            "add" => "add",
            "remove" => "remove",
            "replace" => "replace",
            "move" => "move",
            "copy" => "copy",
            "test" => "test",
            other => {
                return Err(invalid(format!(
                    "unknown op {other:?} (expected add, remove, replace, move, copy or test)"
                )))
            }
        };
        let pointer = |member: &str| -> Result<JsonPointer, PatchError> {
            match obj.get(member) {
                None => Err(invalid(format!("missing member {member:?}"))),
                Some(Value::String(s)) => {
                    JsonPointer::parse(s).map_err(|source| PatchError::Pointer {
                        index,
                        op: name,
                        source,
                    })
                }
                Some(other) => Err(invalid(format!(
                    "member {member:?} must be a string (a JSON pointer), got {}",
                    json_kind(other)
                ))),
            }
        };
        let path = pointer("path")?;
        let from = match name {
            "move" | "copy" => Some(pointer("from")?),
            _ => None,
        };
        let mut value = || -> Result<Value, PatchError> {
            obj.remove("value")
                .ok_or_else(|| invalid("missing member \"value\"".into()))
        };
        Ok(match (name, from) {
            ("add", _) => Operation::Add {
                path,
                value: value()?,
            },
            ("remove", _) => Operation::Remove { path },
            ("replace", _) => Operation::Replace {
                path,
                value: value()?,
            },
            ("move", Some(from)) => Operation::Move { from, path },
            ("copy", Some(from)) => Operation::Copy { from, path },
            // `name` is one of the six and `from` is set for move and copy: this is "test".
            _ => Operation::Test {
                path,
                value: value()?,
            },
        })
    }

    /// The operation as a JSON object (`{"op": ..., "path": ..., ...}`).
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("op".into(), Value::String(self.name().into()));
        m.insert("path".into(), Value::String(self.path().as_str().into()));
        match self {
            Operation::Add { value, .. }
            | Operation::Replace { value, .. }
            | Operation::Test { value, .. } => {
                m.insert("value".into(), value.clone());
            }
            Operation::Move { from, .. } | Operation::Copy { from, .. } => {
                m.insert("from".into(), Value::String(from.as_str().into()));
            }
            Operation::Remove { .. } => {}
        }
        Value::Object(m)
    }
}

/// Why a patch could not be parsed or applied. Every variant about an operation carries its
/// zero-based index in the patch.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PatchError {
    /// The patch document is not a JSON array.
    #[error("invalid JSON patch: must be an array of operations, got {found}")]
    NotAnArray {
        /// The JSON type found instead.
        found: &'static str,
    },
    /// The patch text is not JSON, or has duplicate member names ([`Patch::from_json_str`]).
    #[error("invalid JSON patch text: {message}")]
    InvalidJson {
        /// The parser's message, with line and column.
        message: String,
    },
    /// An operation object is malformed (missing or mistyped member, unknown op), or the
    /// operation cannot apply for a reason that is not about a path (removing `""`).
    #[error("operation {index}: {message}")]
    InvalidOperation {
        /// Index of the operation in the patch.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// A pointer is malformed, or does not resolve in the document at that point.
    #[error("operation {index} ({op}): {source}")]
    Pointer {
        /// Index of the operation in the patch.
        index: usize,
        /// The operation's name.
        op: &'static str,
        /// The pointer error; its [`PointerError::code`] is this error's code.
        #[source]
        source: PointerError,
    },
    /// A `test` operation found a different value.
    #[error("operation {index} (test): the value at {path:?} is not equal to the expected value")]
    TestFailed {
        /// Index of the operation in the patch.
        index: usize,
        /// The tested location.
        path: String,
    },
    /// A `move` whose `from` is a proper prefix of its `path`.
    #[error("operation {index} (move): cannot move {from:?} into its own child {path:?}")]
    MoveIntoChild {
        /// Index of the operation in the patch.
        index: usize,
        /// The `from` location.
        from: String,
        /// The `path` location.
        path: String,
    },
    /// Applying the patch would exceed its [`Budget`]; nothing was changed.
    #[error("{}over the patch budget: {message}", index.map(|i| format!("operation {i}: ")).unwrap_or_default())]
    OverBudget {
        /// Index of the operation that would exceed it; `None` for the operation count.
        index: Option<usize>,
        /// Which limit.
        limit: BudgetLimit,
        /// What it would have cost, and the limit.
        message: String,
    },
}

impl PatchError {
    /// A stable machine-readable code: `"invalid_operation"`, `"path_not_found"`,
    /// `"test_failed"`, `"invalid_pointer"`, `"invalid_index"`, `"move_into_child"`, or for
    /// a budget [`BudgetLimit::code`] (`"budget_ops"`, `"budget_bytes"`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            PatchError::OverBudget { limit, .. } => limit.code(),
            PatchError::NotAnArray { .. }
            | PatchError::InvalidJson { .. }
            | PatchError::InvalidOperation { .. } => "invalid_operation",
            PatchError::Pointer { source, .. } => source.code(),
            PatchError::TestFailed { .. } => "test_failed",
            PatchError::MoveIntoChild { .. } => "move_into_child",
        }
    }

    /// The index of the failing operation, if the error is about one operation.
    pub fn index(&self) -> Option<usize> {
        match self {
            PatchError::NotAnArray { .. } | PatchError::InvalidJson { .. } => None,
            PatchError::InvalidOperation { index, .. }
            | PatchError::Pointer { index, .. }
            | PatchError::TestFailed { index, .. }
            | PatchError::MoveIntoChild { index, .. } => Some(*index),
            PatchError::OverBudget { index, .. } => *index,
        }
    }

    /// Whether this is a budget rejection (the patch may be fine, only too costly).
    pub fn is_over_budget(&self) -> bool {
        matches!(self, PatchError::OverBudget { .. })
    }
}

/// Which [`Budget`] limit a patch would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BudgetLimit {
    /// [`Budget::max_operations`].
    Operations,
    /// [`Budget::max_bytes`].
    Bytes,
    /// [`Budget::max_depth`].
    Depth,
    /// [`Budget::max_pointer_bytes`], or a pointer with more tokens than
    /// [`Budget::max_depth`].
    Pointer,
    /// [`Budget::max_array_shifts`].
    Work,
}

impl BudgetLimit {
    /// The rejection code: `budget_ops`, `budget_bytes`, `budget_depth`, `budget_pointer`
    /// or `budget_work`.
    pub fn code(self) -> &'static str {
        match self {
            BudgetLimit::Operations => "budget_ops",
            BudgetLimit::Bytes => "budget_bytes",
            BudgetLimit::Depth => "budget_depth",
            BudgetLimit::Pointer => "budget_pointer",
            BudgetLimit::Work => "budget_work",
        }
    }
}

/// The work one patch may cause, checked *while* it is applied, before each operation
/// allocates anything: a patch of a few bytes can otherwise ask for an exponential amount of
/// memory (`copy` from `""` doubles the document) or a document nested past the stack.
///
/// What each limit bounds, and why that is enough:
///
/// - **Time**: at most [`max_operations`](Self::max_operations) operations, each resolving
///   at most two pointers of at most [`max_depth`](Self::max_depth) tokens and
///   [`max_pointer_bytes`](Self::max_pointer_bytes) bytes; every value copied, inserted,
///   compared or measured counts against [`max_bytes`](Self::max_bytes); array elements
///   moved by inserting or removing in the middle of an array count against
///   [`max_array_shifts`](Self::max_array_shifts). Reverting costs what applying did.
/// - **Memory**: the document grows by at most `max_bytes` (compact JSON) during one patch.
///   The undo log has at most one entry per operation, and holds only values moved *out*
///   of the document (never copies), so it adds no more than that.
/// - **Stack**: every value the patch places ends at most `max_depth` levels below the
///   root, so cloning, comparing, serializing, validating and dropping the result (all
///   recursive in serde_json) stay within `max_depth` frames. Measuring is iterative
///   ([`crate::definition::measure`]).
///
/// Checked statically (before anything is applied, see [`check_static`]): the operation
/// count, the pointers, and the size and depth of every `value`; at run time: what `copy`
/// duplicates, what `move` nests deeper, and array shifts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Most operations in one patch.
    pub max_operations: usize,
    /// Most bytes (compact JSON) a patch may produce or compare: every `add`, `replace` and
    /// `test` value, every value a `copy` duplicates, and every value a `move` nests deeper
    /// (measured to check its depth). At least the largest definition, so that creating a
    /// workflow with one `add` of the whole document fits.
    pub max_bytes: usize,
    /// Deepest nesting, counted from the document root, of any value a patch places (and of
    /// `test` values); also the most reference tokens in a pointer.
    pub max_depth: usize,
    /// Longest pointer (`path` or `from`), in bytes of its JSON-string form.
    pub max_pointer_bytes: usize,
    /// Most array elements shifted (moved in memory by one slot) by inserting into or
    /// removing from the middle of an array; appending with `-` shifts none.
    pub max_array_shifts: usize,
}

impl Budget {
    /// Default [`Budget::max_operations`].
    pub const DEFAULT_MAX_OPERATIONS: usize = 10_000;
    /// Default [`Budget::max_bytes`] (4 MiB, the default largest definition).
    pub const DEFAULT_MAX_BYTES: usize = 4 * 1024 * 1024;
    /// Default [`Budget::max_depth`].
    pub const DEFAULT_MAX_DEPTH: usize = 64;
    /// Default [`Budget::max_pointer_bytes`].
    pub const DEFAULT_MAX_POINTER_BYTES: usize = 4096;
    /// Default [`Budget::max_array_shifts`].
    pub const DEFAULT_MAX_ARRAY_SHIFTS: usize = 4 * 1024 * 1024;
    /// Largest [`Budget::max_depth`] that makes sense: serde_json refuses to parse JSON
    /// nested deeper than 128, and a definition is parsed again wherever it is read (from
    /// Postgres, the CAS, an event, inside the `add` operation that re-creates it), so
    /// nothing deeper than this may ever be stored.
    pub const MAX_DEPTH_CEILING: usize = 100;
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            max_operations: Self::DEFAULT_MAX_OPERATIONS,
            max_bytes: Self::DEFAULT_MAX_BYTES,
            max_depth: Self::DEFAULT_MAX_DEPTH,
            max_pointer_bytes: Self::DEFAULT_MAX_POINTER_BYTES,
            max_array_shifts: Self::DEFAULT_MAX_ARRAY_SHIFTS,
        }
    }
}

/// Checks everything about `patch` that [`Budget`] limits and that is known without the
/// document: the operation count, every pointer's length and token count, and the size and
/// depth of every `value` (an `add`/`replace` value's depth counted from the root, so
/// `{"path": "/a/b", "value": [[1]]}` is 4 deep). The gateway runs it to answer 422 before
/// anything is produced; [`Patch::apply_with`] runs it first too, so the two always agree.
pub fn check_static(patch: &Patch, budget: &Budget) -> Result<(), PatchError> {
    patch.static_bytes(budget).map(drop)
}

/// A parsed JSON Patch document: operations applied in order, atomically.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Patch(Vec<Operation>);

impl Patch {
    /// A patch of the given operations.
    pub fn new(ops: Vec<Operation>) -> Self {
        Self(ops)
    }

    /// Parses a patch from a JSON value: an array of operation objects. The first malformed
    /// operation is reported with its index.
    pub fn from_value(v: &Value) -> Result<Self, PatchError> {
        Self::from_owned(v.clone())
    }

    /// Like [`Patch::from_value`], moving the operations' values out of `v` instead of
    /// copying them.
    pub fn from_owned(v: Value) -> Result<Self, PatchError> {
        let items = match v {
            Value::Array(items) => items,
            other => {
                return Err(PatchError::NotAnArray {
                    found: json_kind(&other),
                })
            }
        };
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| Operation::from_owned(i, item))
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// Parses a patch from JSON text, rejecting duplicate member names anywhere (RFC 6902
    /// Appendix A.13), then as [`Patch::from_value`].
    pub fn from_json_str(text: &str) -> Result<Self, PatchError> {
        let v = parse_json_strict(text).map_err(|e| PatchError::InvalidJson {
            message: e.to_string(),
        })?;
        Self::from_owned(v)
    }

    /// The operations, in order.
    pub fn operations(&self) -> &[Operation] {
        &self.0
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the patch has no operations (applying it is a no-op).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The patch as a JSON array of operation objects.
    pub fn to_value(&self) -> Value {
        Value::Array(self.0.iter().map(Operation::to_value).collect())
    }

    /// Applies every operation in order, or none, within the default [`Budget`]: on error
    /// `doc` is left exactly as it was and the error names the failing operation's index.
    ///
    /// Rollback replays the undo log backwards against the state each entry was recorded
    /// on, so it cannot fail; if it ever did (a bug), debug builds panic and release builds
    /// still return the original error.
    pub fn apply(&self, doc: &mut Value) -> Result<(), PatchError> {
        self.apply_with(doc, &Budget::default())
    }

    /// [`Patch::apply`] within `budget`: a patch that would exceed it is rejected with
    /// [`PatchError::OverBudget`] before the operation that would exceed it allocates
    /// anything, and `doc` is left as it was.
    pub fn apply_with(&self, doc: &mut Value, budget: &Budget) -> Result<(), PatchError> {
        self.apply_reversible_with(doc, budget).map(drop)
    }

    /// Like [`Patch::apply`], but on success returns the [`UndoLog`] that reverts `doc` to
    /// its previous value. Holding the log costs only the values the patch removed or
    /// replaced. Drop it to keep the change.
    pub fn apply_reversible<'p>(&'p self, doc: &mut Value) -> Result<UndoLog<'p>, PatchError> {
        self.apply_reversible_with(doc, &Budget::default())
    }

    /// [`Patch::apply_reversible`] within `budget` (see [`Patch::apply_with`]).
    pub fn apply_reversible_with<'p>(
        &'p self,
        doc: &mut Value,
        budget: &Budget,
    ) -> Result<UndoLog<'p>, PatchError> {
        let mut meter = Meter {
            budget,
            bytes: self.static_bytes(budget)?,
            shifts: 0,
        };
        let mut log = UndoLog {
            entries: Vec::with_capacity(self.0.len()),
        };
        for (index, op) in self.0.iter().enumerate() {
            if let Err(e) = apply_op(index, op, doc, &mut log, &mut meter) {
                let reverted = log.revert(doc);
                debug_assert!(reverted.is_ok(), "undo log replay failed: {reverted:?}");
                return Err(e);
            }
        }
        Ok(log)
    }

    /// Checks the static part of `budget` (see [`check_static`]) and returns the bytes the
    /// operations' values count for.
    fn static_bytes(&self, budget: &Budget) -> Result<usize, PatchError> {
        if self.0.len() > budget.max_operations {
            return Err(PatchError::OverBudget {
                index: None,
                limit: BudgetLimit::Operations,
                message: format!(
                    "the patch has {} operations, more than the limit of {}",
                    self.0.len(),
                    budget.max_operations
                ),
            });
        }
        let mut bytes = 0usize;
        for (index, op) in self.0.iter().enumerate() {
            let over = |limit, message| PatchError::OverBudget {
                index: Some(index),
                limit,
                message,
            };
            let from = match op {
                Operation::Move { from, .. } | Operation::Copy { from, .. } => Some(from),
                _ => None,
            };
            for (member, ptr) in [("path", Some(op.path())), ("from", from)] {
                let Some(ptr) = ptr else { continue };
                if ptr.as_str().len() > budget.max_pointer_bytes {
                    return Err(over(
                        BudgetLimit::Pointer,
                        format!(
                            "{member} is {} bytes long, more than the limit of {}",
                            ptr.as_str().len(),
                            budget.max_pointer_bytes
                        ),
                    ));
                }
                if ptr.tokens().len() > budget.max_depth {
                    return Err(over(
                        BudgetLimit::Pointer,
                        format!(
                            "{member} has {} reference tokens, more than the depth limit of {}",
                            ptr.tokens().len(),
                            budget.max_depth
                        ),
                    ));
                }
            }
            let (value, above) = match op {
                Operation::Add { path, value } | Operation::Replace { path, value } => {
                    (value, path.tokens().len())
                }
                // A test value is compared, recursively, not placed: its own depth counts.
                Operation::Test { value, .. } => (value, 0),
                _ => continue,
            };
            let left = budget.max_bytes - bytes.min(budget.max_bytes);
            let m = measure(value, left, budget.max_depth - above);
            if m.bytes > left {
                return Err(over(
                    BudgetLimit::Bytes,
                    format!(
                        "the operations' values come to more than the limit of {} bytes",
                        budget.max_bytes
                    ),
                ));
            }
            if above + m.depth > budget.max_depth {
                return Err(over(BudgetLimit::Depth, depth_message(budget, "the value")));
            }
            bytes += m.bytes;
        }
        Ok(bytes)
    }
}

fn depth_message(budget: &Budget, what: &str) -> String {
    format!(
        "{what} would be nested more than {} levels deep in the document",
        budget.max_depth
    )
}

/// What one application of a patch has used of its [`Budget`] so far.
struct Meter<'b> {
    budget: &'b Budget,
    /// Bytes produced, compared or measured.
    bytes: usize,
    /// Array elements shifted.
    shifts: usize,
}

impl Meter<'_> {
    /// Bytes left.
    fn bytes_left(&self) -> usize {
        self.budget.max_bytes.saturating_sub(self.bytes)
    }

    /// Counts `n` bytes, or fails if that passes the limit.
    fn bytes(&mut self, index: usize, n: usize, what: &str) -> Result<(), PatchError> {
        if n > self.bytes_left() {
            return Err(PatchError::OverBudget {
                index: Some(index),
                limit: BudgetLimit::Bytes,
                message: format!(
                    "{what} would bring the bytes produced to more than the limit of {}",
                    self.budget.max_bytes
                ),
            });
        }
        self.bytes += n;
        Ok(())
    }

    /// Counts `n` array shifts, or fails if that passes the limit.
    fn shifts(&mut self, index: usize, n: usize) -> Result<(), PatchError> {
        if n > self.budget.max_array_shifts.saturating_sub(self.shifts) {
            return Err(PatchError::OverBudget {
                index: Some(index),
                limit: BudgetLimit::Work,
                message: format!(
                    "inserting or removing array elements would shift more than {} elements",
                    self.budget.max_array_shifts
                ),
            });
        }
        self.shifts += n;
        Ok(())
    }

    /// Measures `v`, which is about to be placed `above` levels below the root (or nested
    /// that much deeper): counts its bytes, and fails if they pass the limit or if it would
    /// end up too deep. Stops walking at the limits, so it costs no more than they allow.
    fn measure(
        &mut self,
        index: usize,
        v: &Value,
        above: usize,
        what: &str,
    ) -> Result<(), PatchError> {
        let depth_left = self.budget.max_depth.saturating_sub(above);
        let m = measure(v, self.bytes_left(), depth_left);
        self.bytes(index, m.bytes, what)?;
        if above + m.depth > self.budget.max_depth {
            return Err(PatchError::OverBudget {
                index: Some(index),
                limit: BudgetLimit::Depth,
                message: depth_message(self.budget, what),
            });
        }
        Ok(())
    }
}

/// Applies the JSON Patch `ops` to a copy of `doc` and returns the result.
pub fn apply_patch(doc: &Value, ops: &Value) -> Result<Value, PatchError> {
    let patch = Patch::from_value(ops)?;
    let mut out = doc.clone();
    patch.apply(&mut out)?;
    Ok(out)
}

/// RFC 6902 §4.6 JSON equality: same type; numbers equal by numeric value (`1 == 1.0`,
/// compared exactly, without rounding large integers through `f64`); strings equal by code
/// points; arrays equal element-wise in order; objects with the same member names whose
/// values are equal, in any order; `null`, `true`, `false` equal to themselves.
pub fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Number(x), Value::Number(y)) => numbers_equal(x, y),
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_equal(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => false,
    }
}

fn numbers_equal(x: &Number, y: &Number) -> bool {
    fn int(n: &Number) -> Option<i128> {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
    }
    match (int(x), int(y)) {
        (Some(a), Some(b)) => a == b,
        (Some(i), None) => y.as_f64().is_some_and(|f| float_equals_int(f, i)),
        (None, Some(i)) => x.as_f64().is_some_and(|f| float_equals_int(f, i)),
        (None, None) => x.as_f64() == y.as_f64(),
    }
}

/// Exact comparison of a float with an integer in `i64::MIN..=u64::MAX`.
fn float_equals_int(f: f64, i: i128) -> bool {
    // 2^64 and -2^63 bound every i64/u64; floats outside cannot be equal, and floats inside
    // with no fractional part convert to i128 exactly.
    const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;
    f.fract() == 0.0 && f > -TWO_POW_64 && f < TWO_POW_64 && f as i128 == i
}

/// Parses JSON text into a [`Value`] like `serde_json::from_str`, but fails on duplicate
/// member names in any object (which `serde_json` silently resolves to the last one).
pub fn parse_json_strict(text: &str) -> Result<Value, serde_json::Error> {
    serde_json::from_str::<StrictValue>(text).map(|s| s.0)
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = StrictValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Number(v.into())))
    }
    fn visit_u64<E>(self, v: u64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Number(v.into())))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<StrictValue, E> {
        Number::from_f64(v)
            .map(|n| StrictValue(Value::Number(n)))
            .ok_or_else(|| E::custom("non-finite number"))
    }
    fn visit_str<E>(self, v: &str) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v)))
    }
    fn visit_unit<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }
    fn visit_none<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<StrictValue, D::Error> {
        StrictValue::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrictValue, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(StrictValue(Value::Array(out)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictValue, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate member name {key:?}"
                )));
            }
            let StrictValue(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(StrictValue(Value::Object(out)))
    }
}

/// Where a value sits, resolved once against a concrete document state: the whole
/// document, an object member (the pointer's last token), or an array element at an index
/// already checked against the array's length (`-` resolved).
#[derive(Debug, Clone, Copy)]
enum Slot<'p> {
    Root,
    Member(&'p JsonPointer),
    Element(&'p JsonPointer, usize),
}

impl<'p> Slot<'p> {
    fn parent_mut<'d>(ptr: &JsonPointer, doc: &'d mut Value) -> Option<&'d mut Value> {
        ptr.get_prefix_mut(doc, ptr.tokens().len().saturating_sub(1))
            .ok()
    }

    /// Removes and returns the value in this (existing) slot. The root becomes `null`.
    fn take(self, doc: &mut Value) -> Option<Value> {
        match self {
            Slot::Root => Some(std::mem::take(doc)),
            Slot::Member(ptr) => match Self::parent_mut(ptr, doc)? {
                Value::Object(m) => m.remove(ptr.split_last()?.1),
                _ => None,
            },
            Slot::Element(ptr, i) => match Self::parent_mut(ptr, doc)? {
                Value::Array(a) if i < a.len() => Some(a.remove(i)),
                _ => None,
            },
        }
    }

    /// Inserts `value` into this slot (array insert, member set, or root replace) and
    /// returns the value it displaced, if any. If the slot does not resolve (never the case
    /// for a slot resolved against the current state), `value` is handed back untouched.
    fn put(self, doc: &mut Value, value: Value) -> Result<Option<Value>, Value> {
        let ptr = match self {
            Slot::Root => return Ok(Some(std::mem::replace(doc, value))),
            Slot::Member(ptr) | Slot::Element(ptr, _) => ptr,
        };
        let (Some(parent), Some((_, last))) = (Self::parent_mut(ptr, doc), ptr.split_last()) else {
            return Err(value);
        };
        match (self, parent) {
            (Slot::Member(_), Value::Object(m)) => Ok(m.insert(last.to_owned(), value)),
            (Slot::Element(_, i), Value::Array(a)) if i <= a.len() => {
                a.insert(i, value);
                Ok(None)
            }
            _ => Err(value),
        }
    }
}

/// How to reverse one primitive mutation.
#[derive(Debug)]
enum Undo<'p> {
    /// The location exists; put the old value back (undoes `replace`, `add` over an
    /// existing member, `add` at `""`).
    Overwrite(&'p JsonPointer, Value),
    /// Take out what was inserted (undoes `add`/`copy` of a new member or element).
    Uninsert(Slot<'p>),
    /// Put back what was removed (undoes `remove`).
    Reinsert(Slot<'p>, Value),
    /// Undoes `move`: take the value out of `to` (putting back what it displaced there, if
    /// anything) and reinsert it at `from`.
    Unmove {
        from: Slot<'p>,
        to: Slot<'p>,
        displaced: Option<Value>,
    },
}

impl Undo<'_> {
    fn undo(self, doc: &mut Value) -> Option<()> {
        match self {
            Undo::Overwrite(ptr, old) => {
                *ptr.get_mut(doc).ok()? = old;
            }
            Undo::Uninsert(slot) => {
                slot.take(doc)?;
            }
            Undo::Reinsert(slot, value) => {
                slot.put(doc, value).ok()?;
            }
            Undo::Unmove {
                from,
                to,
                displaced,
            } => {
                let value = match displaced {
                    Some(d) => to.put(doc, d).ok()??,
                    None => to.take(doc)?,
                };
                from.put(doc, value).ok()?;
            }
        }
        Some(())
    }
}

/// The record of a successfully applied patch, able to revert it (see
/// [`Patch::apply_reversible`]). Borrows the patch's pointers; owns only the values the
/// patch removed or replaced.
#[derive(Debug)]
pub struct UndoLog<'p> {
    entries: Vec<Undo<'p>>,
}

/// [`UndoLog::revert`] was given a document that is not in the state the patch left it in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot revert the patch: the document was modified after the patch was applied")]
pub struct RevertError;

impl UndoLog<'_> {
    /// Number of entries: at most one per operation of the patch.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the patch changed nothing that needs undoing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Reverts the patch. `doc` must be the document the patch was applied to, unmodified
    /// since; then this always succeeds and restores the exact previous value. Given any
    /// other document it may fail part-way, leaving that document partly reverted.
    pub fn revert(mut self, doc: &mut Value) -> Result<(), RevertError> {
        while let Some(entry) = self.entries.pop() {
            entry.undo(doc).ok_or(RevertError)?;
        }
        Ok(())
    }
}

/// Resolves the slot for an insertion at `path` (the parent must exist and be a
/// container; an array position must be `-` or `0..=len`), with the number of array
/// elements the insertion shifts.
fn insert_slot<'p>(path: &'p JsonPointer, doc: &Value) -> Result<(Slot<'p>, usize), PointerError> {
    let Some((_, last)) = path.split_last() else {
        return Ok((Slot::Root, 0));
    };
    match path.get_prefix(doc, path.tokens().len() - 1)? {
        Value::Object(_) => Ok((Slot::Member(path), 0)),
        Value::Array(a) => {
            let i = path.insert_index(last, a.len())?;
            Ok((Slot::Element(path, i), a.len() - i))
        }
        other => Err(path.not_a_container(last, other)),
    }
}

/// Resolves the slot of an existing value at `path`, with the number of array elements
/// removing it shifts.
fn existing_slot<'p>(
    path: &'p JsonPointer,
    doc: &Value,
) -> Result<(Slot<'p>, usize), PointerError> {
    let Some((_, last)) = path.split_last() else {
        return Ok((Slot::Root, 0));
    };
    match path.get_prefix(doc, path.tokens().len() - 1)? {
        Value::Object(m) if m.contains_key(last) => Ok((Slot::Member(path), 0)),
        Value::Object(_) => Err(path.not_found(last)),
        Value::Array(a) => {
            let i = path.existing_index(last, a.len())?;
            Ok((Slot::Element(path, i), a.len() - 1 - i))
        }
        other => Err(path.not_a_container(last, other)),
    }
}

fn apply_op<'p>(
    index: usize,
    op: &'p Operation,
    doc: &mut Value,
    log: &mut UndoLog<'p>,
    meter: &mut Meter<'_>,
) -> Result<(), PatchError> {
    let ptr_err = |source: PointerError| PatchError::Pointer {
        index,
        op: op.name(),
        source,
    };
    // Resolution (which may fail) always happens before mutation, and each mutation below is
    // a single step on a slot just resolved against the same state, so a failing operation
    // changes nothing itself. The `internal` error is unreachable for that reason; it exists
    // so that a bug surfaces as an error (and a rollback) instead of a panic.
    //
    // The budget is charged between resolving and mutating: values' sizes and depths were
    // checked before the first operation (`Patch::static_bytes`); what depends on the
    // document (what `copy` duplicates, what `move` nests deeper, array shifts) is measured
    // here, before anything is allocated or moved.
    let internal = || PatchError::InvalidOperation {
        index,
        message: "internal error: a resolved location did not resolve".into(),
    };
    match op {
        Operation::Add { path, value } => {
            let (slot, shifts) = insert_slot(path, doc).map_err(ptr_err)?;
            meter.shifts(index, shifts)?;
            let displaced = slot.put(doc, value.clone()).map_err(|_| internal())?;
            log.entries.push(match displaced {
                Some(old) => Undo::Overwrite(path, old),
                None => Undo::Uninsert(slot),
            });
        }
        Operation::Remove { path } => {
            if path.is_root() {
                return Err(PatchError::InvalidOperation {
                    index,
                    message: "cannot remove the whole document (path \"\")".into(),
                });
            }
            let (slot, shifts) = existing_slot(path, doc).map_err(ptr_err)?;
            meter.shifts(index, shifts)?;
            let value = slot.take(doc).ok_or_else(internal)?;
            log.entries.push(Undo::Reinsert(slot, value));
        }
        Operation::Replace { path, value } => {
            let target = path.get_mut(doc).map_err(ptr_err)?;
            let old = std::mem::replace(target, value.clone());
            log.entries.push(Undo::Overwrite(path, old));
        }
        Operation::Move { from, path } => {
            if from.is_proper_prefix_of(path) {
                return Err(PatchError::MoveIntoChild {
                    index,
                    from: from.as_str().into(),
                    path: path.as_str().into(),
                });
            }
            let (from_slot, from_shifts) = existing_slot(from, doc).map_err(ptr_err)?;
            if from == path {
                return Ok(());
            }
            // A value moved up or sideways stays as deep as it was; one moved deeper is
            // measured (its bytes count), stopping at the depth left.
            let (up, down) = (from.tokens().len(), path.tokens().len());
            if down > up {
                let moved = from.get(doc).map_err(ptr_err)?;
                meter.measure(index, moved, down, "the moved value")?;
            }
            meter.shifts(index, from_shifts)?;
            let value = from_slot.take(doc).ok_or_else(internal)?;
            // The target is resolved against the document *after* the removal (RFC 6902
            // §4.4: remove, then add), so e.g. "/foo/3" may be the new end of the array.
            let (err, value) = match insert_slot(path, doc) {
                Ok((to_slot, to_shifts)) => match meter.shifts(index, to_shifts) {
                    Err(e) => (e, value),
                    Ok(()) => match to_slot.put(doc, value) {
                        Ok(displaced) => {
                            log.entries.push(Undo::Unmove {
                                from: from_slot,
                                to: to_slot,
                                displaced,
                            });
                            return Ok(());
                        }
                        Err(value) => (internal(), value),
                    },
                },
                Err(e) => (ptr_err(e), value),
            };
            // Put the value back before reporting: the operation must leave no trace.
            let restored = from_slot.put(doc, value);
            debug_assert!(restored.is_ok(), "move rollback failed");
            return Err(err);
        }
        Operation::Copy { from, path } => {
            let source = from.get(doc).map_err(ptr_err)?;
            let (slot, shifts) = insert_slot(path, doc).map_err(ptr_err)?;
            // Measured before it is cloned: this is what stops `copy` from `""` doubling
            // the document until memory runs out, and nesting it past the stack.
            meter.measure(index, source, path.tokens().len(), "the copied value")?;
            meter.shifts(index, shifts)?;
            let value = source.clone();
            let displaced = slot.put(doc, value).map_err(|_| internal())?;
            log.entries.push(match displaced {
                Some(old) => Undo::Overwrite(path, old),
                None => Undo::Uninsert(slot),
            });
        }
        Operation::Test { path, value } => {
            let actual = path.get(doc).map_err(ptr_err)?;
            if !json_equal(actual, value) {
                return Err(PatchError::TestFailed {
                    index,
                    path: path.as_str().into(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Applies `patch` to `doc`; on error asserts `doc` is unchanged.
    fn run(doc: Value, patch: Value) -> Result<Value, PatchError> {
        let parsed = Patch::from_value(&patch)?;
        let mut out = doc.clone();
        match parsed.apply(&mut out) {
            Ok(()) => Ok(out),
            Err(e) => {
                assert_eq!(out, doc, "document changed by a failed patch ({e})");
                Err(e)
            }
        }
    }

    fn code(r: Result<Value, PatchError>) -> (&'static str, Option<usize>) {
        let e = r.expect_err("expected an error");
        (e.code(), e.index())
    }

    #[test]
    fn rfc6902_appendix_a_successes() {
        // A.1 Adding an Object Member
        assert_eq!(
            run(
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/baz", "value": "qux"}])
            )
            .unwrap(),
            json!({"baz": "qux", "foo": "bar"})
        );
        // A.2 Adding an Array Element
        assert_eq!(
            run(
                json!({"foo": ["bar", "baz"]}),
                json!([{"op": "add", "path": "/foo/1", "value": "qux"}])
            )
            .unwrap(),
            json!({"foo": ["bar", "qux", "baz"]})
        );
        // A.3 Removing an Object Member
        assert_eq!(
            run(
                json!({"baz": "qux", "foo": "bar"}),
                json!([{"op": "remove", "path": "/baz"}])
            )
            .unwrap(),
            json!({"foo": "bar"})
        );
        // A.4 Removing an Array Element
        assert_eq!(
            run(
                json!({"foo": ["bar", "qux", "baz"]}),
                json!([{"op": "remove", "path": "/foo/1"}])
            )
            .unwrap(),
            json!({"foo": ["bar", "baz"]})
        );
        // A.5 Replacing a Value
        assert_eq!(
            run(
                json!({"baz": "qux", "foo": "bar"}),
                json!([{"op": "replace", "path": "/baz", "value": "boo"}])
            )
            .unwrap(),
            json!({"baz": "boo", "foo": "bar"})
        );
        // A.6 Moving a Value
        assert_eq!(
            run(
                json!({"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}}),
                json!([{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}])
            )
            .unwrap(),
            json!({"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}})
        );
        // A.7 Moving an Array Element
        assert_eq!(
            run(
                json!({"foo": ["all", "grass", "cows", "eat"]}),
                json!([{"op": "move", "from": "/foo/1", "path": "/foo/3"}])
            )
            .unwrap(),
            json!({"foo": ["all", "cows", "eat", "grass"]})
        );
        // A.8 Testing a Value: Success
        let doc = json!({"baz": "qux", "foo": ["a", 2, "c"]});
        assert_eq!(
            run(
                doc.clone(),
                json!([{"op": "test", "path": "/baz", "value": "qux"},
                       {"op": "test", "path": "/foo/1", "value": 2}])
            )
            .unwrap(),
            doc
        );
        // A.10 Adding a Nested Member Object
        assert_eq!(
            run(
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/child", "value": {"grandchild": {}}}])
            )
            .unwrap(),
            json!({"foo": "bar", "child": {"grandchild": {}}})
        );
        // A.11 Ignoring Unrecognized Elements
        assert_eq!(
            run(
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/baz", "value": "qux", "xyz": 123}])
            )
            .unwrap(),
            json!({"foo": "bar", "baz": "qux"})
        );
        // A.14 ~ Escape Ordering
        let doc = json!({"/": 9, "~1": 10});
        assert_eq!(
            run(
                doc.clone(),
                json!([{"op": "test", "path": "/~01", "value": 10}])
            )
            .unwrap(),
            doc
        );
        // A.16 Adding an Array Value
        assert_eq!(
            run(
                json!({"foo": ["bar"]}),
                json!([{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}])
            )
            .unwrap(),
            json!({"foo": ["bar", ["abc", "def"]]})
        );
    }

    #[test]
    fn rfc6902_appendix_a_errors() {
        // A.9 Testing a Value: Error
        let e = run(
            json!({"baz": "qux"}),
            json!([{"op": "test", "path": "/baz", "value": "bar"}]),
        )
        .unwrap_err();
        assert_eq!(
            e,
            PatchError::TestFailed {
                index: 0,
                path: "/baz".into()
            }
        );
        assert_eq!(e.code(), "test_failed");
        // A.12 Adding to a Nonexistent Target
        let e = run(
            json!({"foo": "bar"}),
            json!([{"op": "add", "path": "/baz/bat", "value": "qux"}]),
        )
        .unwrap_err();
        assert_eq!((e.code(), e.index()), ("path_not_found", Some(0)));
        assert!(e.to_string().contains("\"baz\""), "{e}");
        // A.13 Invalid JSON Patch Document (duplicate "op"): only visible in the text.
        let text = r#"[{ "op": "add", "path": "/baz", "value": "qux", "op": "remove" }]"#;
        let e = Patch::from_json_str(text).unwrap_err();
        assert_eq!(e.code(), "invalid_operation");
        assert!(
            e.to_string().contains("duplicate member name \"op\""),
            "{e}"
        );
        assert!(Patch::from_json_str(r#"[{"op": "remove", "path": "/a"}]"#).is_ok());
        assert_eq!(
            Patch::from_json_str("[").unwrap_err().code(),
            "invalid_operation"
        );
        assert!(parse_json_strict(r#"{"a": {"b": 1, "b": 2}}"#).is_err());
        assert_eq!(
            parse_json_strict(r#"{"a": [1, 2.5, null, true, "x"]}"#).unwrap(),
            json!({"a": [1, 2.5, null, true, "x"]})
        );
        // A.15 Comparing Strings and Numbers
        let e = run(
            json!({"/": 9, "~1": 10}),
            json!([{"op": "test", "path": "/~01", "value": "10"}]),
        )
        .unwrap_err();
        assert_eq!(
            e,
            PatchError::TestFailed {
                index: 0,
                path: "/~01".into()
            }
        );
    }

    #[test]
    fn parse_errors_name_the_operation() {
        let p = |v: Value| Patch::from_value(&v).unwrap_err();
        assert_eq!(
            p(json!({"op": "add"})),
            PatchError::NotAnArray { found: "object" }
        );
        assert_eq!(p(json!({"op": "add"})).index(), None);
        assert_eq!(p(json!("x")).code(), "invalid_operation");
        let ok = json!({"op": "remove", "path": "/a"});
        let cases = [
            (json!({"path": "/a"}), "missing member \"op\""),
            (json!({"op": 1, "path": "/a"}), "\"op\" must be a string"),
            (
                json!({"op": "frobnicate", "path": "/a"}),
                "unknown op \"frobnicate\"",
            ),
            (
                json!({"op": "ADD", "path": "/a", "value": 1}),
                "unknown op \"ADD\"",
            ),
            (json!({"op": "add", "value": 1}), "missing member \"path\""),
            (
                json!({"op": "add", "path": 5, "value": 1}),
                "\"path\" must be a string",
            ),
            (
                json!({"op": "add", "path": null, "value": 1}),
                "\"path\" must be a string",
            ),
            (
                json!({"op": "add", "path": "/a"}),
                "missing member \"value\"",
            ),
            (
                json!({"op": "replace", "path": "/a"}),
                "missing member \"value\"",
            ),
            (
                json!({"op": "test", "path": "/a"}),
                "missing member \"value\"",
            ),
            (
                json!({"op": "move", "path": "/a"}),
                "missing member \"from\"",
            ),
            (
                json!({"op": "copy", "path": "/a", "from": ["/b"]}),
                "\"from\" must be a string",
            ),
            (json!(["op", "add"]), "must be a JSON object, got array"),
        ];
        for (bad, msg) in cases {
            let e = p(json!([ok, ok, bad]));
            assert_eq!(
                (e.code(), e.index()),
                ("invalid_operation", Some(2)),
                "{bad}"
            );
            assert!(e.to_string().starts_with("operation 2: "), "{e}");
            assert!(e.to_string().contains(msg), "{e} should contain {msg}");
        }
        // Pointer syntax is checked at parse time, in "path" and "from".
        for bad in [
            json!({"op": "add", "path": "a", "value": 1}),
            json!({"op": "remove", "path": "/a~2"}),
            json!({"op": "move", "from": "/~", "path": "/a"}),
        ] {
            let e = p(json!([ok, bad]));
            assert_eq!((e.code(), e.index()), ("invalid_pointer", Some(1)), "{e}");
        }
        // `null` is a present "value"; "value" on remove and "from" on add are ignored.
        let patch = Patch::from_value(&json!([
            {"op": "add", "path": "/a", "value": null, "from": 7},
            {"op": "remove", "path": "/a", "value": 1}
        ]))
        .unwrap();
        assert_eq!(patch.len(), 2);
        assert_eq!(
            patch.operations()[0],
            Operation::Add {
                path: JsonPointer::parse("/a").unwrap(),
                value: Value::Null
            }
        );
        assert_eq!(
            patch.to_value(),
            json!([{"op": "add", "path": "/a", "value": null}, {"op": "remove", "path": "/a"}])
        );
        assert!(Patch::from_value(&json!([])).unwrap().is_empty());
    }

    #[test]
    fn apply_semantics_and_errors() {
        let doc = json!({"a": {"b": [1, 2, 3]}, "s": "x"});
        let op = |v: Value| run(doc.clone(), json!([v]));

        // add: array insert (index == len allowed), "-" appends, object member set/overwrite,
        // "" replaces the document.
        assert_eq!(
            op(json!({"op": "add", "path": "/a/b/3", "value": 4})).unwrap()["a"]["b"],
            json!([1, 2, 3, 4])
        );
        assert_eq!(
            op(json!({"op": "add", "path": "/a/b/0", "value": 0})).unwrap()["a"]["b"],
            json!([0, 1, 2, 3])
        );
        assert_eq!(
            op(json!({"op": "add", "path": "/a/b/-", "value": 9})).unwrap()["a"]["b"],
            json!([1, 2, 3, 9])
        );
        assert_eq!(
            op(json!({"op": "add", "path": "/s", "value": 1})).unwrap()["s"],
            json!(1)
        );
        assert_eq!(
            op(json!({"op": "add", "path": "", "value": [1]})).unwrap(),
            json!([1])
        );
        assert_eq!(
            op(json!({"op": "add", "path": "/", "value": 1})).unwrap()[""],
            json!(1)
        );
        assert_eq!(
            code(op(json!({"op": "add", "path": "/a/b/4", "value": 4}))),
            ("invalid_index", Some(0))
        );
        assert_eq!(
            code(op(json!({"op": "add", "path": "/a/b/01", "value": 4}))),
            ("invalid_index", Some(0))
        );
        assert_eq!(
            code(op(json!({"op": "add", "path": "/s/x", "value": 4}))),
            ("path_not_found", Some(0))
        );
        assert_eq!(
            code(op(json!({"op": "add", "path": "/x/y", "value": 4}))),
            ("path_not_found", Some(0))
        );

        // remove: must exist; "-" and bad indices are invalid_index; "" is refused.
        assert_eq!(
            op(json!({"op": "remove", "path": "/a/b/0"})).unwrap()["a"]["b"],
            json!([2, 3])
        );
        assert_eq!(
            code(op(json!({"op": "remove", "path": "/nope"}))),
            ("path_not_found", Some(0))
        );
        assert_eq!(
            code(op(json!({"op": "remove", "path": "/a/b/3"}))),
            ("path_not_found", Some(0))
        );
        assert_eq!(
            code(op(json!({"op": "remove", "path": "/a/b/-"}))),
            ("invalid_index", Some(0))
        );
        assert_eq!(
            code(op(json!({"op": "remove", "path": "/a/b/1.0"}))),
            ("invalid_index", Some(0))
        );
        assert_eq!(
            code(op(json!({"op": "remove", "path": ""}))),
            ("invalid_operation", Some(0))
        );

        // replace: the target must exist; "" replaces the whole document.
        assert_eq!(
            op(json!({"op": "replace", "path": "/a/b/2", "value": "z"})).unwrap()["a"]["b"],
            json!([1, 2, "z"])
        );
        assert_eq!(
            op(json!({"op": "replace", "path": "", "value": 5})).unwrap(),
            json!(5)
        );
        assert_eq!(
            code(op(json!({"op": "replace", "path": "/nope", "value": 1}))),
            ("path_not_found", Some(0))
        );
        assert_eq!(
            code(op(json!({"op": "replace", "path": "/a/b/3", "value": 1}))),
            ("path_not_found", Some(0))
        );
        assert_eq!(
            code(op(json!({"op": "replace", "path": "/a/b/-", "value": 1}))),
            ("invalid_index", Some(0))
        );

        // move: into own child is an error (token-wise prefix), same path is a no-op but
        // "from" must exist, the target is resolved after the removal, move to "".
        let e = op(json!({"op": "move", "from": "/a", "path": "/a/b/x"})).unwrap_err();
        assert_eq!(
            e,
            PatchError::MoveIntoChild {
                index: 0,
                from: "/a".into(),
                path: "/a/b/x".into()
            }
        );
        assert_eq!(e.code(), "move_into_child");
        assert_eq!(
            code(op(json!({"op": "move", "from": "", "path": "/x"}))),
            ("move_into_child", Some(0))
        );
        assert_eq!(
            op(json!({"op": "move", "from": "/a", "path": "/a"})).unwrap(),
            doc
        );
        assert_eq!(
            op(json!({"op": "move", "from": "", "path": ""})).unwrap(),
            doc
        );
        assert_eq!(
            code(op(json!({"op": "move", "from": "/q", "path": "/q"}))),
            ("path_not_found", Some(0))
        );
        assert_eq!(
            code(op(json!({"op": "move", "from": "/q", "path": "/r"}))),
            ("path_not_found", Some(0))
        );
        assert_eq!(
            op(json!({"op": "move", "from": "/s", "path": "/sx"})).unwrap(),
            json!({"a": {"b": [1, 2, 3]}, "sx": "x"})
        );
        assert_eq!(
            op(json!({"op": "move", "from": "/a/b/0", "path": "/a/b/-"})).unwrap()["a"]["b"],
            json!([2, 3, 1])
        );
        // After removing /a/b/0 the array has 2 elements, so index 3 is out of range.
        assert_eq!(
            code(op(
                json!({"op": "move", "from": "/a/b/0", "path": "/a/b/3"})
            )),
            ("invalid_index", Some(0))
        );
        assert_eq!(
            op(json!({"op": "move", "from": "/a", "path": ""})).unwrap(),
            json!({"b": [1, 2, 3]})
        );
        assert_eq!(
            op(json!({"op": "move", "from": "/a/b", "path": "/s"})).unwrap(),
            json!({"a": {}, "s": [1, 2, 3]})
        );

        // copy: deep copy (mutating the copy leaves the source alone), copy into own child.
        let out = run(
            doc.clone(),
            json!([{"op": "copy", "from": "/a", "path": "/c"}, {"op": "add", "path": "/c/b/-", "value": 4}]),
        )
        .unwrap();
        assert_eq!(out["a"], json!({"b": [1, 2, 3]}));
        assert_eq!(out["c"], json!({"b": [1, 2, 3, 4]}));
        assert_eq!(
            op(json!({"op": "copy", "from": "/a", "path": "/a/c"})).unwrap()["a"]["c"],
            json!({"b": [1, 2, 3]})
        );
        assert_eq!(
            code(op(json!({"op": "copy", "from": "/q", "path": "/r"}))),
            ("path_not_found", Some(0))
        );
        assert_eq!(
            code(op(json!({"op": "copy", "from": "/a/b/-", "path": "/r"}))),
            ("invalid_index", Some(0))
        );

        // test: missing target is path_not_found; "-" is invalid_index.
        assert_eq!(
            code(op(json!({"op": "test", "path": "/q", "value": 1}))),
            ("path_not_found", Some(0))
        );
        assert_eq!(
            code(op(json!({"op": "test", "path": "/a/b/-", "value": 1}))),
            ("invalid_index", Some(0))
        );
        assert_eq!(
            code(op(json!({"op": "test", "path": "/a/b", "value": [1, 2]}))),
            ("test_failed", Some(0))
        );
        assert!(op(
            json!({"op": "test", "path": "", "value": {"s": "x", "a": {"b": [1.0, 2, 3e0]}}})
        )
        .is_ok());

        // Atomicity: the third op fails, so the first two are undone; the index is 2.
        let e = run(
            doc.clone(),
            json!([
                {"op": "remove", "path": "/a/b/1"},
                {"op": "move", "from": "/s", "path": "/a/b/0"},
                {"op": "test", "path": "/a/b", "value": []}
            ]),
        )
        .unwrap_err();
        assert_eq!((e.code(), e.index()), ("test_failed", Some(2)));
        assert_eq!(
            apply_patch(&doc, &json!([{"op": "add", "path": "/n", "value": 1}])).unwrap()["n"],
            json!(1)
        );
        assert_eq!(
            apply_patch(&doc, &json!([{"op": "remove", "path": "/n"}]))
                .unwrap_err()
                .code(),
            "path_not_found"
        );
    }

    #[test]
    fn json_equality_and_reversible_apply() {
        assert!(json_equal(&json!(1), &json!(1.0)));
        assert!(json_equal(&json!(-0.0), &json!(0)));
        assert!(json_equal(&json!(u64::MAX), &json!(u64::MAX)));
        assert!(!json_equal(&json!(u64::MAX), &json!(u64::MAX as f64))); // 2^64 != 2^64 - 1
        assert!(json_equal(
            &json!(9_007_199_254_740_992_u64),
            &json!(9_007_199_254_740_992.0)
        ));
        assert!(!json_equal(
            &json!(9_007_199_254_740_993_u64),
            &json!(9_007_199_254_740_992.0)
        ));
        assert!(!json_equal(&json!(1), &json!(1.5)));
        assert!(!json_equal(&json!(1), &json!("1")));
        assert!(!json_equal(&json!(null), &json!(false)));
        assert!(json_equal(
            &json!({"a": 1, "b": [1, {"c": 2.0}]}),
            &json!({"b": [1.0, {"c": 2}], "a": 1})
        ));
        assert!(!json_equal(&json!([1, 2]), &json!([2, 1])));
        assert!(!json_equal(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
        assert!(!json_equal(&json!({"a": 1}), &json!({"b": 1})));

        let before = json!({"a": [1, 2], "o": {"k": "v"}});
        let patch = Patch::from_value(&json!([
            {"op": "add", "path": "/a/0", "value": 0},
            {"op": "remove", "path": "/o/k"},
            {"op": "move", "from": "/a", "path": "/o/a"},
            {"op": "copy", "from": "/o", "path": "/c"},
            {"op": "replace", "path": "/c", "value": 3},
            {"op": "add", "path": "", "value": {"all": "new"}}
        ]))
        .unwrap();
        let mut doc = before.clone();
        let undo = patch.apply_reversible(&mut doc).unwrap();
        assert_eq!(doc, json!({"all": "new"}));
        undo.revert(&mut doc).unwrap();
        assert_eq!(doc, before);
        // Reverting against some other document is detected where it can be, never a panic.
        let patch = Patch::from_value(&json!([{"op": "add", "path": "/a/0", "value": 0}])).unwrap();
        let undo = patch.apply_reversible(&mut doc).unwrap();
        assert_eq!(undo.revert(&mut json!(1)), Err(RevertError));
    }

    // ---- property tests -------------------------------------------------------------------

    const KEYS: [&str; 5] = ["a", "b", "c", "d", "~/"];

    fn arb_leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-3i64..3).prop_map(Value::from),
            prop_oneof![Just(0.5), Just(1.0), Just(-2.0)].prop_map(Value::from),
            "[xy]{0,2}".prop_map(Value::String),
        ]
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        arb_leaf().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(prop::sample::select(KEYS.to_vec()), inner, 0..4)
                    .prop_map(|m| Value::Object(
                        m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                    )),
            ]
        })
    }

    /// Every location in `doc`, root first.
    fn locations(doc: &Value) -> Vec<(JsonPointer, &Value)> {
        let mut out = vec![];
        let mut stack = vec![(JsonPointer::root(), doc)];
        while let Some((p, v)) = stack.pop() {
            match v {
                Value::Object(m) => stack.extend(m.iter().map(|(k, x)| (p.child(k), x))),
                Value::Array(a) => stack.extend(
                    a.iter()
                        .enumerate()
                        .map(|(i, x)| (p.child(&i.to_string()), x)),
                ),
                _ => {}
            }
            out.push((p, v));
        }
        out
    }

    /// A location where `add` succeeds in `doc` (new or existing member, 0..=len, "-").
    fn add_target(doc: &Value, a: usize, b: usize) -> Option<JsonPointer> {
        let containers: Vec<_> = locations(doc)
            .into_iter()
            .filter(|(_, v)| v.is_object() || v.is_array())
            .collect();
        let (p, v) = containers.get(a % containers.len().max(1))?;
        Some(match v {
            Value::Array(arr) if b % (arr.len() + 2) == arr.len() + 1 => p.child("-"),
            Value::Array(arr) => p.child(&(b % (arr.len() + 2)).to_string()),
            _ => p.child(KEYS[b % KEYS.len()]),
        })
    }

    /// A valid operation for `doc` (and, after an `add`, a `test` of the added value).
    fn valid_ops(doc: &Value, kind: u8, a: usize, b: usize, value: &Value) -> Vec<Value> {
        let existing: Vec<_> = locations(doc).into_iter().skip(1).map(|(p, _)| p).collect();
        let pick = |n: usize| existing.get(n % existing.len().max(1)).cloned();
        let add = |a, b| -> Vec<Value> {
            let Some(path) = add_target(doc, a, b) else {
                return vec![];
            };
            let mut test_path = path.clone();
            if let Some((parent, "-")) = path.split_last() {
                let parent = JsonPointer::from_tokens(parent.to_vec());
                let len = parent
                    .get(doc)
                    .ok()
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                test_path = parent.child(&len.to_string());
            }
            vec![
                json!({"op": "add", "path": path.as_str(), "value": value}),
                json!({"op": "test", "path": test_path.as_str(), "value": value}),
            ]
        };
        match (kind % 5, pick(a)) {
            (1, Some(p)) => vec![json!({"op": "remove", "path": p.as_str()})],
            (2, Some(p)) => vec![json!({"op": "replace", "path": p.as_str(), "value": value})],
            (3, Some(from)) => {
                let mut after = doc.clone();
                Patch::from_value(&json!([{"op": "remove", "path": from.as_str()}]))
                    .unwrap()
                    .apply(&mut after)
                    .unwrap();
                match add_target(&after, b, a) {
                    Some(path) if !from.is_proper_prefix_of(&path) => {
                        vec![json!({"op": "move", "from": from.as_str(), "path": path.as_str()})]
                    }
                    _ => add(a, b),
                }
            }
            (4, _) => {
                let all = locations(doc);
                let from = &all[a % all.len()].0;
                match add_target(doc, b, a) {
                    Some(path) => {
                        vec![json!({"op": "copy", "from": from.as_str(), "path": path.as_str()})]
                    }
                    None => vec![],
                }
            }
            _ => add(a, b),
        }
    }

    /// An operation that fails on `doc`, with the code it fails with.
    fn failing_op(doc: &Value, kind: u8, a: usize) -> (Value, &'static str) {
        let arrays: Vec<_> = locations(doc)
            .into_iter()
            .filter(|(_, v)| v.is_array())
            .collect();
        let locs = locations(doc);
        match kind % 9 {
            0 => (json!({"op": "remove", "path": "/zzz"}), "path_not_found"),
            1 => (
                json!({"op": "replace", "path": "/zzz/0", "value": 1}),
                "path_not_found",
            ),
            2 => (
                json!({"op": "add", "path": "/zzz/q", "value": 1}),
                "path_not_found",
            ),
            3 => (
                json!({"op": "test", "path": "", "value": {"zzz": true}}),
                "test_failed",
            ),
            4 => (
                json!({"op": "move", "from": "", "path": "/zzz"}),
                "move_into_child",
            ),
            5 if !arrays.is_empty() => {
                let (p, v) = &arrays[a % arrays.len()];
                let len = v.as_array().map_or(0, Vec::len);
                (
                    json!({"op": "add", "path": p.child(&(len + 1).to_string()).as_str(), "value": 1}),
                    "invalid_index",
                )
            }
            6 => (
                json!({"op": "copy", "from": "/zzz", "path": "/a"}),
                "path_not_found",
            ),
            7 if !arrays.is_empty() => {
                let (p, _) = &arrays[a % arrays.len()];
                (
                    json!({"op": "remove", "path": p.child("-").as_str()}),
                    "invalid_index",
                )
            }
            8 => {
                let (p, v) = &locs[a % locs.len()];
                (
                    json!({"op": "test", "path": p.as_str(), "value": {"zzz": [v]}}),
                    "test_failed",
                )
            }
            _ => (
                json!({"op": "remove", "path": "/zzz/zzz"}),
                "path_not_found",
            ),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn failing_op_anywhere_leaves_document_unchanged(
            root in prop::collection::btree_map(prop::sample::select(KEYS.to_vec()), arb_value(), 0..4),
            steps in prop::collection::vec((any::<u8>(), any::<usize>(), any::<usize>(), arb_value()), 0..12),
            fail_at in any::<usize>(),
            fail_kind in any::<u8>(),
            fail_sel in any::<usize>(),
        ) {
            let original = Value::Object(root.into_iter().map(|(k, v)| (k.to_owned(), v)).collect());
            let mut shadow = original.clone();
            let mut ops: Vec<Value> = vec![];
            let mut states = vec![shadow.clone()]; // state before ops[i]
            for (kind, a, b, value) in &steps {
                for op in valid_ops(&shadow, *kind, *a, *b, value) {
                    let r = Patch::from_value(&json!([op])).unwrap().apply(&mut shadow);
                    prop_assert!(r.is_ok(), "valid op {} failed: {:?} on {}", op, r, states.last().unwrap());
                    ops.push(op);
                    states.push(shadow.clone());
                }
            }
            // The valid sequence applies as one patch (including each `test` after `add`).
            let mut doc = original.clone();
            Patch::from_value(&Value::Array(ops.clone())).unwrap().apply(&mut doc).unwrap();
            prop_assert_eq!(&doc, &shadow);

            // ... and reverts exactly.
            let mut doc = original.clone();
            let patch = Patch::from_value(&Value::Array(ops.clone())).unwrap();
            patch.apply_reversible(&mut doc).unwrap().revert(&mut doc).unwrap();
            prop_assert_eq!(&doc, &original);

            // A failing op inserted anywhere: error names it, document unchanged.
            let k = fail_at % (ops.len() + 1);
            let (bad, expected_code) = failing_op(&states[k], fail_kind, fail_sel);
            let mut with_failure = ops.clone();
            with_failure.insert(k, bad.clone());
            let mut doc = original.clone();
            let err = Patch::from_value(&Value::Array(with_failure)).unwrap().apply(&mut doc).unwrap_err();
            prop_assert_eq!(err.index(), Some(k), "{} {}", bad, err);
            prop_assert_eq!(err.code(), expected_code, "{} {}", bad, err);
            prop_assert_eq!(&doc, &original);
            prop_assert_eq!(crate::definition::canonical_json_verbatim_numbers(&doc), crate::definition::canonical_json_verbatim_numbers(&original));
        }
    }

    // ---- budgets ----------------------------------------------------------------------------

    use crate::fold::Head;

    /// Runs `f` on a thread with a 256 KiB stack: a recursion that the depth limit failed to
    /// bound overflows it (and aborts the test binary) long before 30,000 levels.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(f)
            .expect("spawn")
            .join()
            .expect("no panic")
    }

    fn definition() -> Value {
        json!({"nodes": {"s": {"type": "function", "config": {}}}, "edges": [],
               "settings": {"max_hops": 5}})
    }

    /// The copy bomb: 40 `copy` from the root, 2 KB of patch, each doubling
    /// the document. Rejected `budget_bytes` at the op that would pass 4 MiB, before it
    /// allocates, with the document unchanged.
    #[test]
    fn forty_root_copies_are_rejected_for_bytes() {
        let text = Value::Array(
            (0..40)
                .map(|i| json!({"op": "copy", "from": "", "path": format!("/a{i}")}))
                .collect(),
        )
        .to_string();
        assert!(text.len() < 2100, "{}", text.len());
        let (code, index, unchanged) = on_small_stack(move || {
            let patch = Patch::from_json_str(&text).unwrap();
            let mut doc = definition();
            let e = patch.apply(&mut doc).unwrap_err();
            (e.code(), e.index(), doc == definition())
        });
        assert_eq!(code, "budget_bytes");
        // 84 bytes, doubling: op k copies about 84·2^k bytes; the sum passes 4 MiB at op 15.
        assert_eq!(index, Some(15));
        assert!(unchanged);

        // Through the fold, as the materializer runs it: a rejection, the head untouched.
        let mut head = Head {
            workspace_id: "ws".into(),
            version: 1,
            definition: definition(),
        };
        let ops = Value::Array(
            (0..40)
                .map(|i| json!({"op": "copy", "from": "", "path": format!("/a{i}")}))
                .collect(),
        );
        let d = crate::fold::step(
            &mut head,
            &crate::fold::Submitted {
                workspace_id: "ws".into(),
                base_version: None,
                operations: Patch::from_value(&ops),
            },
            &crate::definition::Limits::default(),
        );
        assert!(
            matches!(
                d,
                crate::fold::Decision::Rejected {
                    code: "budget_bytes",
                    head_version: 1,
                    ..
                }
            ),
            "{d:?}"
        );
        assert_eq!(head.definition, definition());
    }

    /// The nesting bomb: 30,000 `copy` ops into one path, nesting the document
    /// one level deeper each. Rejected without a stack overflow on a 256 KiB stack: by the
    /// operation count with the defaults, and by depth when the count is allowed.
    #[test]
    fn thirty_thousand_nested_copies_are_rejected_on_a_small_stack() {
        for ops in [
            json!({"op": "copy", "from": "", "path": "/a"}),
            json!({"op": "copy", "from": "/nodes", "path": "/nodes/s/config/x"}),
        ] {
            let text = Value::Array(vec![ops; 30_000]).to_string();
            let results = on_small_stack(move || {
                let patch = Patch::from_json_str(&text).unwrap();
                let mut out = vec![];
                for budget in [
                    Budget::default(),
                    Budget {
                        max_operations: 100_000,
                        ..Budget::default()
                    },
                ] {
                    let mut doc = definition();
                    let e = patch.apply_with(&mut doc, &budget).unwrap_err();
                    out.push((e.code(), e.index(), doc == definition()));
                }
                out
            });
            assert_eq!(results[0], ("budget_ops", None, true));
            assert_eq!(results[1].0, "budget_depth", "{results:?}");
            assert!(results[1].1.is_some_and(|i| i <= 64), "{results:?}");
            assert!(results[1].2);
        }
    }

    /// Deep values are refused before anything recurses over them: deeper than serde_json
    /// parses (an `invalid_operation` parse error), deeper than the budget (`budget_depth`),
    /// and a value built in memory far deeper than any stack is still measured safely.
    #[test]
    fn deep_values_are_rejected_cleanly() {
        let nested = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        let results = on_small_stack(move || {
            let mut out = vec![];
            for depth in [60, 63, 100, 127, 5_000, 100_000] {
                let text = format!(r#"[{{"op":"add","path":"/x","value":{}}}]"#, nested(depth));
                let mut doc = definition();
                let r = Patch::from_json_str(&text).and_then(|p| p.apply(&mut doc));
                out.push((depth, r.map_err(|e| e.code())));
            }
            // Built in memory, 1,000,000 levels: measured without recursion.
            let mut v = json!(1);
            for _ in 0..1_000_000 {
                v = Value::Array(vec![v]);
            }
            let m = measure(&v, usize::MAX, usize::MAX);
            let stopped = measure(&v, usize::MAX, 64);
            // Taken apart iteratively: dropping it whole would overflow this stack.
            while let Value::Array(mut a) = v {
                v = a.pop().unwrap_or_default();
            }
            (out, m, stopped)
        });
        let (out, m, stopped) = results;
        assert_eq!(
            out,
            vec![
                (60, Ok(())),
                (63, Ok(())), // "/x" is one level: 1 + 63 = 64
                (100, Err("budget_depth")),
                (127, Err("invalid_operation")), // the operation array and object add 2
                (5_000, Err("invalid_operation")),
                (100_000, Err("invalid_operation")),
            ]
        );
        assert_eq!(m.depth, 1_000_000);
        assert_eq!(m.bytes, 2_000_001);
        assert_eq!(stopped.depth, 65);
    }

    #[test]
    fn static_checks_and_run_time_limits() {
        let budget = Budget {
            max_operations: 3,
            max_bytes: 100,
            max_depth: 4,
            max_pointer_bytes: 16,
            max_array_shifts: 5,
        };
        let check = |ops: Value| {
            check_static(&Patch::from_value(&ops).unwrap(), &budget)
                .map_err(|e| (e.code(), e.index()))
        };
        let add = |path: &str, value: Value| json!({"op": "add", "path": path, "value": value});
        assert_eq!(
            check(json!([add("/a", json!(1)), add("/b", json!(1))])),
            Ok(())
        );
        assert_eq!(
            check(Value::Array(vec![add("/a", json!(1)); 4])),
            Err(("budget_ops", None))
        );
        assert_eq!(
            check(json!([
                add("/a", json!(1)),
                add("/aaaaaaaaaaaaaaaaaa", json!(1))
            ])),
            Err(("budget_pointer", Some(1)))
        );
        assert_eq!(
            check(json!([{"op": "copy", "from": "/a/b/c/d/e", "path": "/x"}])),
            Err(("budget_pointer", Some(0)))
        );
        // Depth counts from the root: "/a/b" is 2 levels, [[1]] two more.
        assert_eq!(check(json!([add("/a/b", json!([[1]]))])), Ok(()));
        assert_eq!(
            check(json!([add("/a/b", json!([[[1]]]))])),
            Err(("budget_depth", Some(0)))
        );
        assert_eq!(
            check(json!([{"op": "test", "path": "/a", "value": [[[[[1]]]]]}])),
            Err(("budget_depth", Some(0)))
        );
        // Bytes add up over the values: 60 + 60 > 100.
        let s = "x".repeat(58);
        assert_eq!(check(json!([add("/a", json!(s))])), Ok(()));
        assert_eq!(
            check(json!([add("/a", json!(s)), {"op": "replace", "path": "/a", "value": s}])),
            Err(("budget_bytes", Some(1)))
        );

        let run = |doc: Value, ops: Value| {
            let mut d = doc.clone();
            let r = Patch::from_value(&ops).unwrap().apply_with(&mut d, &budget);
            if r.is_err() {
                assert_eq!(d, doc, "a rejected patch changes nothing");
            }
            r.map(|()| d).map_err(|e| (e.code(), e.index()))
        };
        // Shifts: inserting at the front of a 3-element array shifts 3; twice is 6 > 5.
        let arr = json!({"a": [1, 2, 3]});
        assert!(run(arr.clone(), json!([add("/a/0", json!(0))])).is_ok());
        assert_eq!(
            run(
                arr.clone(),
                json!([add("/a/0", json!(0)), add("/a/0", json!(0))])
            ),
            Err(("budget_work", Some(1)))
        );
        assert!(run(
            arr.clone(),
            json!([add("/a/-", json!(0)), add("/a/-", json!(0))])
        )
        .is_ok());
        assert_eq!(
            run(
                arr.clone(),
                json!([{"op": "remove", "path": "/a/0"}, {"op": "remove", "path": "/a/0"},
                       {"op": "move", "from": "/a/0", "path": "/a/0"}])
            ),
            Ok(json!({"a": [3]})),
            "2 + 1 shifts, and a move onto itself shifts nothing"
        );
        // Copy: measured against bytes and depth before the clone.
        let doc = json!({"a": {"b": {"c": 1}}, "s": "x".repeat(60)});
        assert_eq!(
            run(
                doc.clone(),
                json!([{"op": "copy", "from": "/a", "path": "/x"}])
            ),
            Ok(json!({"a": {"b": {"c": 1}}, "s": "x".repeat(60), "x": {"b": {"c": 1}}}))
        );
        assert_eq!(
            run(
                doc.clone(),
                json!([{"op": "copy", "from": "/a", "path": "/a/b/d"}])
            ),
            Err(("budget_depth", Some(0)))
        );
        assert_eq!(
            run(
                doc.clone(),
                json!([{"op": "copy", "from": "/s", "path": "/t"}, {"op": "copy", "from": "/s", "path": "/u"}])
            ),
            Err(("budget_bytes", Some(1)))
        );
        // Move: sideways or up is free; deeper is measured.
        assert!(run(
            doc.clone(),
            json!([{"op": "move", "from": "/a/b", "path": "/b"}])
        )
        .is_ok());
        assert!(run(
            doc.clone(),
            json!([{"op": "move", "from": "/s", "path": "/a/b/s"}])
        )
        .is_ok());
        assert_eq!(
            run(
                doc.clone(),
                json!([{"op": "move", "from": "/a/b", "path": "/a/b2/x"}])
            ),
            Err(("path_not_found", Some(0))),
            "within the budget, a missing target is still reported as such"
        );
        let deep = json!({"a": {"b": {"c": {}}}, "x": {"y": {}}});
        assert_eq!(
            run(
                deep.clone(),
                json!([{"op": "move", "from": "/a", "path": "/x/y/a"}])
            ),
            Err(("budget_depth", Some(0)))
        );
    }

    /// An adversarial op over a small alphabet of locations: copies from the root and from
    /// anywhere, moves, deep paths, array inserts at the front.
    fn arb_hostile_op() -> impl Strategy<Value = Value> {
        let ptr = prop::collection::vec(prop::sample::select(vec!["a", "b", "0", "-"]), 0..5)
            .prop_map(|t| JsonPointer::from_tokens(t).as_str().to_owned());
        prop_oneof![
            3 => Just(json!({"op": "copy", "from": "", "path": "/a"})),
            3 => Just(json!({"op": "copy", "from": "/a", "path": "/a/a"})),
            2 => Just(json!({"op": "copy", "from": "", "path": "/b/-"})),
            3 => (ptr.clone(), ptr.clone()).prop_map(|(f, p)| json!({"op": "copy", "from": f, "path": p})),
            2 => (ptr.clone(), ptr.clone()).prop_map(|(f, p)| json!({"op": "move", "from": f, "path": p})),
            2 => (ptr.clone(), arb_value()).prop_map(|(p, v)| json!({"op": "add", "path": p, "value": v})),
            1 => ptr.clone().prop_map(|p| json!({"op": "remove", "path": p})),
            1 => (ptr.clone(), arb_value()).prop_map(|(p, v)| json!({"op": "replace", "path": p, "value": v})),
            1 => Just(json!({"op": "add", "path": "/b/0", "value": [1, 2]})),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any patch either applies within the budget or is rejected leaving the document as
        /// it was; never a panic. Applied: the document grew by at most `max_bytes`, nothing
        /// the patch placed is deeper than `max_depth`, the undo log has at most one entry
        /// per operation and reverts exactly. All of it on a 256 KiB stack, in bounded time.
        #[test]
        fn hostile_patches_stay_within_the_budget(
            start in arb_value(),
            ops in prop::collection::vec(arb_hostile_op(), 0..60),
            max_bytes in 0usize..3_000,
            max_depth in 4usize..10,
            max_array_shifts in 0usize..50,
        ) {
            let budget = Budget { max_operations: 40, max_bytes, max_depth, max_pointer_bytes: 64, max_array_shifts };
            let mut original = json!({"a": start, "b": [0]});
            let before = measure(&original, usize::MAX, usize::MAX);
            if before.depth > max_depth {
                original = json!({"a": {}, "b": [0]});
            }
            let before = measure(&original, usize::MAX, usize::MAX);
            let n = ops.len();
            let text = Value::Array(ops).to_string();
            let outcome = on_small_stack(move || {
                let started = std::time::Instant::now();
                let patch = Patch::from_json_str(&text).unwrap();
                let mut doc = original.clone();
                let r = patch.apply_reversible_with(&mut doc, &budget).map(|undo| {
                    let after = measure(&doc, usize::MAX, usize::MAX);
                    let entries = undo.len();
                    let mut reverted = doc.clone();
                    let ok = undo.revert(&mut reverted).is_ok() && reverted == original;
                    (after, entries, ok)
                });
                let unchanged = doc == original;
                (r.map_err(|e| e.code()), unchanged, started.elapsed())
            });
            let (r, unchanged, elapsed) = outcome;
            prop_assert!(elapsed < std::time::Duration::from_secs(10), "{elapsed:?}");
            match r {
                Ok((after, entries, reverts)) => {
                    prop_assert!(n <= 40);
                    prop_assert!(after.bytes <= before.bytes + max_bytes, "{after:?} {before:?} {max_bytes}");
                    prop_assert!(after.depth <= max_depth.max(before.depth), "{after:?} {max_depth}");
                    prop_assert!(entries <= n);
                    prop_assert!(reverts);
                }
                Err(code) => {
                    prop_assert!(unchanged, "rejected with {code} but changed");
                    if n > 40 { prop_assert_eq!(code, "budget_ops"); }
                }
            }
        }
    }
}
