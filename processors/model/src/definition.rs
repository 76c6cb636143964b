//! Workflow definitions: validation into a typed view, graph queries, canonical JSON.
//!
//! The format is documented in `docs/workflow-definition.md` (JSON Schema in
//! `docs/workflow-definition.schema.json`):
//!
//! ```json
//! {"nodes": {"fetch": {"type": "http_request", "config": {"url": "..."},
//!                      "retry": {"max_attempts": 3, "backoff_ms": 500}, "deadline_ms": 30000},
//!            "summarize": {"type": "agent", "config": {"model": "..."}}},
//!  "edges": [{"from": "fetch", "to": "summarize"}],
//!  "settings": {"max_hops": 100}}
//! ```
//!
//! # Invariants of a [`Definition`] (everything [`validate`] checks)
//!
//! - The document is a JSON object whose compact serialization is at most
//!   [`Limits::max_bytes`] bytes.
//! - `nodes` is a non-empty object of at most [`Limits::max_nodes`] nodes; ids match
//!   `^[A-Za-z0-9_.-]{1,128}$` (unique by construction: they are object member names).
//! - Every node has a known `type` ([`NodeType`]) and an object `config`; `retry`, if present,
//!   has `max_attempts` in `1..=100` and `backoff_ms >= 0`; `deadline_ms`, if present, is
//!   `> 0`.
//! - `edges` is an array of at most [`Limits::max_edges`] `{"from", "to"}` objects naming
//!   existing nodes, with no self-loop and no duplicate, and the graph is acyclic.
//! - `settings.max_hops`, if present, is in `1..=10_000` (default 100).
//! - Integers may be written `3` or `3.0` (JSON Schema's notion of an integer); anything with
//!   a fractional part, a string or `null` where a number is expected is rejected.
//! - Unknown members are allowed (and ignored by the checks) at the top level, in nodes, in
//!   edges, in `retry` and in `settings`, so the format can be extended without breaking
//!   stored versions. The top level's and nodes' unknown members are kept in `extra`.
//!
//! Validation reports the first problem found, in a fixed order (size, shape and counts,
//! settings, nodes by id, edges by index, cycles), always as `invalid_definition` with a
//! message naming the node, edge or JSON pointer concerned. It runs in
//! O(bytes + (nodes + edges)·log(nodes + edges)) and never panics. [`check`] runs the same
//! checks without building the typed view (no copy of node configs), for callers that only
//! need the verdict.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt::{self, Write as _};
use std::sync::LazyLock;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::id::valid_node_id;
use crate::pointer::{escape_token, json_kind};

/// The node types the orchestrator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeType {
    /// Deterministic user code.
    Function,
    /// Pure computation (deterministic, no side effects).
    Pure,
    /// An outbound HTTP call.
    HttpRequest,
    /// A database query.
    DatabaseQuery,
    /// An LLM agent.
    Agent,
    /// A human-in-the-loop step.
    Human,
}

impl NodeType {
    /// Every node type, in documentation order.
    pub const ALL: [NodeType; 6] = [
        NodeType::Function,
        NodeType::Pure,
        NodeType::HttpRequest,
        NodeType::DatabaseQuery,
        NodeType::Agent,
        NodeType::Human,
    ];

    /// The name used in the `type` member.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeType::Function => "function",
            NodeType::Pure => "pure",
            NodeType::HttpRequest => "http_request",
            NodeType::DatabaseQuery => "database_query",
            NodeType::Agent => "agent",
            NodeType::Human => "human",
        }
    }

    /// The node type named `s`, if known.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for NodeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node's retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    /// Total attempts including the first, `1..=100`.
    pub max_attempts: u32,
    /// Delay before a retry, in milliseconds, `>= 0`.
    pub backoff_ms: u64,
}

/// One node of a validated definition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    /// The node type.
    #[serde(rename = "type")]
    pub node_type: NodeType,
    /// Type-specific configuration (opaque here).
    pub config: Map<String, Value>,
    /// Retry policy, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Deadline for one attempt, in milliseconds, `> 0`, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Members this version of weir does not know (extensions), kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A dependency: `to` may start once `from` has succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Edge {
    /// The predecessor node id.
    pub from: String,
    /// The successor node id.
    pub to: String,
}

/// Workflow-wide settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Settings {
    /// Upper bound on node-to-node hops in one run, `1..=10_000`, default
    /// [`Settings::DEFAULT_MAX_HOPS`].
    pub max_hops: u32,
}

impl Settings {
    /// Default `max_hops`.
    pub const DEFAULT_MAX_HOPS: u32 = 100;
    /// Largest allowed `max_hops`.
    pub const MAX_MAX_HOPS: u32 = 10_000;
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_hops: Self::DEFAULT_MAX_HOPS,
        }
    }
}

/// Size limits enforced by [`validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest compact JSON serialization, in bytes (default 1 MiB).
    pub max_bytes: usize,
    /// Most nodes (default 1,000).
    pub max_nodes: usize,
    /// Most edges (default 10,000).
    pub max_edges: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 1024 * 1024,
            max_nodes: 1_000,
            max_edges: 10_000,
        }
    }
}

