//! A tool's arguments typed from the tool's own JSON Schema, before policy sees them.
//!
//! Cedar types every argument strictly: `Long` is not `decimal`, a missing attribute is
//! not a null one, a string is not a set. Models send what the tool's JSON Schema
//! accepts, and JSON Schema is looser: `5` is a `number`, `5.0` is an `integer`, an
//! optional argument may be sent as `null`. Replaying recorded tool calls through careful
//! policies, most wrongful denials were such typing, not policy. So each tool's schema
//! (an MCP server's `inputSchema`, or the catalog's `input_schema`) is compiled once
//! into a [`Schema`], and every call's arguments are normalized against it into the form
//! policy is written against:
//!
//! - a JSON number where the schema says `number` becomes a float (`5` → `5.0`), so Cedar
//!   reads it as `decimal`; where it says `integer`, a whole float becomes an integer
//!   (`5.0` → `5`), so Cedar reads `Long`. Only values a float holds exactly (up to 2^53)
//!   are converted; no value changes.
//! - `null` for an argument that is not required, or whose schema admits `null`, is
//!   removed: to policy, null is no value, as it is to the tools that emit these
//!   schemas (`Optional[str] = None`). Cedar has no null. Conversely a required argument
//!   whose schema admits `null` may be absent.
//! - a single value where the schema accepts both it and an array of it (`anyOf`,
//!   `oneOf` or a `type` list with an array whose items accept the value) becomes a
//!   one-element array, so a policy sees one type (`Set<String>`), not two.
//!
//! Nothing else is coerced: `"12"` for a number is refused, as the tool would refuse it.
//! What does not fit is an [`ArgError`] naming the argument by JSON pointer, what was
//! expected and what came.
//!
//! What is checked and what is not. Warden needs the *types* right, because policy reads
//! them; the upstream tool validates its input fully. Checked: `type` (a name or a list,
//! and OpenAPI's `nullable: true`), `properties`, `required`, `additionalProperties`
//! (anything is allowed unless it says otherwise, as JSON Schema says), `items`,
//! `prefixItems` (and draft-07's list form of `items` with `additionalItems`), `enum`,
//! `const`, `allOf`, `anyOf`, `oneOf`, and `$ref` within the schema (`#/$defs/...`,
//! `#/definitions/...`, any `#/...` pointer). `enum` and `const` are checked because
//! they close the vocabulary policies compare against, by plain equality. Not checked,
//! deliberately: `format` (an annotation by default in 2020-12, and its meaning differs
//! between validators), `pattern` (ECMA-262 regular expressions, a dialect Rust's regex
//! engines do not share, from an untrusted schema), and the value bounds (`minimum`,
//! `maxLength`, `minItems`, `multipleOf`, ...): a bound is a policy question, and Cedar
//! rules state the bounds Warden enforces. A second, subtly different validator would
//! only refuse calls the tool accepts. `oneOf` is read as `anyOf` (exclusivity is such a
//! validation detail), and `not`, `if`/`then`/`else`, `dependent*`, `contains`,
//! `propertyNames` and `unevaluated*` are ignored. With `patternProperties` present,
//! undeclared properties are let through unchecked: without the patterns Warden cannot
//! tell which rule governs them, and refusing would refuse valid calls. Annotations
//! (`title`, `description`, `default`, `examples`, ...) are ignored.
//!
//! Hand-written rather than a crate: validators (`jsonschema`, the most complete) answer
//! whether a value is valid and where it is not, but not which `anyOf` branch a value
//! took or what it should be converted to, which is the point here; and `jsonschema`
//! brings a regex engine, URL and IDNA handling, an HTTP client feature for remote
//! references and more, which costs compile time on this project's two cores for
//! features Warden deliberately does not use.
//!
//! Where schemas come from, and which wins. The catalog may declare a tool's
//! `input_schema` (config, `[[tools]]`); the pipeline applies it to every call of that
//! action, whichever transport brought it, after scope and data boundary and before
//! Cedar. An MCP gateway has the schema the server declares in `tools/list`; it compiles
//! it once per tool, normalizes each call with it before asking the gate, and turns an
//! error into the call's refusal (`pipeline::Refusal::misfit`, or
//! `Refusal::unusable_schema` for a schema that does not compile: calls that cannot be
//! typed are refused, not judged untyped). When both exist, both apply, the server's
//! first: a call must fit what the server accepts and what the operator declared, and
//! the catalog's schema, applied last, has the final word on the types policy reads,
//! since it is the operator's and the Cedar schema is written against it (a server's
//! `tools/list` is untrusted input and may change under a running gateway). A gateway
//! should forward the arguments as the client sent them (after path resolution): the
//! normalized form is policy's reading of them, the same values under the schema, except
//! that a null for a required argument whose schema admits null reads as absent, which
//! the tool itself (pydantic's required `x: str | None`) would refuse.
//!
//! Bounded, because a server's `tools/list` is untrusted input: a schema nests at most
//! [`MAX_DEPTH`] levels (references included, recursive ones refused), compiles to at
//! most [`MAX_NODES`] nodes with at most [`MAX_ENUM_VALUES`] enumerated values, and one
//! normalization takes at most [`MAX_STEPS`] steps (each schema node applied to a value
//! is one; `anyOf` branches tried count too).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Number, Value};

/// How deeply schemas may nest, `$ref` expansions included. Tool schemas that models
/// fill in are shallow (pydantic models nest a few levels).
pub const MAX_DEPTH: usize = 48;
/// How many distinct schema nodes one tool's schema may compile to.
pub const MAX_NODES: usize = 10_000;
/// How many `enum`/`const` values one schema may hold in total.
pub const MAX_ENUM_VALUES: usize = 10_000;
/// How many steps one normalization may take.
pub const MAX_STEPS: u32 = 1_000_000;

/// Integers a float holds exactly: beyond 2^53 a conversion would change the value.
const EXACT_IN_F64: u64 = 1 << 53;

/// A schema that cannot be used, with where in it the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("input schema at `{pointer}`: {message}")]
pub struct SchemaError {
    /// JSON pointer into the schema (`""` is the whole schema).
    pub pointer: String,
    pub message: String,
}

/// Arguments that do not fit the schema: which one, what was expected, what came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgError {
    /// JSON pointer into the arguments (`/recipients/2`; `""` is the arguments object).
    pub pointer: String,
    pub expected: String,
    pub got: String,
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.pointer.is_empty() {
            write!(f, "arguments: expected {}, got {}", self.expected, self.got)
        } else {
            write!(
                f,
                "argument `{}`: expected {}, got {}",
                self.pointer, self.expected, self.got
            )
        }
    }
}

impl std::error::Error for ArgError {}

/// A compiled input schema. Cloning is cheap (the nodes are shared), so one compiled
/// schema serves every call to its tool.
#[derive(Clone)]
pub struct Schema {
    root: Arc<Node>,
    nodes: usize,
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schema")
            .field("nodes", &self.nodes)
            .finish_non_exhaustive()
    }
}

impl Schema {
    /// Compiles a JSON Schema (2020-12 or draft-07, as MCP servers emit them).
    pub fn compile(schema: &Value) -> Result<Schema, SchemaError> {
        let mut c = Compiler {
            root: schema,
            nodes: 0,
            enum_values: 0,
            refs: HashMap::new(),
            expanding: Vec::new(),
        };
        let root = c.node(schema, &mut String::new(), 0)?;
        Ok(Schema {
            root,
            nodes: c.nodes,
        })
    }

    /// Normalizes `args` in place (see the module documentation). On error `args` is
    /// left as it was.
    pub fn normalize(&self, args: &mut Value) -> Result<(), ArgError> {
        if let Some(new) = self.walk(args)? {
            *args = new;
        }
        Ok(())
    }

