//! `keel traces`: the spans the local trace receiver kept (`scripts/otlp-receiver`, which
//! `scripts/run` starts), in a terminal. Without an id: the latest traces, one line each. With
//! one (a response's `traceparent` names it): that trace as a tree, each span with its service,
//! kind, start offset and duration, and the spans of other traces it links to.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context;
use serde::Deserialize;

#[derive(Debug, clap::Args)]
pub struct TracesArgs {
    /// A trace id (32 hex digits, the second part of a `traceparent`).
    trace_id: Option<String>,
    /// The receiver's file.
    #[arg(long, env = "KEEL_TRACES_FILE", default_value = ".keel/traces.jsonl")]
    file: PathBuf,
    /// How many of the latest traces to list.
    #[arg(long, default_value_t = 20)]
    limit: usize,
}

/// One span as the receiver stores it.
#[derive(Debug, Deserialize)]
struct Span {
    service: Option<String>,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: String,
    start: u64,
    end: u64,
    #[serde(default)]
    attributes: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    links: Vec<Link>,
}

#[derive(Debug, Deserialize)]
struct Link {
    trace_id: String,
    span_id: String,
}

impl Span {
    fn millis(&self) -> f64 {
        self.end.saturating_sub(self.start) as f64 / 1e6
    }

    fn service(&self) -> &str {
        self.service.as_deref().unwrap_or("?")
    }
}

pub fn run(args: &TracesArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.file).with_context(|| {
        format!("failed to read {} (scripts/run keeps traces there; --file names another)", args.file.display())
    })?;
    let spans: Vec<Span> = text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect();
    let mut traces: HashMap<&str, Vec<&Span>> = HashMap::new();
    for span in &spans {
        traces.entry(span.trace_id.as_str()).or_default().push(span);
    }
    match &args.trace_id {
        None => list(&traces, args.limit),
        Some(id) => match traces.get(id.to_ascii_lowercase().as_str()) {
            Some(trace) => {
                tree(trace);
                linked_from(&spans, &id.to_ascii_lowercase());
            }
            None => {
                eprintln!("keel: no span of trace {id} in {}", args.file.display());
                return Ok(ExitCode::FAILURE);
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// The latest traces first: id, start, duration, span count, and the first span.
fn list(traces: &HashMap<&str, Vec<&Span>>, limit: usize) {
    let mut summaries: Vec<(u64, u64, &str, usize, &Span)> = traces
        .iter()
        .map(|(id, spans)| {
            let first = spans.iter().min_by_key(|span| span.start).expect("a trace has a span");
            let end = spans.iter().map(|span| span.end).max().unwrap_or(first.end);
            (first.start, end, *id, spans.len(), *first)
        })
        .collect();
    summaries.sort_by_key(|summary| std::cmp::Reverse(summary.0));
    for (start, end, id, count, first) in summaries.into_iter().take(limit) {
        let at = chrono::DateTime::from_timestamp_nanos(start as i64).format("%H:%M:%S%.3f");
        let millis = end.saturating_sub(start) as f64 / 1e6;
        println!("{id}  {at}  {millis:>9.2} ms  {count:>3} spans  {} [{}]", first.name, first.service());
    }
}

/// One trace as a tree: roots (spans whose parent is not in the trace) first, children by start.
fn tree(trace: &[&Span]) {
    let ids: HashMap<&str, &Span> = trace.iter().map(|span| (span.span_id.as_str(), *span)).collect();
    let mut children: HashMap<&str, Vec<&Span>> = HashMap::new();
    let mut roots = Vec::new();
    for span in trace {
        if ids.contains_key(span.parent_span_id.as_str()) {
            children.entry(span.parent_span_id.as_str()).or_default().push(span);
        } else {
            roots.push(*span);
        }
    }
    let origin = trace.iter().map(|span| span.start).min().unwrap_or_default();
    roots.sort_by_key(|span| span.start);
    for root in roots {
        print_span(root, 0, origin, &children);
    }
}

/// The spans of other traces that link into this one: consumers that handled its messages in
/// batches with others' (the projector's).
fn linked_from(spans: &[Span], trace_id: &str) {
    let mut linking: Vec<&Span> = spans
        .iter()
        .filter(|span| span.trace_id != trace_id && span.links.iter().any(|link| link.trace_id == trace_id))
        .collect();
    if linking.is_empty() {
        return;
    }
    linking.sort_by_key(|span| span.start);
    println!("linked from other traces:");
    for span in linking {
        let to: Vec<&str> =
            span.links.iter().filter(|link| link.trace_id == trace_id).map(|link| link.span_id.as_str()).collect();
        println!(
            "  {} [{} {}] {:.2} ms, trace {}, links to {}",
            span.name,
            span.service(),
            span.kind,
            span.millis(),
            span.trace_id,
            to.join(", ")
        );
    }
}

fn print_span(span: &Span, depth: usize, origin: u64, children: &HashMap<&str, Vec<&Span>>) {
    let offset = span.start.saturating_sub(origin) as f64 / 1e6;
    let notable: Vec<String> = [
        "http.response.status_code",
        "messaging.destination.partition.id",
        "messaging.kafka.offset",
        "messaging.batch.message_count",
        "command_id",
    ]
    .iter()
    .filter_map(|key| Some(format!("{key}={}", span.attributes.get(*key)?)))
    .collect();
    println!(
        "{:indent$}{} [{} {}] +{offset:.2} ms {:.2} ms {}",
        "",
        span.name,
        span.service(),
        span.kind,
        span.millis(),
        notable.join(" "),
        indent = depth * 2
    );
    for link in &span.links {
        println!("{:indent$}  ↳ links to {}/{}", "", link.trace_id, link.span_id, indent = depth * 2);
    }
    let mut kids = children.get(span.span_id.as_str()).cloned().unwrap_or_default();
    kids.sort_by_key(|span| span.start);
    for kid in kids {
        print_span(kid, depth + 1, origin, children);
    }
}