/// Why a document is not a valid workflow definition. [`DefinitionError::code`] is always
/// `"invalid_definition"`; the message names what is wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    /// The compact serialization exceeds [`Limits::max_bytes`].
    #[error("definition is larger than the limit of {max_bytes} bytes")]
    TooLarge {
        /// The limit.
        max_bytes: usize,
    },
    /// The document is not a JSON object.
    #[error("definition must be a JSON object, got {found}")]
    NotAnObject {
        /// The JSON type found.
        found: &'static str,
    },
    /// A member is missing, has the wrong type, or is out of range.
    #[error("{location}: {problem}")]
    Field {
        /// RFC 6901 pointer to the member (e.g. `/nodes/fetch/retry/max_attempts`).
        location: String,
        /// What is wrong with it.
        problem: String,
    },
    /// `nodes` is an empty object.
    #[error("/nodes: a definition needs at least one node")]
    NoNodes,
    /// More nodes than [`Limits::max_nodes`].
    #[error("/nodes: {count} nodes exceed the limit of {max}")]
    TooManyNodes {
        /// Number of nodes.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More edges than [`Limits::max_edges`].
    #[error("/edges: {count} edges exceed the limit of {max}")]
    TooManyEdges {
        /// Number of edges.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A node id does not match `^[A-Za-z0-9_.-]{1,128}$`.
    #[error("node id {id:?} is invalid: ids must match ^[A-Za-z0-9_.-]{{1,128}}$")]
    InvalidNodeId {
        /// The id.
        id: String,
    },
    /// A node's `type` is not one of [`NodeType::ALL`].
    #[error("node {node:?}: unknown type {node_type:?} (expected function, pure, http_request, database_query, agent or human)")]
    UnknownNodeType {
        /// The node id.
        node: String,
        /// The type given.
        node_type: String,
    },
    /// An edge names a node that does not exist.
    #[error("edge {edge} ({from:?} -> {to:?}): node {missing:?} does not exist")]
    UnknownNode {
        /// Index of the edge in `edges`.
        edge: usize,
        /// The edge's `from`.
        from: String,
        /// The edge's `to`.
        to: String,
        /// The id that does not exist.
        missing: String,
    },
    /// An edge from a node to itself.
    #[error("edge {edge} ({node:?} -> {node:?}): a node cannot depend on itself")]
    SelfLoop {
        /// Index of the edge in `edges`.
        edge: usize,
        /// The node id.
        node: String,
    },
    /// The same edge twice.
    #[error("edge {edge} ({from:?} -> {to:?}) duplicates edge {first}")]
    DuplicateEdge {
        /// Index of the duplicate.
        edge: usize,
        /// Index of the first occurrence.
        first: usize,
        /// The edge's `from`.
        from: String,
        /// The edge's `to`.
        to: String,
    },
    /// The graph has a cycle; `nodes` lists one cycle in edge order (each node has an edge
    /// to the next, and the last to the first).
    #[error("the graph has a cycle: {}", display_cycle(.nodes))]
    Cycle {
        /// The nodes of one cycle.
        nodes: Vec<String>,
    },
}

fn display_cycle(nodes: &[String]) -> String {
    let mut s = String::new();
    for n in nodes.iter().chain(nodes.first()) {
        if !s.is_empty() {
            s.push_str(" -> ");
        }
        let _ = write!(s, "{n:?}");
    }
    s
}

impl DefinitionError {
    /// The machine-readable code, always `"invalid_definition"`.
    pub fn code(&self) -> &'static str {
        "invalid_definition"
    }
}

/// Adjacency of one node, sorted by id.
#[derive(Debug, Clone, Default, PartialEq)]
struct Adjacency {
    predecessors: Vec<String>,
    successors: Vec<String>,
}

/// A validated workflow definition: the typed view of the document plus its graph
/// (adjacency lists, roots, a topological order), computed once by [`validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    nodes: BTreeMap<String, Node>,
    edges: Vec<Edge>,
    settings: Settings,
    extra: Map<String, Value>,
    adjacency: BTreeMap<String, Adjacency>,
    roots: Vec<String>,
    topological_order: Vec<String>,
}

impl Definition {
    /// The nodes by id (sorted).
    pub fn nodes(&self) -> &BTreeMap<String, Node> {
        &self.nodes
    }

    /// The node with this id.
    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.get(id)
    }

    /// The edges, in document order.
    pub fn edges(&self) -> &[Edge] {
        &self.edges
    }

    /// The settings, with defaults filled in.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Unknown top-level members (extensions), kept verbatim.
    pub fn extra(&self) -> &Map<String, Value> {
        &self.extra
    }

    /// Nodes without predecessors (where a run starts), sorted by id. Never empty.
    pub fn roots(&self) -> &[String] {
        &self.roots
    }

    /// The direct predecessors of `node`, sorted by id; `None` if there is no such node.
    pub fn predecessors(&self, node: &str) -> Option<&[String]> {
        self.adjacency.get(node).map(|a| a.predecessors.as_slice())
    }

    /// The direct successors of `node`, sorted by id; `None` if there is no such node.
    pub fn successors(&self, node: &str) -> Option<&[String]> {
        self.adjacency.get(node).map(|a| a.successors.as_slice())
    }

    /// Every node in a topological order (each node after all its predecessors); among the
    /// nodes available at each step, the smallest id comes first, so the order is unique.
    pub fn topological_order(&self) -> &[String] {
        &self.topological_order
    }
}

/// Validates `doc` as a workflow definition and returns its typed view.
///
/// The typed view copies each node's `config` and unknown members out of `doc`; when only
/// the verdict is needed (the materializer, once per version), use [`check`].
pub fn validate(doc: &Value, limits: &Limits) -> Result<Definition, DefinitionError> {
    Checked::run(doc, limits).map(Checked::build)
}

/// Runs exactly the checks of [`validate`], with the same errors, without building the typed
/// view: nothing from `doc` is copied except what an error message names.
pub fn check(doc: &Value, limits: &Limits) -> Result<(), DefinitionError> {
    Checked::run(doc, limits).map(drop)
}

/// The result of the checks, borrowing the document: what [`Checked::build`] needs.
struct Checked<'a> {
    top: &'a Map<String, Value>,
    settings: Settings,
    /// Node ids, sorted; graph indices below refer to this order.
    ids: Vec<&'a str>,
    /// The validated scalar parts of each node, by index.
    parts: Vec<NodeParts>,
    /// Node values, by index.
    values: Vec<&'a Map<String, Value>>,
    edges: Vec<(&'a str, &'a str)>,
    preds: Csr,
    succs: Csr,
    order: Vec<usize>,
}

/// Adjacency lists in compressed form: the neighbours of node `v` are
/// `targets[offsets[v]..offsets[v + 1]]`, sorted.
struct Csr {
    offsets: Vec<usize>,
    targets: Vec<usize>,
}

impl Csr {
    /// From `(node, neighbour)` pairs with every node `< n`.
    fn new(n: usize, mut pairs: Vec<(usize, usize)>) -> Self {
        pairs.sort_unstable();
        let mut offsets = vec![0; n + 1];
        for &(v, _) in &pairs {
            if let Some(count) = offsets.get_mut(v + 1) {
                *count += 1;
            }
        }
        let mut sum = 0;
        for o in &mut offsets {
            sum += *o;
            *o = sum;
        }
        Self {
            offsets,
            targets: pairs.into_iter().map(|(_, w)| w).collect(),
        }
    }

    fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    fn of(&self, v: usize) -> &[usize] {
        // In range for every v < len(); `get` keeps an out-of-range v panic-free (empty).
        match (self.offsets.get(v), self.offsets.get(v + 1)) {
            (Some(&a), Some(&b)) => self.targets.get(a..b).unwrap_or(&[]),
            _ => &[],
        }
    }
}