    /// The normalized form of `args`, borrowed when nothing needs to change (the common
    /// case for well-typed calls: no copy).
    pub fn normalized<'a>(&self, args: &'a Value) -> Result<Cow<'a, Value>, ArgError> {
        Ok(match self.walk(args)? {
            Some(new) => Cow::Owned(new),
            None => Cow::Borrowed(args),
        })
    }

    fn walk(&self, args: &Value) -> Result<Option<Value>, ArgError> {
        let mut steps = MAX_STEPS;
        self.root
            .apply(args, &Path::Root, &mut steps)
            .map_err(|f| match f {
                Fail::Arg(e) => e,
                Fail::Budget => ArgError {
                    pointer: String::new(),
                    expected: format!("arguments this schema can check in {MAX_STEPS} steps"),
                    got: "more".to_owned(),
                },
            })
    }
}

// ---------------------------------------------------------------- compiled nodes

/// JSON types as a bit set.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Types(u8);

impl Types {
    const NULL: u8 = 1;
    const BOOLEAN: u8 = 2;
    const INTEGER: u8 = 4;
    const NUMBER: u8 = 8;
    const STRING: u8 = 16;
    const ARRAY: u8 = 32;
    const OBJECT: u8 = 64;
    const NAMES: [(u8, &'static str); 7] = [
        (Self::NULL, "null"),
        (Self::BOOLEAN, "boolean"),
        (Self::INTEGER, "integer"),
        (Self::NUMBER, "number"),
        (Self::STRING, "string"),
        (Self::ARRAY, "array"),
        (Self::OBJECT, "object"),
    ];

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    fn parse(name: &str) -> Option<u8> {
        Self::NAMES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(b, _)| *b)
    }

    /// Whether a value of JSON type `of` fits (an integer fits `number` too).
    fn admit(self, of: u8) -> bool {
        self.has(of) || (of == Self::INTEGER && self.has(Self::NUMBER))
    }

    fn describe(self) -> String {
        let names: Vec<&str> = Self::NAMES
            .iter()
            .filter(|(b, _)| self.has(*b))
            .map(|(_, n)| *n)
            .collect();
        names.join(" or ")
    }
}

/// The JSON type of a value, for [`Types::admit`]: a number with no fractional part is
/// an integer, as JSON Schema says (`5.0` is an integer).
fn type_of(v: &Value) -> u8 {
    match v {
        Value::Null => Types::NULL,
        Value::Bool(_) => Types::BOOLEAN,
        Value::Number(n) if is_whole(n) => Types::INTEGER,
        Value::Number(_) => Types::NUMBER,
        Value::String(_) => Types::STRING,
        Value::Array(_) => Types::ARRAY,
        Value::Object(_) => Types::OBJECT,
    }
}

fn is_whole(n: &Number) -> bool {
    n.is_i64()
        || n.is_u64()
        || n.as_f64()
            .is_some_and(|f| f.is_finite() && f.fract() == 0.0)
}

#[derive(Debug)]
enum Additional {
    Any,
    Forbidden,
    Schema(Arc<Node>),
}

#[derive(Debug)]
struct Prop {
    node: Arc<Node>,
    required: bool,
}

#[derive(Debug)]
struct ObjectRules {
    properties: BTreeMap<String, Prop>,
    /// Required names with no entry in `properties` (governed by `additional`).
    required_elsewhere: BTreeSet<String>,
    additional: Additional,
    /// How many properties are required and may not be absent (their schema refuses
    /// null).
    must_have: usize,
}

#[derive(Debug)]
struct ArrayRules {
    prefix: Vec<Arc<Node>>,
    /// For elements past `prefix`; `None` lets them through.
    rest: Option<Arc<Node>>,
}

#[derive(Debug, Default)]
struct Node {
    /// The `false` schema: nothing fits.
    never: bool,
    types: Option<Types>,
    enumeration: Option<Vec<Value>>,
    object: Option<ObjectRules>,
    array: Option<ArrayRules>,
    all_of: Vec<Arc<Node>>,
    /// `anyOf` and `oneOf` lists (each must have a branch that fits).
    alternatives: Vec<Vec<Arc<Node>>>,
    /// Whether `null` fits this node, so "absent" can stand for it.
    admits_null: bool,
    /// Whether this node names `array` as a type, itself or in a branch: only then may a
    /// lone value become an array of one.
    takes_arrays: bool,
    /// Levels below this node (1 for a leaf), to bound the depth of shared subtrees.
    height: usize,
}

impl Node {
    fn any() -> Node {
        Node {
            admits_null: true,
            height: 1,
            ..Node::default()
        }
    }

    /// Whether applying this node can neither fail nor change a value: `{}`, `true`, or
    /// a schema of annotations only. Such nodes are skipped without a step.
    fn is_any(&self) -> bool {
        !self.never
            && self.types.is_none()
            && self.enumeration.is_none()
            && self.object.is_none()
            && self.array.is_none()
            && self.all_of.is_empty()
            && self.alternatives.is_empty()
    }

    fn compute_admits_null(&self) -> bool {
        !self.never
            && self.types.is_none_or(|t| t.has(Types::NULL))
            && self
                .enumeration
                .as_ref()
                .is_none_or(|e| e.iter().any(Value::is_null))
            && self.all_of.iter().all(|n| n.admits_null)
            && self
                .alternatives
                .iter()
                .all(|alts| alts.iter().any(|n| n.admits_null))
    }

    /// What this node expects, for error messages.
    fn expected(&self) -> String {
        if self.never {
            return "no value at all (the schema allows none here)".to_owned();
        }
        if let Some(values) = &self.enumeration {
            let shown: Vec<String> = values.iter().take(6).map(excerpt).collect();
            let more = if values.len() > 6 { ", ..." } else { "" };
            return if values.len() == 1 {
                format!("exactly {}", shown.join(""))
            } else {
                format!("one of {}{more}", shown.join(", "))
            };
        }
        if let Some(t) = self.types {
            return t.describe();
        }
        if let Some(alts) = self.alternatives.first() {
            return expected_of(alts);
        }
        if let Some(first) = self.all_of.first() {
            return first.expected();
        }
        "any value".to_owned()
    }

    /// Applies this node to `v`: `Ok(None)` if `v` fits as it is, `Ok(Some(new))` if it
    /// fits once normalized.
    fn apply(&self, v: &Value, at: &Path<'_>, steps: &mut u32) -> Result<Option<Value>, Fail> {
        if self.is_any() {
            return Ok(None);
        }
        *steps = steps.checked_sub(1).ok_or(Fail::Budget)?;
        let out = self.apply_once(v, at, steps)?;
        // The schema takes this lone value; if it takes it as an array of one as well,
        // that is the form policy reads (one Cedar type, `Set<...>`, not two).
        if self.takes_arrays && !v.is_array() && !v.is_null() {
            let single = Value::Array(vec![v.clone()]);
            match self.apply_once(&single, at, steps) {
                Ok(new) => return Ok(Some(new.unwrap_or(single))),
                Err(Fail::Budget) => return Err(Fail::Budget),
                Err(Fail::Arg(_)) => {}
            }
        }
        Ok(out)
    }

    fn apply_once(&self, v: &Value, at: &Path<'_>, steps: &mut u32) -> Result<Option<Value>, Fail> {
        if self.never {
            return Err(self.mismatch(v, at));
        }
        let Some(t) = self.types else {
            return self.apply_rest(v, at, steps);
        };
        if !t.admit(type_of(v)) {
            return Err(self.mismatch(v, at));
        }
        match convert_number(t, v) {
            Some(n) => Ok(Some(self.apply_rest(&n, at, steps)?.unwrap_or(n))),
            None => self.apply_rest(v, at, steps),
        }
    }

