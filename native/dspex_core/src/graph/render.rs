//! Drawing a [`DependencyGraph`] as Graphviz DOT or a Mermaid flowchart.

use std::collections::HashMap;
use std::fmt::Write as _;

use super::{DependencyGraph, DEFAULT_EDGE_TYPE};
use crate::error::{Error, Result};
use crate::value::Value;

/// Output formats of [`DependencyGraph::render`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Dot,
    Mermaid,
}

impl Format {
    pub fn parse(name: &str) -> Result<Format> {
        match name {
            "dot" => Ok(Format::Dot),
            "mermaid" => Ok(Format::Mermaid),
            _ => Err(Error::InvalidArgument(Value::tagged(
                "unknown_format",
                Value::str(name),
            ))),
        }
    }
}

impl DependencyGraph {
    /// The graph as Graphviz DOT or a Mermaid flowchart. Edges of a type
    /// other than `data` are labelled with it.
    pub fn render(&self, format: Format) -> String {
        let edges = self.edges();
        let mut out = String::with_capacity(32 + edges.len() * 24);
        match format {
            Format::Dot => {
                out.push_str("digraph dependencies {\n  rankdir=LR;\n");
                for e in &edges {
                    let _ = write!(
                        out,
                        "  {} -> {}",
                        dot_quote(e.from.as_text().unwrap_or_default()),
                        dot_quote(e.to.as_text().unwrap_or_default())
                    );
                    if e.edge_type != DEFAULT_EDGE_TYPE {
                        let _ = write!(out, " [label={}]", dot_quote(e.edge_type));
                    }
                    out.push_str(";\n");
                }
                out.push_str("}\n");
            }
            Format::Mermaid => {
                // Mermaid ids must be plain words, so vertices get `v<n>` ids
                // and their names go in quoted labels.
                out.push_str("graph LR\n");
                let mut ids: HashMap<&str, usize> = HashMap::new();
                for e in &edges {
                    out.push_str("  ");
                    mermaid_node(e.from, &mut ids, &mut out);
                    if e.edge_type == DEFAULT_EDGE_TYPE {
                        out.push_str(" --> ");
                    } else {
                        let _ = write!(out, " -->|\"{}\"| ", mermaid_escape(e.edge_type));
                    }
                    mermaid_node(e.to, &mut ids, &mut out);
                    out.push('\n');
                }
            }
        }
        out
    }
}

fn dot_quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                q.push('\\');
                q.push(c);
            }
            '\n' => q.push_str("\\n"),
            c if c.is_control() => {}
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// Writes a vertex's id, with its label the first time it appears.
fn mermaid_node<'a>(name: &'a Value, ids: &mut HashMap<&'a str, usize>, out: &mut String) {
    let key = name.as_text().unwrap_or_default();
    let next = ids.len();
    let id = *ids.entry(key).or_insert(next);
    if id == next {
        let _ = write!(out, "v{id}[\"{}\"]", mermaid_escape(key));
    } else {
        let _ = write!(out, "v{id}");
    }
}

fn mermaid_escape(s: &str) -> String {
    let mut q = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => q.push_str("#quot;"),
            '#' => q.push_str("#35;"),
            '<' => q.push_str("#lt;"),
            '>' => q.push_str("#gt;"),
            c if c.is_control() => q.push(' '),
            c => q.push(c),
        }
    }
    q
}