impl<'a> Checked<'a> {
    fn run(doc: &'a Value, limits: &Limits) -> Result<Self, DefinitionError> {
        if !fits_in(doc, limits.max_bytes) {
            return Err(DefinitionError::TooLarge {
                max_bytes: limits.max_bytes,
            });
        }
        let Value::Object(top) = doc else {
            return Err(DefinitionError::NotAnObject {
                found: json_kind(doc),
            });
        };
        let nodes_v = match top.get("nodes") {
            None => return Err(field("/nodes", "is required")),
            Some(Value::Object(m)) => m,
            Some(other) => return Err(wrong_type("/nodes", "an object", other)),
        };
        if nodes_v.is_empty() {
            return Err(DefinitionError::NoNodes);
        }
        if nodes_v.len() > limits.max_nodes {
            return Err(DefinitionError::TooManyNodes {
                count: nodes_v.len(),
                max: limits.max_nodes,
            });
        }
        let edges_v = match top.get("edges") {
            None => return Err(field("/edges", "is required")),
            Some(Value::Array(a)) => a,
            Some(other) => return Err(wrong_type("/edges", "an array", other)),
        };
        if edges_v.len() > limits.max_edges {
            return Err(DefinitionError::TooManyEdges {
                count: edges_v.len(),
                max: limits.max_edges,
            });
        }
        let settings = parse_settings(top.get("settings"))?;

        let mut sorted: Vec<(&'a str, &'a Value)> =
            nodes_v.iter().map(|(k, v)| (k.as_str(), v)).collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0)); // already sorted with serde_json's map
        let mut ids = Vec::with_capacity(sorted.len());
        let mut parts = Vec::with_capacity(sorted.len());
        let mut values = Vec::with_capacity(sorted.len());
        for (id, v) in sorted {
            let (m, p) = check_node(id, v)?;
            ids.push(id);
            parts.push(p);
            values.push(m);
        }

        // Edges, in array order. The first malformed edge (shape, unknown node, self-loop)
        // stops the scan at `failed`; a duplicate among the edges before it is reported
        // instead when it comes first, so the error is always the first bad edge in order.
        let lookup = |id: &str| ids.binary_search(&id).ok();
        let mut edges = Vec::with_capacity(edges_v.len());
        let mut pairs: Vec<(usize, usize, usize)> = Vec::with_capacity(edges_v.len());
        let mut failed = None;
        for (i, v) in edges_v.iter().enumerate() {
            let (from, to) = match check_edge(i, v) {
                Ok(e) => e,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            let unknown = |missing: &str| DefinitionError::UnknownNode {
                edge: i,
                from: from.to_owned(),
                to: to.to_owned(),
                missing: missing.to_owned(),
            };
            let (f, t) = match (lookup(from), lookup(to)) {
                (Some(f), Some(t)) => (f, t),
                (None, _) => {
                    failed = Some(unknown(from));
                    break;
                }
                (_, None) => {
                    failed = Some(unknown(to));
                    break;
                }
            };
            if f == t {
                failed = Some(DefinitionError::SelfLoop {
                    edge: i,
                    node: from.to_owned(),
                });
                break;
            }
            pairs.push((f, t, i));
            edges.push((from, to));
        }
        pairs.sort_unstable();
        let duplicate = pairs
            .windows(2)
            .filter_map(|w| match w {
                [a, b] if (a.0, a.1) == (b.0, b.1) => Some((a.2, b.2)),
                _ => None,
            })
            .min_by_key(|&(_, second)| second);
        if let Some((first, edge)) = duplicate {
            // Runs of equal pairs are sorted by index, so `first` is the earlier occurrence.
            let (from, to) = edges.get(edge).copied().unwrap_or_default();
            return Err(DefinitionError::DuplicateEdge {
                edge,
                first,
                from: from.to_owned(),
                to: to.to_owned(),
            });
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let succs = Csr::new(ids.len(), pairs.iter().map(|&(f, t, _)| (f, t)).collect());
        let preds = Csr::new(ids.len(), pairs.iter().map(|&(f, t, _)| (t, f)).collect());
        let order = topological_order(&preds, &succs).map_err(|cycle| DefinitionError::Cycle {
            nodes: cycle.into_iter().map(|i| name(&ids, i)).collect(),
        })?;
        Ok(Self {
            top,
            settings,
            ids,
            parts,
            values,
            edges,
            preds,
            succs,
            order,
        })
    }

    fn build(self) -> Definition {
        let ids = &self.ids;
        let names = |list: &[usize]| list.iter().map(|&i| name(ids, i)).collect::<Vec<_>>();
        let unknown = |m: &Map<String, Value>, known: &[&str]| -> Map<String, Value> {
            m.iter()
                .filter(|(k, _)| !known.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let nodes = ids
            .iter()
            .zip(&self.parts)
            .zip(&self.values)
            .map(|((id, &(node_type, retry, deadline_ms)), m)| {
                let config = match m.get("config") {
                    Some(Value::Object(c)) => c.clone(),
                    _ => Map::new(), // unreachable: `check_node` requires an object config
                };
                let node = Node {
                    node_type,
                    config,
                    retry,
                    deadline_ms,
                    extra: unknown(m, &NODE_MEMBERS),
                };
                ((*id).to_owned(), node)
            })
            .collect();
        let adjacency = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let a = Adjacency {
                    predecessors: names(self.preds.of(i)),
                    successors: names(self.succs.of(i)),
                };
                ((*id).to_owned(), a)
            })
            .collect();
        Definition {
            nodes,
            edges: self
                .edges
                .iter()
                .map(|&(from, to)| Edge {
                    from: from.to_owned(),
                    to: to.to_owned(),
                })
                .collect(),
            settings: self.settings,
            extra: unknown(self.top, &["nodes", "edges", "settings"]),
            adjacency,
            roots: (0..ids.len())
                .filter(|&i| self.preds.of(i).is_empty())
                .map(|i| name(ids, i))
                .collect(),
            topological_order: names(&self.order),
        }
    }
}

/// The id of node index `i` (always in range: indices come from `ids` itself; an
/// out-of-range index would give `""`, never a panic).
fn name(ids: &[&str], i: usize) -> String {
    ids.get(i).copied().unwrap_or_default().to_owned()
}

/// The node members this version knows; others go to [`Node::extra`].
const NODE_MEMBERS: [&str; 4] = ["type", "config", "retry", "deadline_ms"];