    /// Everything but `type`: `enum`, the object and array rules, `allOf`, `anyOf` and
    /// `oneOf`, each applied to the value as the one before left it.
    fn apply_rest(&self, v: &Value, at: &Path<'_>, steps: &mut u32) -> Result<Option<Value>, Fail> {
        if let Some(values) = &self.enumeration {
            // Each candidate compared is a step: a long `enum` applied to every element
            // of a long array must not escape the budget.
            let cost = u32::try_from(values.len()).unwrap_or(u32::MAX);
            *steps = steps.checked_sub(cost).ok_or(Fail::Budget)?;
            if !values.iter().any(|e| json_eq(e, v)) {
                return Err(self.mismatch(v, at));
            }
        }
        let mut cur: Option<Value> = None;
        if let (Some(rules), Value::Object(m)) = (&self.object, v) {
            cur = rules.apply(m, at, steps)?.map(Value::Object);
        }
        if let (Some(rules), Value::Array(items)) = (&self.array, v) {
            cur = rules.apply(items, at, steps)?.map(Value::Array);
        }
        for n in &self.all_of {
            if let Some(new) = n.apply(cur.as_ref().unwrap_or(v), at, steps)? {
                cur = Some(new);
            }
        }
        for alts in &self.alternatives {
            if let Some(new) = self.choose(alts, cur.as_ref().unwrap_or(v), at, steps)? {
                cur = Some(new);
            }
        }
        Ok(cur)
    }

    /// The first branch `v` fits.
    fn choose(
        &self,
        alts: &[Arc<Node>],
        v: &Value,
        at: &Path<'_>,
        steps: &mut u32,
    ) -> Result<Option<Value>, Fail> {
        let mut errors: Vec<ArgError> = Vec::new();
        for alt in alts {
            match alt.apply(v, at, steps) {
                Ok(new) => return Ok(new),
                Err(Fail::Budget) => return Err(Fail::Budget),
                Err(Fail::Arg(e)) => errors.push(e),
            }
        }
        // The deepest complaint says the most ("/a/3: expected string"); when all stop
        // at this value, say what any branch would have taken.
        let here = at.render();
        let deepest = errors.into_iter().max_by_key(|e| e.pointer.len());
        Err(match deepest {
            Some(e) if e.pointer.len() > here.len() => Fail::Arg(e),
            _ => Fail::Arg(ArgError {
                pointer: here,
                expected: expected_of(alts),
                got: describe(v),
            }),
        })
    }

    fn mismatch(&self, v: &Value, at: &Path<'_>) -> Fail {
        Fail::Arg(ArgError {
            pointer: at.render(),
            expected: self.expected(),
            got: describe(v),
        })
    }
}

/// What any of `alts` would take, each named once.
fn expected_of(alts: &[Arc<Node>]) -> String {
    let mut names: Vec<String> = Vec::new();
    for a in alts {
        let e = a.expected();
        if !names.contains(&e) {
            names.push(e);
        }
    }
    names.join(" or ")
}

impl ObjectRules {
    fn apply(
        &self,
        m: &Map<String, Value>,
        at: &Path<'_>,
        steps: &mut u32,
    ) -> Result<Option<Map<String, Value>>, Fail> {
        // Changes by key, in the object's order: `None` removes the key.
        let mut changes: Vec<(&str, Option<Value>)> = Vec::new();
        // Required arguments that may not be absent, seen: such an argument is never
        // removed below (a null one is refused), so counting them is enough.
        let mut held = 0;
        for (k, v) in m {
            let here = Path::Key(at, k);
            let prop = self.properties.get(k.as_str());
            if prop.is_some_and(|p| p.required && !p.node.admits_null) {
                held += 1;
            }
            if v.is_null() {
                let (required, admits_null) = match prop {
                    Some(p) => (p.required, p.node.admits_null),
                    None => (
                        self.required_elsewhere.contains(k.as_str()),
                        self.additional_admits_null(),
                    ),
                };
                if !required || admits_null {
                    changes.push((k, None));
                    continue;
                }
            }
            let node = match (prop, &self.additional) {
                (Some(p), _) => &p.node,
                (None, Additional::Any) => continue,
                (None, Additional::Schema(n)) => n,
                (None, Additional::Forbidden) => {
                    return Err(Fail::Arg(ArgError {
                        pointer: here.render(),
                        expected: "no argument of this name (the schema allows no others)"
                            .to_owned(),
                        got: describe(v),
                    }))
                }
            };
            if let Some(new) = node.apply(v, &here, steps)? {
                changes.push((k, Some(new)));
            }
        }
        if held < self.must_have {
            for (k, p) in &self.properties {
                if p.required && !p.node.admits_null && !m.contains_key(k) {
                    return Err(missing(at, k, p.node.expected()));
                }
            }
        }
        // Likewise never removed: a null for one of these is refused above.
        if !self.additional_admits_null() {
            for k in &self.required_elsewhere {
                if !m.contains_key(k) {
                    return Err(missing(at, k, "a value".to_owned()));
                }
            }
        }
        if changes.is_empty() {
            return Ok(None);
        }
        let mut out = Map::with_capacity(m.len());
        let mut pending = changes.into_iter().peekable();
        for (k, v) in m {
            match pending.next_if(|(c, _)| *c == k.as_str()) {
                Some((_, Some(new))) => {
                    out.insert(k.clone(), new);
                }
                Some((_, None)) => {}
                None => {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
        Ok(Some(out))
    }
}

impl ObjectRules {
    /// Whether `null` fits an undeclared property, so that absent can stand for it.
    fn additional_admits_null(&self) -> bool {
        match &self.additional {
            Additional::Any => true,
            Additional::Schema(n) => n.admits_null,
            Additional::Forbidden => false,
        }
    }
}

fn missing(at: &Path<'_>, key: &str, expected: String) -> Fail {
    Fail::Arg(ArgError {
        pointer: Path::Key(at, key).render(),
        expected: format!("{expected} (the argument is required)"),
        got: "nothing".to_owned(),
    })
}

impl ArrayRules {
    fn apply(
        &self,
        items: &[Value],
        at: &Path<'_>,
        steps: &mut u32,
    ) -> Result<Option<Vec<Value>>, Fail> {
        let mut changes: Vec<(usize, Value)> = Vec::new();
        for (i, v) in items.iter().enumerate() {
            let Some(node) = self.prefix.get(i).or(self.rest.as_ref()) else {
                break;
            };
            if let Some(new) = node.apply(v, &Path::Index(at, i), steps)? {
                changes.push((i, new));
            }
        }
        if changes.is_empty() {
            return Ok(None);
        }
        let mut out = items.to_vec();
        for (i, new) in changes {
            if let Some(slot) = out.get_mut(i) {
                *slot = new;
            }
        }
        Ok(Some(out))
    }
}

/// `5` for a `number` becomes `5.0`; `5.0` for an `integer` becomes `5`. Only where the
/// schema names one of the two, and only values a float holds exactly.
fn convert_number(t: Types, v: &Value) -> Option<Value> {
    let Value::Number(n) = v else { return None };
    let (int, num) = (t.has(Types::INTEGER), t.has(Types::NUMBER));
    if num && !int {
        let exact = n
            .as_i64()
            .map(|i| i.unsigned_abs())
            .or(n.as_u64())
            .filter(|a| *a <= EXACT_IN_F64)?;
        let f = if let Some(i) = n.as_i64() {
            i as f64
        } else {
            exact as f64
        };
        return Number::from_f64(f).map(Value::Number);
    }
    if int && !num && !n.is_i64() && !n.is_u64() {
        let f = n.as_f64()?;
        if f.is_finite() && f.fract() == 0.0 && f.abs() <= EXACT_IN_F64 as f64 {
            return Some(Value::from(f as i64));
        }
    }
    None
}

/// Equality as JSON Schema defines it for `enum` and `const`: numbers by value (`1` is
/// `1.0`), objects regardless of key order.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => match (x.as_u64(), y.as_u64()) {
                (Some(i), Some(j)) => i == j,
                _ => x.as_f64() == y.as_f64(),
            },
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, a)| y.get(k).is_some_and(|b| json_eq(a, b)))
        }
        _ => a == b,
    }
}

/// A value as error messages show it: the type and, for scalars, a short excerpt.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(_) => format!("string {}", excerpt(v)),
        Value::Array(a) => format!("an array of {}", a.len()),
        Value::Object(_) => "an object".to_owned(),
    }
}

/// A scalar as JSON text, cut to 40 characters and escaped, because it ends up in a
/// message the agent reads and operators see.
fn excerpt(v: &Value) -> String {
    const MAX: usize = 40;
    match v {
        Value::String(s) => {
            let cut: String = s.chars().take(MAX).collect();
            let more = if s.chars().count() > MAX { "..." } else { "" };
            format!("\"{}{more}\"", cut.escape_debug())
        }
        Value::Array(_) | Value::Object(_) => describe(v),
        other => other.to_string(),
    }
}