/// Kahn's algorithm with a min-heap (smallest index first). On a cycle, returns the nodes of
/// one cycle in edge order.
fn topological_order(preds: &Csr, succs: &Csr) -> Result<Vec<usize>, Vec<usize>> {
    let n = preds.len();
    let mut indegree: Vec<usize> = (0..n).map(|v| preds.of(v).len()).collect();
    let mut ready: BinaryHeap<Reverse<usize>> = indegree
        .iter()
        .enumerate()
        .filter(|&(_, &d)| d == 0)
        .map(|(i, _)| Reverse(i))
        .collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse(v)) = ready.pop() {
        order.push(v);
        for &s in succs.of(v) {
            if let Some(d) = indegree.get_mut(s) {
                *d = d.saturating_sub(1);
                if *d == 0 {
                    ready.push(Reverse(s));
                }
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Every node left has indegree > 0, counting only edges from nodes also left, so walking
    // predecessors within the leftover set never gets stuck and must revisit a node.
    let left = |i: usize| indegree.get(i).is_some_and(|&d| d > 0);
    let Some(start) = (0..n).find(|&i| left(i)) else {
        return Err(Vec::new()); // unreachable: order.len() < n means some node is left
    };
    let mut position: HashMap<usize, usize> = HashMap::new();
    let mut walk = Vec::new();
    let mut v = start;
    loop {
        if let Some(&p) = position.get(&v) {
            // walk[p..] is a cycle traversed against the edges; reverse it.
            let mut cycle = walk.split_off(p);
            cycle.reverse();
            // Start the report at the smallest id, for a stable message.
            if let Some((min_pos, _)) = cycle.iter().enumerate().min_by_key(|&(_, v)| *v) {
                cycle.rotate_left(min_pos);
            }
            return Err(cycle);
        }
        position.insert(v, walk.len());
        walk.push(v);
        match preds.of(v).iter().copied().find(|&p| left(p)) {
            Some(p) => v = p,
            None => return Err(walk), // unreachable (see above); still a useful report
        }
    }
}

fn parse_settings(v: Option<&Value>) -> Result<Settings, DefinitionError> {
    let mut settings = Settings::default();
    match v {
        None => {}
        Some(Value::Object(m)) => {
            if let Some(h) = m.get("max_hops") {
                settings.max_hops = int_in_range(
                    || "/settings/max_hops".to_owned(),
                    h,
                    1,
                    i128::from(Settings::MAX_MAX_HOPS),
                )
                .map(|x| x as u32)?; // in 1..=10_000, so the cast is exact
            }
        }
        Some(other) => return Err(wrong_type("/settings", "an object", other)),
    }
    Ok(settings)
}

/// A node's validated scalar members: type, retry, deadline_ms.
type NodeParts = (NodeType, Option<RetryPolicy>, Option<u64>);

/// Checks one node; returns its object and validated scalar parts.
fn check_node<'a>(
    id: &str,
    v: &'a Value,
) -> Result<(&'a Map<String, Value>, NodeParts), DefinitionError> {
    if !valid_node_id(id) {
        return Err(DefinitionError::InvalidNodeId { id: id.to_owned() });
    }
    let at = |member: &str| format!("/nodes/{}{member}", escape_token(id));
    let Value::Object(m) = v else {
        return Err(wrong_type(&at(""), "an object", v));
    };
    let node_type = match m.get("type") {
        None => return Err(field(&at("/type"), "is required")),
        Some(Value::String(s)) => {
            NodeType::from_name(s).ok_or_else(|| DefinitionError::UnknownNodeType {
                node: id.to_owned(),
                node_type: s.clone(),
            })?
        }
        Some(other) => return Err(wrong_type(&at("/type"), "a string", other)),
    };
    match m.get("config") {
        None => return Err(field(&at("/config"), "is required")),
        Some(Value::Object(_)) => {}
        Some(other) => return Err(wrong_type(&at("/config"), "an object", other)),
    }
    let retry = match m.get("retry") {
        None => None,
        Some(Value::Object(r)) => {
            let get = |name: &str| {
                r.get(name)
                    .ok_or_else(|| field(&at(&format!("/retry/{name}")), "is required"))
            };
            // Ranges are checked, so the casts below are exact.
            let max_attempts =
                int_in_range(|| at("/retry/max_attempts"), get("max_attempts")?, 1, 100)? as u32;
            let backoff_ms = int_in_range(
                || at("/retry/backoff_ms"),
                get("backoff_ms")?,
                0,
                i128::from(u64::MAX),
            )? as u64;
            Some(RetryPolicy {
                max_attempts,
                backoff_ms,
            })
        }
        Some(other) => return Err(wrong_type(&at("/retry"), "an object", other)),
    };
    let deadline_ms = match m.get("deadline_ms") {
        None => None,
        Some(d) => Some(int_in_range(|| at("/deadline_ms"), d, 1, i128::from(u64::MAX))? as u64),
    };
    Ok((m, (node_type, retry, deadline_ms)))
}

/// Checks one edge's shape; returns its `from` and `to`.
fn check_edge(i: usize, v: &Value) -> Result<(&str, &str), DefinitionError> {
    let Value::Object(m) = v else {
        return Err(wrong_type(&format!("/edges/{i}"), "an object", v));
    };
    let end = |name: &str| match m.get(name) {
        None => Err(field(&format!("/edges/{i}/{name}"), "is required")),
        Some(Value::String(s)) => Ok(s.as_str()),
        Some(other) => Err(wrong_type(&format!("/edges/{i}/{name}"), "a string", other)),
    };
    Ok((end("from")?, end("to")?))
}

/// An integer (JSON Schema sense: no fractional part, so `3.0` counts) in `lo..=hi`.
/// The caller casts the result to a type that holds `lo..=hi`.
fn int_in_range(
    location: impl Fn() -> String,
    v: &Value,
    lo: i128,
    hi: i128,
) -> Result<i128, DefinitionError> {
    let Value::Number(n) = v else {
        return Err(wrong_type(&location(), "an integer", v));
    };
    let i = n
        .as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 1e38)
                .map(|f| f as i128)
        })
        .ok_or_else(|| field(&location(), format!("must be an integer, got {n}")))?;
    if i < lo || i > hi {
        let range = if hi == i128::from(u64::MAX) && i < lo {
            format!(">= {lo}")
        } else {
            format!("in {lo}..={hi}")
        };
        return Err(field(&location(), format!("must be {range}, got {n}")));
    }
    Ok(i)
}

fn field(location: &str, problem: impl Into<String>) -> DefinitionError {
    DefinitionError::Field {
        location: location.to_owned(),
        problem: problem.into(),
    }
}

fn wrong_type(location: &str, expected: &str, got: &Value) -> DefinitionError {
    field(
        location,
        format!("must be {expected}, got {}", json_kind(got)),
    )
}

/// Whether the compact serialization of `v` is at most `max` bytes, computed without
/// building it and stopping as soon as the limit is passed.
fn fits_in(v: &Value, max: usize) -> bool {
    // usize::MAX: the caller measured already (the fold checks its canonical text's length),
    // and every document fits; skipping the walk keeps it off the per-patch path.
    max == usize::MAX || measure(v, max, usize::MAX).bytes <= max
}

/// The compact JSON size and nesting depth of a value, as [`measure`] finds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Measure {
    /// Bytes of the compact serialization (the length of [`canonical_json_verbatim_numbers`]); only a lower
    /// bound once it passed the walk's `max_bytes`.
    pub bytes: usize,
    /// Nesting depth: 0 for a scalar, 1 + the deepest member's depth for an array or an
    /// object (`[]` is 1, `{"a": [1]}` is 2); only a lower bound once it passed the walk's
    /// `max_depth`.
    pub depth: usize,
}

/// Measures `v` without building its text and without recursion: an explicit stack, so a
/// value nested deeper than the thread's stack (built in memory, or grown by patches) is
/// measured safely. The walk stops as soon as the size passes `max_bytes` or the depth
/// passes `max_depth`, so it visits at most about `max_bytes` values whatever the size of
/// `v`: callers measure *before* copying or checking anything that recurses.
pub fn measure(v: &Value, max_bytes: usize, max_depth: usize) -> Measure {
    let mut m = Measure::default();
    // (value, the depth it has if it is a container)
    let mut stack: Vec<(&Value, usize)> = vec![(v, 1)];
    let over = |m: &Measure| m.bytes > max_bytes || m.depth > max_depth;
    while let Some((v, level)) = stack.pop() {
        match v {
            Value::Null => m.bytes = m.bytes.saturating_add(4),
            Value::Bool(b) => m.bytes = m.bytes.saturating_add(if *b { 4 } else { 5 }),
            Value::Number(n) => m.bytes = m.bytes.saturating_add(number_len(n)),
            Value::String(s) => m.bytes = m.bytes.saturating_add(string_len(s)),
            // Brackets plus one comma between items.
            Value::Array(a) => {
                m.depth = m.depth.max(level);
                m.bytes = m.bytes.saturating_add(2 + a.len().saturating_sub(1));
                if over(&m) {
                    return m;
                }
                // At most one entry per byte already counted: the stack stays within the
                // limit too.
                stack.extend(a.iter().map(|x| (x, level + 1)));
            }
            // Braces, a colon per member, commas between members, and the keys.
            Value::Object(o) => {
                m.depth = m.depth.max(level);
                m.bytes = m
                    .bytes
                    .saturating_add(2 + o.len() + o.len().saturating_sub(1));
                for (k, x) in o {
                    if over(&m) {
                        return m;
                    }
                    m.bytes = m.bytes.saturating_add(string_len(k));
                    stack.push((x, level + 1));
                }
            }
        }
        if over(&m) {
            return m;
        }
    }
    m
}

/// Length of a number as serde_json prints it.
fn number_len(n: &serde_json::Number) -> usize {
    struct Len(usize);
    impl fmt::Write for Len {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut len = Len(0);
    let _ = write!(len, "{n}"); // `Len` never fails
    len.0
}

/// Length of a string as serde_json prints it (quotes and escapes included).
fn string_len(s: &str) -> usize {
    2 + s.len()
        + s.bytes()
            .map(|b| match escape(b) {
                Escape::None => 0,
                Escape::Short(_) => 1,
                Escape::Unicode => 5,
            })
            .sum::<usize>()
}

/// How serde_json escapes one byte of a string.
enum Escape {
    None,
    Short(&'static str),
    Unicode,
}

fn escape(b: u8) -> Escape {
    match b {
        b'"' => Escape::Short("\\\""),
        b'\\' => Escape::Short("\\\\"),
        0x08 => Escape::Short("\\b"),
        0x0c => Escape::Short("\\f"),
        b'\n' => Escape::Short("\\n"),
        b'\r' => Escape::Short("\\r"),
        b'\t' => Escape::Short("\\t"),
        0x00..=0x1f => Escape::Unicode,
        _ => Escape::None,
    }
}

/// Canonical JSON keeping numbers as written: `1` and `1.0` give different text (a definition's
/// hash changes when its author changes a number's spelling). The cache's
/// `canonical_json_normalized_numbers` is the one where they are equal.
///
/// Canonical JSON text of `v`, for hashing: object members sorted by key (Unicode code point
/// order, which is UTF-8 byte order), no whitespace, strings escaped exactly as serde_json
/// escapes them, numbers printed exactly as serde_json prints them (so `1` and `1.0` stay
/// different). Equal values (as `serde_json::Value`s) give equal text. This is *not*
/// RFC 8785 (JCS), which orders keys by UTF-16 code units and prints numbers the ECMAScript
/// way.
pub fn canonical_json_verbatim_numbers(v: &Value) -> String {
    // serde_json's own printer gives exactly these bytes when its maps iterate in key order
    // (a BTreeMap, unless some crate turns on its `preserve_order` feature), and is about
    // twice as fast as the writer below, which stays as the fallback and the reference.
    if *MAPS_ITERATE_SORTED {
        if let Ok(text) = serde_json::to_string(v) {
            return text;
        }
    }
    canonical_json_by_hand(v)
}

/// Whether `serde_json::Map` iterates in key order in this build.
static MAPS_ITERATE_SORTED: LazyLock<bool> = LazyLock::new(|| {
    let mut m = Map::new();
    m.insert("b".into(), Value::Null);
    m.insert("a".into(), Value::Null);
    m.keys().map(String::as_str).eq(["a", "b"])
});

/// [`canonical_json_verbatim_numbers`] written member by member, sorting any object whose keys are not in
/// order.
fn canonical_json_by_hand(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(&mut out, v);
    out
}

fn write_canonical(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}"); // writing to a String cannot fail
        }
        Value::String(s) => write_string(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(out, x);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            // serde_json's default map iterates in key order already; sort only if not.
            if m.keys().zip(m.keys().skip(1)).all(|(a, b)| a < b) {
                write_members(out, m.iter());
            } else {
                let mut members: Vec<(&String, &Value)> = m.iter().collect();
                members.sort_unstable_by(|a, b| a.0.cmp(b.0));
                write_members(out, members.into_iter());
            }
            out.push('}');
        }
    }
}

fn write_members<'a>(out: &mut String, members: impl Iterator<Item = (&'a String, &'a Value)>) {
    for (i, (k, x)) in members.enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, k);
        out.push(':');
        write_canonical(out, x);
    }
}