/// Why a walk stopped.
enum Fail {
    Arg(ArgError),
    /// Out of steps: not the arguments' fault alone, so no branch may swallow it.
    Budget,
}

/// Where in the arguments a walk is, rendered as a JSON pointer only for errors.
enum Path<'a> {
    Root,
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl Path<'_> {
    fn render(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            Path::Root => {}
            Path::Key(up, k) => {
                up.write(out);
                out.push('/');
                // RFC 6901 escaping; control characters escaped for the reader.
                let escaped = k.replace('~', "~0").replace('/', "~1");
                let cut: String = escaped.chars().take(64).collect();
                out.push_str(&cut.escape_debug().to_string());
                if escaped.chars().count() > 64 {
                    out.push_str("...");
                }
            }
            Path::Index(up, i) => {
                up.write(out);
                out.push('/');
                out.push_str(&i.to_string());
            }
        }
    }
}

// ---------------------------------------------------------------- compiling

struct Compiler<'s> {
    root: &'s Value,
    nodes: usize,
    enum_values: usize,
    /// Compiled `$ref` targets, by reference: each is compiled once and shared, so a
    /// schema cannot multiply its size by referring to one definition many times.
    refs: HashMap<String, Arc<Node>>,
    /// References being expanded right now: meeting one again is a cycle.
    expanding: Vec<String>,
}

/// Keywords that would change what a value must be but that this module cannot honour.
const UNSUPPORTED: [&str; 3] = ["$dynamicRef", "$recursiveRef", "$dynamicAnchor"];

impl<'s> Compiler<'s> {
    fn err(&self, at: &str, message: impl Into<String>) -> SchemaError {
        SchemaError {
            pointer: at.to_owned(),
            message: message.into(),
        }
    }