/// serde_json's string escaping: `"` `\` and control characters; `\b \f \n \r \t` short
/// forms, other controls as `\u00xx` (lowercase hex); everything else verbatim.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    // Escaped bytes are ASCII, so every `start..i` below falls on char boundaries and `get`
    // always succeeds; it is used instead of indexing only to stay panic-free by construction.
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = escape(b);
        if matches!(esc, Escape::None) {
            continue;
        }
        out.push_str(s.get(start..i).unwrap_or_default());
        match esc {
            Escape::Short(e) => out.push_str(e),
            _ => {
                let _ = write!(out, "\\u{b:04x}"); // writing to a String cannot fail
            }
        }
        start = i + 1;
    }
    out.push_str(s.get(start..).unwrap_or_default());
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn documented_example() -> Value {
        json!({"nodes": {"fetch": {"type": "http_request", "config": {"url": "..."},
                                   "retry": {"max_attempts": 3, "backoff_ms": 500}, "deadline_ms": 30000},
                         "summarize": {"type": "agent", "config": {"model": "..."}}},
               "edges": [{"from": "fetch", "to": "summarize"}],
               "settings": {"max_hops": 100}})
    }

    fn err(doc: &Value) -> DefinitionError {
        let e = validate(doc, &Limits::default()).expect_err("expected invalid");
        assert_eq!(e.code(), "invalid_definition");
        assert_eq!(check(doc, &Limits::default()), Err(e.clone()));
        e
    }

    /// The documented example definition with `f` applied to it.
    fn with(f: impl FnOnce(&mut Value)) -> Value {
        let mut d = documented_example();
        f(&mut d);
        d
    }

    #[test]
    fn documented_example_validates() {
        let d = validate(&documented_example(), &Limits::default()).unwrap();
        assert_eq!(check(&documented_example(), &Limits::default()), Ok(()));
        assert_eq!(d.roots(), ["fetch"]);
        assert_eq!(d.successors("fetch").unwrap(), ["summarize"]);
        assert_eq!(d.predecessors("summarize").unwrap(), ["fetch"]);
        assert_eq!(d.predecessors("fetch").unwrap(), [] as [String; 0]);
        assert_eq!(d.successors("nope"), None);
        assert_eq!(d.topological_order(), ["fetch", "summarize"]);
        let fetch = d.node("fetch").unwrap();
        assert_eq!(fetch.node_type, NodeType::HttpRequest);
        assert_eq!(
            fetch.retry,
            Some(RetryPolicy {
                max_attempts: 3,
                backoff_ms: 500
            })
        );
        assert_eq!(fetch.deadline_ms, Some(30_000));
        assert_eq!(fetch.config["url"], json!("..."));
        let summarize = d.node("summarize").unwrap();
        assert_eq!((summarize.retry, summarize.deadline_ms), (None, None));
        assert_eq!(d.settings().max_hops, 100);
        assert_eq!(
            d.edges(),
            [Edge {
                from: "fetch".into(),
                to: "summarize".into()
            }]
        );
        // The typed node serializes back to its JSON shape.
        assert_eq!(
            serde_json::to_value(fetch).unwrap(),
            documented_example()["nodes"]["fetch"]
        );

        // Extensions are allowed and kept; defaults apply; integers may be written as x.0.
        let d = validate(
            &json!({"nodes": {"a": {"type": "human", "config": {}, "ui": {"form": 1},
                                     "retry": {"max_attempts": 2.0, "backoff_ms": 0, "jitter": true}},
                              "b.c-d_9": {"type": "pure", "config": {}}},
                    "edges": [{"from": "a", "to": "b.c-d_9", "label": "then"}],
                    "settings": {"other": 1},
                    "description": "x"}),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(d.settings().max_hops, Settings::DEFAULT_MAX_HOPS);
        assert_eq!(d.extra()["description"], json!("x"));
        assert_eq!(d.node("a").unwrap().extra["ui"], json!({"form": 1}));
        assert_eq!(d.node("a").unwrap().retry.unwrap().max_attempts, 2);
        for t in NodeType::ALL {
            assert_eq!(NodeType::from_name(t.as_str()), Some(t));
            assert_eq!(serde_json::to_value(t).unwrap(), json!(t.as_str()));
        }
    }

    #[test]
    fn every_rejection_reason() {
        use DefinitionError as E;
        let field = |d: Value| match err(&d) {
            E::Field { location, problem } => format!("{location}: {problem}"),
            other => panic!("expected a field error, got {other:?}"),
        };
        assert_eq!(err(&json!([])), E::NotAnObject { found: "array" });
        let small = Limits {
            max_bytes: 100,
            ..Limits::default()
        };
        assert_eq!(
            validate(&documented_example(), &small).unwrap_err(),
            E::TooLarge { max_bytes: 100 }
        );
        let exact = canonical_json_verbatim_numbers(&documented_example()).len();
        assert!(validate(
            &documented_example(),
            &Limits {
                max_bytes: exact,
                ..Limits::default()
            }
        )
        .is_ok());
        assert!(validate(
            &documented_example(),
            &Limits {
                max_bytes: exact - 1,
                ..Limits::default()
            }
        )
        .is_err());

        assert_eq!(field(json!({"edges": []})), "/nodes: is required");
        assert_eq!(
            field(json!({"nodes": [], "edges": []})),
            "/nodes: must be an object, got array"
        );
        assert_eq!(err(&json!({"nodes": {}, "edges": []})), E::NoNodes);
        let few = Limits {
            max_nodes: 1,
            max_edges: 0,
            ..Limits::default()
        };
        assert_eq!(
            validate(&documented_example(), &few).unwrap_err(),
            E::TooManyNodes { count: 2, max: 1 }
        );
        let few = Limits {
            max_edges: 0,
            ..Limits::default()
        };
        assert_eq!(
            validate(&documented_example(), &few).unwrap_err(),
            E::TooManyEdges { count: 1, max: 0 }
        );
        assert_eq!(
            field(with(|d| drop(d.as_object_mut().unwrap().remove("edges")))),
            "/edges: is required"
        );
        assert_eq!(
            field(with(|d| d["edges"] = json!({}))),
            "/edges: must be an array, got object"
        );
        assert_eq!(
            field(with(|d| d["settings"] = json!(1))),
            "/settings: must be an object, got number"
        );
        assert_eq!(
            field(with(|d| d["settings"]["max_hops"] = json!(0))),
            "/settings/max_hops: must be in 1..=10000, got 0"
        );
        assert_eq!(
            field(with(|d| d["settings"]["max_hops"] = json!(10_001))),
            "/settings/max_hops: must be in 1..=10000, got 10001"
        );
        assert!(validate(
            &with(|d| d["settings"]["max_hops"] = json!(10_000)),
            &Limits::default()
        )
        .is_ok());

        // Nodes: id, shape, type, config, retry, deadline.
        for bad_id in ["", "a b", "é", "a/b", &"x".repeat(129)] {
            let d = json!({"nodes": {bad_id: {"type": "pure", "config": {}}}, "edges": []});
            assert_eq!(err(&d), E::InvalidNodeId { id: bad_id.into() });
        }
        assert!(validate(
            &json!({"nodes": {"x".repeat(128): {"type": "pure", "config": {}}}, "edges": []}),
            &Limits::default()
        )
        .is_ok());
        assert_eq!(
            field(with(|d| d["nodes"]["fetch"] = json!(null))),
            "/nodes/fetch: must be an object, got null"
        );
        assert_eq!(
            err(&with(|d| d["nodes"]["fetch"]["type"] = json!("webhook"))),
            E::UnknownNodeType {
                node: "fetch".into(),
                node_type: "webhook".into()
            }
        );
        assert!(
            err(&with(|d| d["nodes"]["fetch"]["type"] = json!("webhook")))
                .to_string()
                .contains("node \"fetch\"")
        );
        assert_eq!(
            field(with(|d| d["nodes"]["fetch"]["type"] = json!(1))),
            "/nodes/fetch/type: must be a string, got number"
        );
        assert_eq!(
            field(with(|d| drop(
                d["nodes"]["fetch"].as_object_mut().unwrap().remove("type")
            ))),
            "/nodes/fetch/type: is required"
        );
        assert_eq!(
            field(with(|d| drop(
                d["nodes"]["fetch"]
                    .as_object_mut()
                    .unwrap()
                    .remove("config")
            ))),
            "/nodes/fetch/config: is required"
        );
        assert_eq!(
            field(with(|d| d["nodes"]["fetch"]["config"] = json!("x"))),
            "/nodes/fetch/config: must be an object, got string"
        );
        assert_eq!(
            field(with(|d| d["nodes"]["fetch"]["retry"] = json!([]))),
            "/nodes/fetch/retry: must be an object, got array"
        );
        assert_eq!(
            field(with(
                |d| d["nodes"]["fetch"]["retry"] = json!({"backoff_ms": 1})
            )),
            "/nodes/fetch/retry/max_attempts: is required"
        );
        assert_eq!(
            field(with(
                |d| d["nodes"]["fetch"]["retry"] = json!({"max_attempts": 1})
            )),
            "/nodes/fetch/retry/backoff_ms: is required"
        );
        for (bad, msg) in [
            (json!(0), "must be in 1..=100, got 0"),
            (json!(101), "must be in 1..=100, got 101"),
            (json!(1.5), "must be an integer, got 1.5"),
            (json!("3"), "must be an integer, got string"),
            (json!(null), "must be an integer, got null"),
        ] {
            let d = with(|d| d["nodes"]["fetch"]["retry"]["max_attempts"] = bad);
            assert_eq!(field(d), format!("/nodes/fetch/retry/max_attempts: {msg}"));
        }
        assert!(validate(
            &with(|d| d["nodes"]["fetch"]["retry"]["max_attempts"] = json!(100)),
            &Limits::default()
        )
        .is_ok());
        assert_eq!(
            field(with(
                |d| d["nodes"]["fetch"]["retry"]["backoff_ms"] = json!(-1)
            )),
            "/nodes/fetch/retry/backoff_ms: must be >= 0, got -1"
        );
        assert!(validate(
            &with(|d| d["nodes"]["fetch"]["retry"]["backoff_ms"] = json!(0)),
            &Limits::default()
        )
        .is_ok());
        assert_eq!(
            field(with(|d| d["nodes"]["fetch"]["deadline_ms"] = json!(0))),
            "/nodes/fetch/deadline_ms: must be >= 1, got 0"
        );
        assert_eq!(
            field(with(|d| d["nodes"]["fetch"]["deadline_ms"] = json!(1e300))),
            format!(
                "/nodes/fetch/deadline_ms: must be an integer, got {}",
                json!(1e300)
            )
        );
        // Node ids with "/" or "~" can't pass the id check, but locations are escaped anyway.
        assert_eq!(
            field(with(|d| d["nodes"]["x.y"] = json!({"type": "pure"}))),
            "/nodes/x.y/config: is required"
        );

        // Edges.
        assert_eq!(
            field(with(|d| d["edges"] = json!([1]))),
            "/edges/0: must be an object, got number"
        );
        assert_eq!(
            field(with(|d| d["edges"] = json!([{"from": "fetch"}]))),
            "/edges/0/to: is required"
        );
        assert_eq!(
            field(with(|d| d["edges"] = json!([{"from": 1, "to": "fetch"}]))),
            "/edges/0/from: must be a string, got number"
        );
        let e = err(&with(|d| {
            d["edges"]
                .as_array_mut()
                .unwrap()
                .push(json!({"from": "summarize", "to": "ghost"}))
        }));
        assert_eq!(
            e,
            E::UnknownNode {
                edge: 1,
                from: "summarize".into(),
                to: "ghost".into(),
                missing: "ghost".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "edge 1 (\"summarize\" -> \"ghost\"): node \"ghost\" does not exist"
        );
        let e = err(&with(|d| {
            d["edges"]
                .as_array_mut()
                .unwrap()
                .push(json!({"from": "fetch", "to": "fetch"}))
        }));
        assert_eq!(
            e,
            E::SelfLoop {
                edge: 1,
                node: "fetch".into()
            }
        );
        let e = err(&with(|d| {
            d["edges"]
                .as_array_mut()
                .unwrap()
                .push(json!({"from": "fetch", "to": "summarize"}))
        }));
        assert_eq!(
            e,
            E::DuplicateEdge {
                edge: 1,
                first: 0,
                from: "fetch".into(),
                to: "summarize".into()
            }
        );
        assert!(e.to_string().contains("duplicates edge 0"));
        // The first bad edge in array order is reported, whatever its kind.
        let node = json!({"type": "pure", "config": {}});
        let edges = |e: Value| json!({"nodes": {"a": node, "b": node, "c": node}, "edges": e});
        let (ab, ac, bc) = (
            json!({"from": "a", "to": "b"}),
            json!({"from": "a", "to": "c"}),
            json!({"from": "b", "to": "c"}),
        );
        let ghost = json!({"from": "a", "to": "ghost"});
        assert!(matches!(
            err(&edges(json!([ab, ab, ghost]))),
            E::DuplicateEdge {
                edge: 1,
                first: 0,
                ..
            }
        ));
        assert!(matches!(
            err(&edges(json!([ab, ghost, ab]))),
            E::UnknownNode { edge: 1, .. }
        ));
        assert!(matches!(
            err(&edges(json!([ab, bc, ac, bc, ab, ab]))),
            E::DuplicateEdge {
                edge: 3,
                first: 1,
                ..
            }
        ));
        assert!(matches!(
            err(&edges(json!([ac, bc, 7, ac]))),
            E::Field { .. }
        ));
    }

    #[test]
    fn cycles_are_reported_with_their_nodes() {
        let node = json!({"type": "function", "config": {}});
        let d = json!({
            "nodes": {"start": node, "a": node, "b": node, "c": node, "end": node},
            "edges": [{"from": "start", "to": "b"}, {"from": "b", "to": "c"}, {"from": "c", "to": "a"},
                      {"from": "a", "to": "b"}, {"from": "c", "to": "end"}]
        });
        let e = err(&d);
        assert_eq!(
            e,
            DefinitionError::Cycle {
                nodes: vec!["a".into(), "b".into(), "c".into()]
            }
        );
        assert_eq!(
            e.to_string(),
            "the graph has a cycle: \"a\" -> \"b\" -> \"c\" -> \"a\""
        );
        // Two-node cycle with everything else fine.
        let d = json!({"nodes": {"x": node, "y": node}, "edges": [{"from": "x", "to": "y"}, {"from": "y", "to": "x"}]});
        assert_eq!(
            err(&d),
            DefinitionError::Cycle {
                nodes: vec!["x".into(), "y".into()]
            }
        );
    }

    #[test]
    fn canonical_json_sorts_and_escapes() {
        let v = json!({"b": [1, 1.0, -2.5e-7, null, true], "a": {"z": "\"\\\n\u{1}\u{7f}é😀", "y": {}}, "": []});
        assert_eq!(
            canonical_json_verbatim_numbers(&v),
            canonical_json_by_hand(&v)
        );
        assert_eq!(
            canonical_json_verbatim_numbers(&v),
            "{\"\":[],\"a\":{\"y\":{},\"z\":\"\\\"\\\\\\n\\u0001\u{7f}é😀\"},\"b\":[1,1.0,-2.5e-7,null,true]}"
        );
        assert_eq!(
            canonical_json_verbatim_numbers(&json!(u64::MAX)),
            "18446744073709551615"
        );
    }

    /// `v` rebuilt with object members inserted in sorted order (so that serde_json's
    /// printer sorts them whatever its map type).
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut members: Vec<_> = m.iter().collect();
                members.sort_by(|a, b| a.0.cmp(b.0));
                Value::Object(
                    members
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sorted(v)))
                        .collect(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }

    /// Equal, treating any two floats as equal.
    fn json_shape_eq(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => true,
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_shape_eq(a, b))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .all(|(k, v)| y.get(k).is_some_and(|w| json_shape_eq(v, w)))
            }
            _ => a == b,
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec((any::<String>(), inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// A DAG on `n` nodes from (i, j) pairs oriented low → high index.
    fn dag(n: usize, pairs: &[(usize, usize)]) -> (Value, Vec<(usize, usize)>) {
        let id = |i: usize| format!("n{i:03}");
        let mut edges: Vec<(usize, usize)> = pairs
            .iter()
            .map(|&(a, b)| (a % n, b % n))
            .filter(|(a, b)| a != b)
            .map(|(a, b)| (a.min(b), a.max(b)))
            .collect();
        edges.sort_unstable();
        edges.dedup();
        let nodes: Map<String, Value> = (0..n)
            .map(|i| {
                (
                    id(i),
                    json!({"type": NodeType::ALL[i % 6].as_str(), "config": {"i": i}}),
                )
            })
            .collect();
        let edges_json: Vec<Value> = edges
            .iter()
            .map(|&(a, b)| json!({"from": id(a), "to": id(b)}))
            .collect();
        (json!({"nodes": nodes, "edges": edges_json}), edges)
    }

    proptest! {
        #[test]
        fn canonical_json_matches_serde_json_on_sorted_values(v in arb_json()) {
            let c = canonical_json_by_hand(&v);
            prop_assert_eq!(&c, &serde_json::to_string(&sorted(&v)).unwrap());
            prop_assert_eq!(&c, &canonical_json_verbatim_numbers(&v), "the fast path gives the same text");
            // The size check counts exactly the compact serialization's bytes.
            prop_assert!(fits_in(&v, c.len()));
            prop_assert!(!fits_in(&v, c.len() - 1));
            // Re-parsing gives the same value up to floats: serde_json's default float parser
            // is not correctly rounded for some extreme values (its `float_roundtrip` feature
            // is), so compare through a float-free projection.
            let back: Value = serde_json::from_str(&c).unwrap();
            prop_assert!(json_shape_eq(&back, &v));
        }

        #[test]
        fn random_dags_validate_and_back_edges_fail(
            n in 1usize..40,
            pairs in prop::collection::vec((any::<usize>(), any::<usize>()), 0..120),
            back in any::<usize>(),
        ) {
            let (doc, edges) = dag(n, &pairs);
            let d = validate(&doc, &Limits::default()).unwrap();
            prop_assert_eq!(check(&doc, &Limits::default()), Ok(()));
            let id = |i: usize| format!("n{i:03}");
            let with_preds: std::collections::BTreeSet<usize> = edges.iter().map(|e| e.1).collect();
            let roots: Vec<String> = (0..n).filter(|i| !with_preds.contains(i)).map(id).collect();
            prop_assert_eq!(d.roots(), roots.as_slice());
            for &(a, b) in &edges {
                prop_assert!(d.successors(&id(a)).unwrap().contains(&id(b)));
                prop_assert!(d.predecessors(&id(b)).unwrap().contains(&id(a)));
            }
            let total: usize = (0..n).map(|i| d.successors(&id(i)).unwrap().len()).sum();
            prop_assert_eq!(total, edges.len());
            let pos: HashMap<&str, usize> =
                d.topological_order().iter().enumerate().map(|(i, s)| (s.as_str(), i)).collect();
            prop_assert_eq!(pos.len(), n);
            for &(a, b) in &edges {
                prop_assert!(pos[id(a).as_str()] < pos[id(b).as_str()]);
            }

            // Close a path with a back edge: pick an edge start `a`, follow successors to
            // some `z`, add z -> a.
            if !edges.is_empty() {
                let (a, mut z) = edges[back % edges.len()];
                let mut steps = back / edges.len().max(1);
                while steps % 3 != 0 {
                    match edges.iter().find(|e| e.0 == z) { Some(e) => z = e.1, None => break }
                    steps /= 3;
                }
                let mut cyclic = doc.clone();
                cyclic["edges"].as_array_mut().unwrap().push(json!({"from": id(z), "to": id(a)}));
                let e = validate(&cyclic, &Limits::default()).unwrap_err();
                prop_assert_eq!(check(&cyclic, &Limits::default()), Err(e.clone()));
                let DefinitionError::Cycle { nodes } = e else {
                    return Err(TestCaseError::fail(format!("expected a cycle, got {e}")));
                };
                // The reported nodes really form a cycle in the graph.
                prop_assert!(nodes.len() >= 2);
                let mut all_edges: Vec<(String, String)> = edges.iter().map(|&(x, y)| (id(x), id(y))).collect();
                all_edges.push((id(z), id(a)));
                for k in 0..nodes.len() {
                    let next = &nodes[(k + 1) % nodes.len()];
                    prop_assert!(all_edges.contains(&(nodes[k].clone(), next.clone())), "{:?}", nodes);
                }
            }
        }
    }
}