    fn node(
        &mut self,
        s: &'s Value,
        at: &mut String,
        depth: usize,
    ) -> Result<Arc<Node>, SchemaError> {
        if depth >= MAX_DEPTH {
            return Err(self.err(at, format!("nests deeper than {MAX_DEPTH} levels")));
        }
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(self.err(at, format!("has more than {MAX_NODES} subschemas")));
        }
        let obj = match s {
            Value::Bool(true) => return Ok(Arc::new(Node::any())),
            Value::Bool(false) => {
                return Ok(Arc::new(Node {
                    never: true,
                    height: 1,
                    ..Node::default()
                }))
            }
            Value::Object(o) => o,
            _ => return Err(self.err(at, "a schema must be an object or a boolean")),
        };
        for k in UNSUPPORTED {
            if obj.contains_key(k) {
                return Err(self.err(at, format!("`{k}` is not supported")));
            }
        }
        let mut n = Node::default();
        if let Some(t) = obj.get("type") {
            n.types = Some(self.types(t, at)?);
        }
        if obj.get("nullable") == Some(&Value::Bool(true)) {
            n.types = n.types.map(|t| Types(t.0 | Types::NULL));
        }
        if let Some(values) = obj.get("enum") {
            let Value::Array(values) = values else {
                return Err(self.err(at, "`enum` must be an array"));
            };
            n.enumeration = Some(self.enum_values(values.clone(), at)?);
        }
        if let Some(c) = obj.get("const") {
            let values = self.enum_values(vec![c.clone()], at)?;
            n.enumeration = Some(match n.enumeration.take() {
                // Both: only values in both fit.
                Some(e) => values
                    .into_iter()
                    .filter(|c| e.iter().any(|x| json_eq(x, c)))
                    .collect(),
                None => values,
            });
        }
        let mut children: Vec<Arc<Node>> = Vec::new();
        n.object = self.object_rules(obj, at, depth, &mut children)?;
        n.array = self.array_rules(obj, at, depth, &mut children)?;
        if let Some(list) = obj.get("allOf") {
            n.all_of = self.list(list, "allOf", at, depth)?;
            children.extend(n.all_of.iter().cloned());
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(list) = obj.get(key) {
                let alts = self.list(list, key, at, depth)?;
                children.extend(alts.iter().cloned());
                n.alternatives.push(alts);
            }
        }
        if let Some(r) = obj.get("$ref") {
            let Value::String(r) = r else {
                return Err(self.err(at, "`$ref` must be a string"));
            };
            // 2020-12 applies `$ref` beside its sibling keywords, as `allOf` would.
            let target = self.reference(r, at, depth)?;
            children.push(target.clone());
            n.all_of.push(target);
        }
        // `{}` (say, a `$ref` to an annotation) decides nothing; leave it out.
        n.all_of.retain(|c| !c.is_any());
        n.height = 1 + children.iter().map(|c| c.height).max().unwrap_or(0);
        if depth + n.height > MAX_DEPTH {
            return Err(self.err(at, format!("nests deeper than {MAX_DEPTH} levels")));
        }
        n.admits_null = n.compute_admits_null();
        n.takes_arrays = match n.types {
            Some(t) => t.has(Types::ARRAY),
            None => {
                n.all_of.iter().any(|c| c.takes_arrays)
                    || n.alternatives.iter().flatten().any(|c| c.takes_arrays)
            }
        };
        if n.is_any() {
            n = Node::any();
        }
        Ok(Arc::new(n))
    }

    fn types(&self, t: &Value, at: &str) -> Result<Types, SchemaError> {
        let names: Vec<&Value> = match t {
            Value::String(_) => vec![t],
            Value::Array(list) if !list.is_empty() => list.iter().collect(),
            _ => return Err(self.err(at, "`type` must be a type name or a non-empty list of them")),
        };
        let mut bits = 0;
        for name in names {
            let bit = name
                .as_str()
                .and_then(Types::parse)
                .ok_or_else(|| self.err(at, format!("`type` {name} is not a JSON Schema type")))?;
            bits |= bit;
        }
        Ok(Types(bits))
    }

    fn enum_values(&mut self, values: Vec<Value>, at: &str) -> Result<Vec<Value>, SchemaError> {
        self.enum_values += values.len();
        if self.enum_values > MAX_ENUM_VALUES {
            return Err(self.err(
                at,
                format!("holds more than {MAX_ENUM_VALUES} enumerated values"),
            ));
        }
        Ok(values)
    }

    fn sub(
        &mut self,
        s: &'s Value,
        at: &mut String,
        keys: &[&str],
        depth: usize,
    ) -> Result<Arc<Node>, SchemaError> {
        let len = at.len();
        for k in keys {
            at.push('/');
            at.push_str(&k.replace('~', "~0").replace('/', "~1"));
        }
        let r = self.node(s, at, depth + 1);
        at.truncate(len);
        r
    }

    fn list(
        &mut self,
        list: &'s Value,
        key: &str,
        at: &mut String,
        depth: usize,
    ) -> Result<Vec<Arc<Node>>, SchemaError> {
        let Value::Array(items) = list else {
            return Err(self.err(at, format!("`{key}` must be an array of schemas")));
        };
        if items.is_empty() {
            return Err(self.err(at, format!("`{key}` must not be empty")));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, s)| self.sub(s, at, &[key, &i.to_string()], depth))
            .collect()
    }

    fn object_rules(
        &mut self,
        obj: &'s Map<String, Value>,
        at: &mut String,
        depth: usize,
        children: &mut Vec<Arc<Node>>,
    ) -> Result<Option<ObjectRules>, SchemaError> {
        let props = obj.get("properties");
        let required = obj.get("required");
        let additional = obj.get("additionalProperties");
        if props.is_none() && required.is_none() && additional.is_none() {
            return Ok(None);
        }
        let mut rules = ObjectRules {
            properties: BTreeMap::new(),
            required_elsewhere: BTreeSet::new(),
            additional: Additional::Any,
            must_have: 0,
        };
        if let Some(p) = props {
            let Value::Object(p) = p else {
                return Err(self.err(at, "`properties` must be an object"));
            };
            for (k, s) in p {
                let node = self.sub(s, at, &["properties", k], depth)?;
                children.push(node.clone());
                rules.properties.insert(
                    k.clone(),
                    Prop {
                        node,
                        required: false,
                    },
                );
            }
        }
        if let Some(r) = required {
            let Value::Array(r) = r else {
                return Err(self.err(at, "`required` must be an array of names"));
            };
            for name in r {
                let Value::String(name) = name else {
                    return Err(self.err(at, "`required` must be an array of names"));
                };
                match rules.properties.get_mut(name) {
                    Some(p) => p.required = true,
                    None => {
                        rules.required_elsewhere.insert(name.clone());
                    }
                }
            }
        }
        rules.must_have = rules
            .properties
            .values()
            .filter(|p| p.required && !p.node.admits_null)
            .count();
        // Without the patterns, which rule governs an undeclared name is unknown:
        // let it through rather than refuse a valid call.
        if !obj.contains_key("patternProperties") {
            rules.additional = match additional {
                None | Some(Value::Bool(true)) => Additional::Any,
                Some(Value::Bool(false)) => Additional::Forbidden,
                Some(s) => {
                    let node = self.sub(s, at, &["additionalProperties"], depth)?;
                    children.push(node.clone());
                    if node.is_any() {
                        Additional::Any
                    } else {
                        Additional::Schema(node)
                    }
                }
            };
        }
        Ok(Some(rules))
    }

    fn array_rules(
        &mut self,
        obj: &'s Map<String, Value>,
        at: &mut String,
        depth: usize,
        children: &mut Vec<Arc<Node>>,
    ) -> Result<Option<ArrayRules>, SchemaError> {
        let mut rules = ArrayRules {
            prefix: Vec::new(),
            rest: None,
        };
        let tuple = match obj.get("prefixItems") {
            Some(p) => Some(("prefixItems", p, obj.get("items"), "items")),
            // draft-07: `items` as a list is the tuple, `additionalItems` the rest.
            None => match obj.get("items") {
                Some(p @ Value::Array(_)) => {
                    Some(("items", p, obj.get("additionalItems"), "additionalItems"))
                }
                _ => None,
            },
        };
        let rest = match tuple {
            Some((key, list, rest, rest_key)) => {
                rules.prefix = self.list(list, key, at, depth)?;
                children.extend(rules.prefix.iter().cloned());
                rest.map(|r| (r, rest_key))
            }
            None => obj.get("items").map(|r| (r, "items")),
        };
        if let Some((s, key)) = rest {
            let node = self.sub(s, at, &[key], depth)?;
            children.push(node.clone());
            rules.rest = Some(node);
        }
        if rules.prefix.is_empty() && rules.rest.as_ref().is_none_or(|n| n.is_any()) {
            return Ok(None);
        }
        Ok(Some(rules))
    }

    fn reference(&mut self, r: &str, at: &str, depth: usize) -> Result<Arc<Node>, SchemaError> {
        let Some(pointer) = r.strip_prefix('#') else {
            return Err(self.err(
                at,
                format!("`$ref` `{r}` points outside this schema; only `#/...` references are supported"),
            ));
        };
        if let Some(done) = self.refs.get(r) {
            if depth + 1 + done.height > MAX_DEPTH {
                return Err(self.err(at, format!("nests deeper than {MAX_DEPTH} levels")));
            }
            return Ok(done.clone());
        }
        if self.expanding.iter().any(|e| e == r) {
            return Err(self.err(
                at,
                format!("`$ref` `{r}` refers to itself; recursive schemas are not supported"),
            ));
        }
        let target = self
            .root
            .pointer(pointer)
            .ok_or_else(|| self.err(at, format!("`$ref` `{r}` names nothing in this schema")))?;
        self.expanding.push(r.to_owned());
        let mut there = pointer.to_owned();
        let node = self.node(target, &mut there, depth + 1);
        self.expanding.pop();
        let node = node?;
        self.refs.insert(r.to_owned(), node.clone());
        Ok(node)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    fn schema(s: Value) -> Schema {
        Schema::compile(&s).unwrap()
    }

    fn norm(s: &Schema, v: Value) -> Result<Value, String> {
        let mut v = v;
        s.normalize(&mut v).map_err(|e| e.to_string())?;
        Ok(v)
    }

    /// AgentDojo's `send_money`, as its server declares it (annotations trimmed).
    fn send_money() -> Schema {
        schema(json!({
            "type": "object",
            "properties": {
                "recipient": {"type": "string", "title": "Recipient"},
                "amount": {"type": "number", "description": "Amount of the transaction"},
                "subject": {"type": "string"},
                "date": {"type": "string"}
            },
            "required": ["recipient", "amount", "subject", "date"]
        }))
    }

    #[test]
    fn an_integer_for_a_number_becomes_a_float_that_stays_one_through_json() {
        let s = send_money();
        let out = norm(
            &s,
            json!({"recipient": "UK1", "amount": 100, "subject": "rent", "date": "2022-01-01"}),
        )
        .unwrap();
        assert_eq!(out["amount"].as_i64(), None);
        assert_eq!(out["amount"].as_f64(), Some(100.0));
        // As a remote gateway sends it to `/v1/check` and the server reads it back.
        let wire = serde_json::to_vec(&out).unwrap();
        assert!(String::from_utf8_lossy(&wire).contains("\"amount\":100.0"));
        let back = crate::json::from_slice_strict(&wire).unwrap();
        assert_eq!(back["amount"].as_i64(), None);
        assert_eq!(back, out);
        // A float stays as it was; nothing else changed.
        let same = json!({"recipient": "UK1", "amount": 98.7, "subject": "s", "date": "d"});
        assert!(matches!(s.normalized(&same).unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn a_whole_float_for_an_integer_becomes_an_integer() {
        let s = schema(json!({"properties": {"id": {"type": "integer"}}}));
        assert_eq!(norm(&s, json!({"id": 7.0})).unwrap(), json!({"id": 7}));
        assert_eq!(norm(&s, json!({"id": 7})).unwrap(), json!({"id": 7}));
        assert_eq!(
            norm(&s, json!({"id": 7.5})).unwrap_err(),
            "argument `/id`: expected integer, got number 7.5"
        );
        // Beyond 2^53 a float no longer holds every integer: such values are left alone.
        let n = schema(json!({"type": "number"}));
        let big = json!(9_007_199_254_740_993_u64);
        assert_eq!(norm(&n, big.clone()).unwrap(), big);
        assert_eq!(norm(&n, json!(-5)).unwrap().as_f64(), Some(-5.0));
        // Both named: nothing to choose, nothing converted.
        let both = schema(json!({"type": ["integer", "number"]}));
        assert_eq!(norm(&both, json!(5)).unwrap(), json!(5));
        assert_eq!(norm(&both, json!(5.0)).unwrap(), json!(5.0));
    }

    #[test]
    fn a_wrong_type_names_the_argument_what_was_expected_and_what_came() {
        let s = send_money();
        let e = norm(
            &s,
            json!({"recipient": "UK1", "amount": "12", "subject": "s", "date": "d"}),
        )
        .unwrap_err();
        assert_eq!(e, "argument `/amount`: expected number, got string \"12\"");

        let email = schema(json!({
            "type": "object",
            "properties": {"recipients": {"type": "array", "items": {"type": "string"}}},
            "required": ["recipients"]
        }));
        let e = norm(&email, json!({"recipients": ["a@x", "b@x", 5]})).unwrap_err();
        assert_eq!(e, "argument `/recipients/2`: expected string, got number 5");
        let e = norm(&email, json!({})).unwrap_err();
        assert_eq!(
            e,
            "argument `/recipients`: expected array (the argument is required), got nothing"
        );
        let e = norm(&email, json!([1])).unwrap_err();
        assert_eq!(e, "arguments: expected object, got an array of 1");
        // Keys are escaped as RFC 6901 says, control characters for the reader.
        let odd = schema(json!({"properties": {"a/b~\n": {"type": "string"}}}));
        let e = norm(&odd, json!({"a/b~\n": 1})).unwrap_err();
        assert_eq!(e, "argument `/a~1b~0\\n`: expected string, got number 1");
        // Long strings are cut.
        let long = "x".repeat(100);
        let e = norm(
            &s,
            json!({"recipient": 1, "amount": 1, "subject": long, "date": "d"}),
        )
        .unwrap_err();
        assert_eq!(e, "argument `/recipient`: expected string, got number 1");
        let e = norm(&schema(json!({"type": "integer"})), json!(long)).unwrap_err();
        assert!(e.ends_with(&format!("\"{}...\"", "x".repeat(40))), "{e}");
    }

    #[test]
    fn null_for_an_optional_argument_is_absent() {
        // AgentDojo's `update_scheduled_transaction`: pydantic's Optional[...] = None.
        let s = schema(json!({
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "amount": {"anyOf": [{"type": "number"}, {"type": "null"}], "default": null},
                "recipient": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": null},
                "note": {"type": "string"}
            },
            "required": ["id"]
        }));
        assert_eq!(
            norm(
                &s,
                json!({"id": 7, "amount": null, "recipient": "UK1", "note": null})
            )
            .unwrap(),
            json!({"id": 7, "recipient": "UK1"})
        );
        assert_eq!(
            norm(&s, json!({"id": 7, "amount": 3})).unwrap()["amount"].as_f64(),
            Some(3.0)
        );
        // A required argument may not be null unless its schema says so.
        assert_eq!(
            norm(&s, json!({"id": null})).unwrap_err(),
            "argument `/id`: expected integer, got null"
        );
        // Required, but its schema admits null (pydantic's `x: str | None`): null and
        // absent both reach policy as absent.
        let r = schema(json!({
            "properties": {"x": {"type": ["string", "null"]}},
            "required": ["x"]
        }));
        assert_eq!(norm(&r, json!({"x": null})).unwrap(), json!({}));
        assert_eq!(norm(&r, json!({})).unwrap(), json!({}));
        assert_eq!(norm(&r, json!({"x": "v"})).unwrap(), json!({"x": "v"}));
        // OpenAPI's spelling.
        let o = schema(
            json!({"properties": {"x": {"type": "string", "nullable": true}}, "required": ["x"]}),
        );
        assert_eq!(norm(&o, json!({"x": null})).unwrap(), json!({}));
        // Nulls inside arrays are values, not absences.
        let a = schema(json!({"type": "array", "items": {"type": ["string", "null"]}}));
        assert_eq!(norm(&a, json!(["a", null])).unwrap(), json!(["a", null]));
    }

    #[test]
    fn a_lone_value_becomes_a_list_only_where_the_schema_takes_both() {
        let both = schema(json!({"properties": {"to": {"anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}}
        ]}}}));
        assert_eq!(
            norm(&both, json!({"to": "a@x"})).unwrap(),
            json!({"to": ["a@x"]})
        );
        assert_eq!(
            norm(&both, json!({"to": ["a@x"]})).unwrap(),
            json!({"to": ["a@x"]})
        );
        assert_eq!(
            norm(&both, json!({"to": 5})).unwrap_err(),
            "argument `/to`: expected string or array, got number 5"
        );
        let listed = schema(json!({"type": ["string", "array"], "items": {"type": "string"}}));
        assert_eq!(norm(&listed, json!("a")).unwrap(), json!(["a"]));
        // The array's items must take the value: then it stays as it came.
        let ints = schema(json!({"type": ["string", "array"], "items": {"type": "integer"}}));
        assert_eq!(norm(&ints, json!("a")).unwrap(), json!("a"));
        // A schema that only takes a list does not get one invented.
        let only =
            schema(json!({"properties": {"to": {"type": "array", "items": {"type": "string"}}}}));
        assert_eq!(
            norm(&only, json!({"to": "a@x"})).unwrap_err(),
            "argument `/to`: expected array, got string \"a@x\""
        );
        // Nor does a value that already is a list, nor null.
        let any = schema(json!({"anyOf": [{"type": "null"}, {"type": "array"}]}));
        assert_eq!(norm(&any, json!(null)).unwrap(), json!(null));
    }

    #[test]
    fn any_of_takes_the_first_branch_that_fits_and_reports_the_deepest_complaint() {
        let s = schema(json!({"properties": {"v": {"anyOf": [
            {"type": "integer"},
            {"type": "number"},
            {"type": "object", "properties": {"n": {"type": "string"}}}
        ]}}}));
        assert_eq!(norm(&s, json!({"v": 5})).unwrap(), json!({"v": 5}));
        assert_eq!(norm(&s, json!({"v": 5.0})).unwrap(), json!({"v": 5}));
        assert_eq!(norm(&s, json!({"v": 5.5})).unwrap(), json!({"v": 5.5}));
        assert_eq!(
            norm(&s, json!({"v": {"n": 1}})).unwrap_err(),
            "argument `/v/n`: expected string, got number 1"
        );
        assert_eq!(
            norm(&s, json!({"v": true})).unwrap_err(),
            "argument `/v`: expected integer or number or object, got boolean true"
        );
        // oneOf is read as anyOf.
        let one = schema(json!({"oneOf": [{"type": "number"}, {"type": "integer"}]}));
        assert_eq!(norm(&one, json!(2)).unwrap().as_f64(), Some(2.0));
    }

    #[test]
    fn enum_const_and_refs_as_pydantic_writes_them() {
        // AgentDojo's `share_file`.
        let s = schema(json!({
            "$defs": {"SharingPermission": {"enum": ["r", "rw"], "type": "string"}},
            "properties": {
                "file_id": {"type": "string"},
                "permission": {"$ref": "#/$defs/SharingPermission", "description": "level"}
            },
            "required": ["file_id", "permission"],
            "type": "object"
        }));
        assert!(norm(&s, json!({"file_id": "1", "permission": "rw"})).is_ok());
        assert_eq!(
            norm(&s, json!({"file_id": "1", "permission": "admin"})).unwrap_err(),
            "argument `/permission`: expected one of \"r\", \"rw\", got string \"admin\""
        );
        let c = schema(
            json!({"definitions": {"K": {"const": 1}}, "items": {"$ref": "#/definitions/K"}}),
        );
        assert!(norm(&c, json!([1, 1.0])).is_ok());
        assert_eq!(
            norm(&c, json!([1, 2])).unwrap_err(),
            "argument `/1`: expected exactly 1, got number 2"
        );
        let b = schema(json!({"enum": [{"a": [1, "x"]}, null]}));
        assert!(norm(&b, json!({"a": [1.0, "x"]})).is_ok());
        assert!(norm(&b, json!({"a": [1, "y"]})).is_err());
    }

    #[test]
    fn additional_properties_are_allowed_unless_the_schema_says_otherwise() {
        let open = schema(json!({"properties": {"a": {"type": "string"}}}));
        assert!(norm(&open, json!({"a": "x", "b": 1})).is_ok());
        let closed =
            schema(json!({"properties": {"a": {"type": "string"}}, "additionalProperties": false}));
        assert_eq!(
            norm(&closed, json!({"a": "x", "b": 1})).unwrap_err(),
            "argument `/b`: expected no argument of this name (the schema allows no others), got number 1"
        );
        // A null for an undeclared, unrequired name is an absent one.
        assert_eq!(
            norm(&closed, json!({"a": "x", "b": null})).unwrap(),
            json!({"a": "x"})
        );
        let typed = schema(json!({"additionalProperties": {"type": "number"}}));
        assert_eq!(
            norm(&typed, json!({"x": 1})).unwrap()["x"].as_f64(),
            Some(1.0)
        );
        assert!(norm(&typed, json!({"x": "1"})).is_err());
        // With patternProperties, undeclared names are not judged.
        let pat = schema(
            json!({"patternProperties": {"^x": {"type": "string"}}, "additionalProperties": false}),
        );
        assert!(norm(&pat, json!({"y": 1})).is_ok());
        // A required name with no declaration must be there.
        let req = schema(json!({"required": ["k"], "additionalProperties": {"type": "string"}}));
        assert_eq!(
            norm(&req, json!({})).unwrap_err(),
            "argument `/k`: expected a value (the argument is required), got nothing"
        );
    }

    #[test]
    fn tuples_in_both_drafts() {
        let d2020 = schema(
            json!({"prefixItems": [{"type": "string"}, {"type": "number"}], "items": {"type": "boolean"}}),
        );
        assert_eq!(
            norm(&d2020, json!(["a", 1, true])).unwrap()[1].as_f64(),
            Some(1.0)
        );
        assert!(norm(&d2020, json!(["a", 1, 1])).is_err());
        let d07 = schema(
            json!({"items": [{"type": "string"}, {"type": "number"}], "additionalItems": false}),
        );
        assert!(norm(&d07, json!(["a", 1])).is_ok());
        assert_eq!(
            norm(&d07, json!(["a", 1, 2])).unwrap_err(),
            "argument `/2`: expected no value at all (the schema allows none here), got number 2"
        );
    }

    #[test]
    fn keywords_about_values_rather_than_types_are_left_to_the_tool() {
        let s = schema(
            json!({"type": "string", "format": "email", "pattern": "^[a-z]+$", "maxLength": 2}),
        );
        assert!(norm(&s, json!("NOT AN EMAIL, TOO LONG")).is_ok());
        let n = schema(json!({"type": "number", "minimum": 10, "multipleOf": 7}));
        assert!(norm(&n, json!(3)).is_ok());
        let t = schema(json!(true));
        assert!(norm(&t, json!({"anything": [null]})).is_ok());
        let f = schema(json!(false));
        assert!(norm(&f, json!({})).is_err());
    }

    #[test]
    fn key_order_is_kept_when_an_argument_is_removed() {
        let s = schema(json!({"properties": {"b": {"type": "number"}}}));
        let mut v = json!({});
        for k in ["z", "b", "a", "n"] {
            v[k] = if k == "n" { json!(null) } else { json!(1) };
        }
        let before: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        let out = norm(&s, v).unwrap();
        let after: Vec<String> = out.as_object().unwrap().keys().cloned().collect();
        let expected: Vec<String> = before.into_iter().filter(|k| k != "n").collect();
        assert_eq!(after, expected);
    }

    #[test]
    fn broken_and_hostile_schemas_are_refused_with_where() {
        let cases = [
            (json!({"type": "strin"}), ""),
            (json!({"properties": {"a": {"type": 5}}}), "/properties/a"),
            (
                json!({"properties": {"a": {"$ref": "#/$defs/Nope"}}}),
                "/properties/a",
            ),
            (json!({"$ref": "https://example.com/s.json"}), ""),
            (
                json!({"$defs": {"N": {"properties": {"next": {"$ref": "#/$defs/N"}}}}, "$ref": "#/$defs/N"}),
                "/$defs/N/properties/next",
            ),
            (json!({"$ref": "#"}), ""),
            (json!({"anyOf": []}), ""),
            (json!({"items": 3}), "/items"),
            (json!({"$dynamicRef": "#x"}), ""),
            (json!({"required": "a"}), ""),
            (json!(7), ""),
        ];
        for (s, at) in cases {
            let e = Schema::compile(&s).unwrap_err();
            assert_eq!(e.pointer, at, "{s}: {e}");
        }
        let e = Schema::compile(
            &json!({"$defs": {"N": {"items": {"$ref": "#/$defs/N"}}}, "$ref": "#/$defs/N"}),
        )
        .unwrap_err();
        assert!(e.message.contains("recursive"), "{e}");

        // Too deep.
        let mut deep = json!({"type": "string"});
        for _ in 0..MAX_DEPTH {
            deep = json!({"items": deep});
        }
        assert!(Schema::compile(&deep)
            .unwrap_err()
            .message
            .contains("deeper"));
        // Too wide.
        let wide: Map<String, Value> = (0..=MAX_NODES)
            .map(|i| (format!("p{i}"), json!({"type": "string"})))
            .collect();
        assert!(Schema::compile(&json!({"properties": wide}))
            .unwrap_err()
            .message
            .contains("subschemas"));
        // Too many enumerated values.
        let values: Vec<Value> = (0..=MAX_ENUM_VALUES).map(Value::from).collect();
        assert!(Schema::compile(&json!({"enum": values}))
            .unwrap_err()
            .message
            .contains("enumerated"));
    }

    /// Each definition refers to the one before three times: expanded, the schema would
    /// have 3^13 copies of the first. Compiled once per definition, it has a few dozen
    /// nodes. A chain too long for the depth bound is refused, even through definitions
    /// compiled (and shared) at a shallower depth.
    #[test]
    fn a_reference_bomb_compiles_small_and_stays_within_the_depth_bound() {
        let bomb = |levels: usize| {
            let mut defs = Map::new();
            defs.insert("d0".into(), json!({"type": "string"}));
            for i in 1..levels {
                let prev = format!("#/$defs/d{}", i - 1);
                defs.insert(
                    format!("d{i}"),
                    json!({"anyOf": [{"$ref": prev}, {"$ref": prev}, {"type": "array", "items": {"$ref": prev}}]}),
                );
            }
            json!({"$defs": defs, "$ref": format!("#/$defs/d{}", levels - 1)})
        };
        let s = Schema::compile(&bomb(14)).unwrap();
        assert!(s.nodes < 100, "{} nodes", s.nodes);
        let e = Schema::compile(&bomb(40)).unwrap_err();
        assert!(e.message.contains("deeper"), "{e}");
        // A value that fits no branch anywhere has every branch tried at every level;
        // it ends in an error (the step budget, at worst), not a hang.
        let mut v = json!(1);
        for _ in 0..13 {
            v = json!([v]);
        }
        assert!(s.normalized(&v).is_err());
        assert!(s.normalized(&json!("x")).is_ok());
    }

    #[test]
    fn the_step_budget_stops_a_walk_that_would_take_too_long() {
        // Nested anyOf whose branches all fail only at the bottom: 3^13 attempts, from a
        // schema of a few dozen nodes (shared through references).
        let mut defs = Map::new();
        defs.insert("d0".into(), json!({"type": "string"}));
        for i in 1..14 {
            let prev = json!({"items": {"$ref": format!("#/$defs/d{}", i - 1)}});
            defs.insert(format!("d{i}"), json!({"anyOf": [prev, prev, prev]}));
        }
        let s = schema(json!({"$defs": defs, "$ref": "#/$defs/d13"}));
        let mut v = json!(1);
        for _ in 0..13 {
            v = json!([v]);
        }
        let e = s.normalized(&v).unwrap_err();
        assert!(e.expected.contains(&MAX_STEPS.to_string()), "{e}");
        assert_eq!(e.got, "more");

        // A long `enum` on every element of a long array: a step per candidate.
        let values: Vec<u32> = (0..1000).collect();
        let e = schema(json!({"items": {"enum": values}}));
        assert!(e.normalized(&json!(vec![999; 500])).is_ok());
        let err = e.normalized(&json!(vec![999; 2000])).unwrap_err();
        assert_eq!(err.got, "more");
    }

    /// The normalizer against an independent reference: a plain recursive JSON Schema
    /// check over the raw schema for the supported keywords, in two modes. `strict` is
    /// JSON Schema (with `oneOf` read as `anyOf`); `lenient` adds the one documented
    /// widening, that null and absent are the same for an object's properties: null for
    /// one that is not required, absent for a required one whose schema admits null
    /// (explicitly, or by not constraining it). The normalizer must accept exactly what
    /// `lenient` accepts, so that is the whole of what it lets through beyond the schema.
    mod against_a_reference {
        use super::*;
        use proptest::prelude::*;

        fn num_eq(a: &Value, b: &Value) -> bool {
            match (a, b) {
                (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
                (Value::Array(x), Value::Array(y)) => {
                    x.len() == y.len() && x.iter().zip(y).all(|(a, b)| num_eq(a, b))
                }
                (Value::Object(x), Value::Object(y)) => {
                    x.len() == y.len()
                        && x.iter()
                            .all(|(k, a)| y.get(k).is_some_and(|b| num_eq(a, b)))
                }
                _ => a == b,
            }
        }

        fn type_ok(name: &str, v: &Value) -> bool {
            match name {
                "null" => v.is_null(),
                "boolean" => v.is_boolean(),
                "integer" => v.as_f64().is_some_and(|f| f.fract() == 0.0),
                "number" => v.is_number(),
                "string" => v.is_string(),
                "array" => v.is_array(),
                "object" => v.is_object(),
                _ => false,
            }
        }

        pub fn accepts(s: &Value, v: &Value, lenient: bool) -> bool {
            let o = match s {
                Value::Bool(b) => return *b,
                Value::Object(o) => o,
                _ => return false,
            };
            if let Some(t) = o.get("type") {
                let ok = match t {
                    Value::String(n) => type_ok(n, v),
                    Value::Array(ns) => {
                        ns.iter().any(|n| n.as_str().is_some_and(|n| type_ok(n, v)))
                    }
                    _ => false,
                };
                if !ok {
                    return false;
                }
            }
            if let Some(Value::Array(e)) = o.get("enum") {
                if !e.iter().any(|x| num_eq(x, v)) {
                    return false;
                }
            }
            if let Some(c) = o.get("const") {
                if !num_eq(c, v) {
                    return false;
                }
            }
            if let Value::Object(m) = v {
                let empty = Map::new();
                let props = o
                    .get("properties")
                    .and_then(Value::as_object)
                    .unwrap_or(&empty);
                let required: Vec<&str> = o
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|r| r.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let extra = o.get("additionalProperties").unwrap_or(&Value::Bool(true));
                let schema_of = |k: &str| props.get(k).unwrap_or(extra);
                for (k, x) in m {
                    let sk = schema_of(k);
                    let absent = lenient
                        && x.is_null()
                        && (!required.contains(&k.as_str()) || accepts(sk, &Value::Null, lenient));
                    if !absent && !accepts(sk, x, lenient) {
                        return false;
                    }
                }
                for r in &required {
                    let there = m.get(*r).is_some_and(|x| !(lenient && x.is_null()));
                    let may_be_absent = lenient && accepts(schema_of(r), &Value::Null, lenient);
                    if !there && !may_be_absent {
                        return false;
                    }
                }
            }
            if let (Value::Array(items), Some(each)) = (v, o.get("items")) {
                if !items.iter().all(|x| accepts(each, x, lenient)) {
                    return false;
                }
            }
            let list = |k: &str| o.get(k).and_then(Value::as_array);
            if let Some(all) = list("allOf") {
                if !all.iter().all(|x| accepts(x, v, lenient)) {
                    return false;
                }
            }
            for k in ["anyOf", "oneOf"] {
                if let Some(alts) = list(k) {
                    if !alts.iter().any(|x| accepts(x, v, lenient)) {
                        return false;
                    }
                }
            }
            true
        }

        fn scalar_type() -> impl Strategy<Value = &'static str> {
            prop_oneof![
                Just("null"),
                Just("boolean"),
                Just("integer"),
                Just("number"),
                Just("string"),
            ]
        }

        fn small_value() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(json!(null)),
                Just(json!(true)),
                Just(json!(0)),
                Just(json!(2)),
                Just(json!(-3)),
                Just(json!(2.0)),
                Just(json!(1.5)),
                Just(json!("x")),
                Just(json!("12")),
            ]
        }

        const KEYS: [&str; 3] = ["a", "b", "c"];

        pub fn schema_strategy() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                scalar_type().prop_map(|t| json!({"type": t})),
                (scalar_type(), scalar_type()).prop_map(|(a, b)| json!({"type": [a, b]})),
                Just(json!({})),
                Just(json!(true)),
                proptest::collection::vec(small_value(), 1..4).prop_map(|e| json!({"enum": e})),
                small_value().prop_map(|c| json!({"const": c})),
            ];
            leaf.prop_recursive(4, 48, 4, |inner| {
                prop_oneof![
                    inner
                        .clone()
                        .prop_map(|s| json!({"type": "array", "items": s})),
                    (inner.clone(), scalar_type())
                        .prop_map(|(s, t)| json!({"type": [t, "array"], "items": s})),
                    (
                        proptest::collection::btree_map(
                            proptest::sample::select(KEYS.to_vec()),
                            inner.clone(),
                            0..3
                        ),
                        proptest::collection::vec(proptest::sample::select(KEYS.to_vec()), 0..3),
                        prop_oneof![
                            Just(None),
                            Just(Some(json!(false))),
                            inner.clone().prop_map(Some)
                        ],
                    )
                        .prop_map(|(props, req, extra)| {
                            let mut o =
                                json!({"type": "object", "properties": props, "required": req});
                            if let Some(x) = extra {
                                o["additionalProperties"] = x;
                            }
                            o
                        }),
                    proptest::collection::vec(inner.clone(), 1..4)
                        .prop_map(|a| json!({"anyOf": a})),
                    proptest::collection::vec(inner.clone(), 1..3)
                        .prop_map(|a| json!({"oneOf": a})),
                    inner.clone().prop_map(|s| json!({"allOf": [s]})),
                    inner.prop_map(|s| json!({"anyOf": [s, {"type": "null"}]})),
                ]
            })
        }

        pub fn value_strategy() -> impl Strategy<Value = Value> {
            small_value().prop_recursive(4, 32, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    proptest::collection::btree_map(
                        proptest::sample::select(KEYS.to_vec()),
                        inner,
                        0..4
                    )
                    .prop_map(|m| json!(m)),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn normalize_agrees_with_the_reference_and_is_idempotent(
                s in schema_strategy(),
                v in value_strategy(),
            ) {
                let compiled = Schema::compile(&s).unwrap();
                let result = compiled.normalized(&v);
                let lenient = accepts(&s, &v, true);
                let strict = accepts(&s, &v, false);
                // Accepted exactly when the lenient reference accepts: nothing the
                // schema refuses gets through except by the documented null widening,
                // and nothing it accepts is refused.
                prop_assert_eq!(result.is_ok(), lenient, "result {:?}", result);
                if strict {
                    prop_assert!(result.is_ok());
                }
                if let Ok(out) = result {
                    let out = out.into_owned();
                    prop_assert!(accepts(&s, &out, true), "output {} refused", out);
                    let again = compiled.normalized(&out);
                    prop_assert!(again.is_ok(), "second pass: {:?}", again);
                    let again = again.unwrap().into_owned();
                    prop_assert_eq!(&again, &out);
                }
            }
        }

        /// Schemas from any JSON: compiling refuses or succeeds, normalizing never
        /// panics.
        fn any_json() -> impl Strategy<Value = Value> {
            let key = prop_oneof![
                Just("type".to_owned()),
                Just("properties".to_owned()),
                Just("required".to_owned()),
                Just("items".to_owned()),
                Just("prefixItems".to_owned()),
                Just("additionalProperties".to_owned()),
                Just("additionalItems".to_owned()),
                Just("anyOf".to_owned()),
                Just("oneOf".to_owned()),
                Just("allOf".to_owned()),
                Just("enum".to_owned()),
                Just("const".to_owned()),
                Just("$ref".to_owned()),
                Just("$defs".to_owned()),
                Just("nullable".to_owned()),
                Just("a".to_owned()),
            ];
            let leaf = prop_oneof![
                small_value(),
                scalar_type().prop_map(|t| json!(t)),
                Just(json!("array")),
                Just(json!("object")),
                Just(json!("#/$defs/a")),
                Just(json!("#")),
                Just(json!(false)),
            ];
            leaf.prop_recursive(5, 64, 5, move |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    proptest::collection::btree_map(key.clone(), inner, 0..5)
                        .prop_map(|m| json!(m)),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn arbitrary_schemas_and_values_never_panic(s in any_json(), v in value_strategy()) {
                if let Ok(compiled) = Schema::compile(&s) {
                    if let Ok(out) = compiled.normalized(&v) {
                        let out = out.into_owned();
                        let again = compiled.normalized(&out);
                        prop_assert!(again.is_ok(), "second pass: {:?}", again);
                        prop_assert_eq!(again.unwrap().into_owned(), out);
                    }
                }
            }
        }
    }
}
