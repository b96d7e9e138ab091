//! `cargo xtask trace FILE [-o OUT.svg]`: draws a gokernel execution trace
//! (the Chrome trace-event JSON of `gokernel::trace`, written by
//! `GOKERNEL_TRACE=FILE` or `Builder::trace`) as an SVG timeline for people
//! who would rather look than read: a lane per P (and one for events
//! recorded without a P), each goroutine's run a bar coloured by its id and
//! labelled when there is room, and each wake-up an arrow from the waker's
//! lane to where the woken goroutine next runs. The default output is
//! `FILE.svg`.
//!
//! It reads the JSON gokernel writes (one event per line), not arbitrary
//! Chrome traces.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

/// A goroutine's run on a lane.
struct Slice {
    lane: usize,
    goid: u64,
    ts: f64,
    dur: f64,
    until: String,
}

/// One end of a wake-up arrow.
struct FlowEnd {
    id: u64,
    lane: usize,
    ts: f64,
}

/// What the SVG is drawn from.
#[derive(Default)]
struct Trace {
    lanes: Vec<(usize, String)>,
    slices: Vec<Slice>,
    starts: Vec<FlowEnd>,
    ends: Vec<FlowEnd>,
}

/// How many goroutine runs are drawn without `--all`: beyond a few
/// thousand bars an SVG is too large to look at.
const DEFAULT_RUNS: usize = 2000;

pub fn run(args: &[String]) -> ExitCode {
    let all = args.iter().any(|a| a == "--all");
    let args: Vec<&String> = args.iter().filter(|a| *a != "--all").collect();
    let (input, output) = match args[..] {
        [f] => (PathBuf::from(f), PathBuf::from(format!("{f}.svg"))),
        [f, o, out] if o == "-o" => (PathBuf::from(f), PathBuf::from(out)),
        _ => {
            eprintln!("usage: cargo xtask trace FILE [-o OUT.svg] [--all]");
            return ExitCode::from(crate::USAGE_ERROR);
        }
    };
    let text = match std::fs::read_to_string(&input) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cargo xtask trace: cannot read {}: {e}", input.display());
            return ExitCode::FAILURE;
        }
    };
    let trace = match parse(&text) {
        Ok(t) if all => t,
        Ok(t) => {
            let total = t.slices.len();
            let t = first_runs(t, DEFAULT_RUNS);
            if t.slices.len() < total {
                println!(
                    "drawing the first {} of {total} goroutine runs (--all draws every one)",
                    t.slices.len()
                );
            }
            t
        }
        Err(e) => {
            eprintln!("cargo xtask trace: {}: {e}", input.display());
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::write(&output, svg(&trace)) {
        eprintln!("cargo xtask trace: cannot write {}: {e}", output.display());
        return ExitCode::FAILURE;
    }
    println!(
        "wrote {} ({} lanes, {} runs, {} wake-ups)",
        output.display(),
        trace.lanes.len(),
        trace.slices.len(),
        trace.starts.len()
    );
    ExitCode::SUCCESS
}

/// The raw text of field `key` of a one-line JSON object (a number, or a
/// string without its quotes).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":");
    let at = line.find(&pat)? + pat.len();
    let rest = &line[at..];
    if let Some(s) = rest.strip_prefix('"') {
        return s.find('"').map(|end| &s[..end]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

fn num<T: std::str::FromStr>(line: &str, key: &str) -> Result<T, String> {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no number {key:?} in {line}"))
}

fn parse(text: &str) -> Result<Trace, String> {
    if !text.trim_start().starts_with('{') || !text.contains("\"traceEvents\"") {
        return Err("not a gokernel trace (no traceEvents)".into());
    }
    let mut t = Trace::default();
    for line in text.lines() {
        let line = line.trim().trim_end_matches(',');
        let Some(ph) = field(line, "ph") else {
            continue;
        };
        match ph {
            "M" if field(line, "name") == Some("thread_name") => {
                let tid = num(line, "tid")?;
                let args = &line[line.find("\"args\"").unwrap_or(0)..];
                let name = field(args, "name").unwrap_or("?").to_string();
                t.lanes.push((tid, name));
            }
            "X" => t.slices.push(Slice {
                lane: num(line, "tid")?,
                goid: num(line, "goid")?,
                ts: num(line, "ts")?,
                dur: num(line, "dur")?,
                until: field(line, "until").unwrap_or("").to_string(),
            }),
            "s" | "f" => {
                let end = FlowEnd {
                    id: num(line, "id")?,
                    lane: num(line, "tid")?,
                    ts: num(line, "ts")?,
                };
                if ph == "s" {
                    t.starts.push(end);
                } else {
                    t.ends.push(end);
                }
            }
            _ => {}
        }
    }
    t.lanes.sort();
    Ok(t)
}

/// `t` cut to its first `n` goroutine runs (by start time), and the
/// wake-ups that fall in that window.
fn first_runs(mut t: Trace, n: usize) -> Trace {
    if t.slices.len() <= n {
        return t;
    }
    t.slices.sort_by(|a, b| a.ts.total_cmp(&b.ts));
    t.slices.truncate(n);
    let end = t.slices.iter().map(|s| s.ts + s.dur).fold(0.0, f64::max);
    t.ends.retain(|e| e.ts <= end);
    let ids: Vec<u64> = t.ends.iter().map(|e| e.id).collect();
    t.starts.retain(|s| s.ts <= end && ids.contains(&s.id));
    t
}

/// A colour for goroutine `g` (golden-angle hues: neighbours differ).
fn colour(g: u64) -> String {
    let hue = (g.wrapping_mul(137) % 360) as u32;
    format!("hsl({hue},65%,55%)")
}

fn svg(t: &Trace) -> String {
    const LEFT: f64 = 60.0;
    const WIDTH: f64 = 1400.0;
    const LANE: f64 = 36.0;
    const TOP: f64 = 30.0;
    let t_end = t
        .slices
        .iter()
        .map(|s| s.ts + s.dur)
        .chain(t.starts.iter().chain(&t.ends).map(|f| f.ts))
        .fold(0.0f64, f64::max)
        .max(1e-3);
    let x = |ts: f64| LEFT + ts / t_end * (WIDTH - LEFT - 10.0);
    let row = |lane: usize| {
        t.lanes
            .iter()
            .position(|&(l, _)| l == lane)
            .unwrap_or(t.lanes.len())
    };
    let y = |lane: usize| TOP + row(lane) as f64 * LANE;
    let height = TOP + (t.lanes.len().max(1) as f64 + 1.0) * LANE;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="10">"#
    );
    s.push_str(r##"<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#333"/></marker></defs>"##);
    s.push('\n');
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="14">gokernel trace: {t_end:.1} µs, {} goroutine runs, {} wake-ups</text>"#,
        t.slices.len(),
        t.starts.len()
    );
    for (lane, name) in &t.lanes {
        let yy = y(*lane);
        let _ = writeln!(
            s,
            r##"<text x="4" y="{:.1}">{name}</text><line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            yy + LANE / 2.0 + 3.0,
            yy + LANE - 2.0,
            WIDTH - 10.0,
            yy + LANE - 2.0
        );
    }
    for sl in &t.slices {
        let (x0, x1) = (x(sl.ts), x(sl.ts + sl.dur));
        let w = (x1 - x0).max(0.5);
        let yy = y(sl.lane) + 4.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x0:.2}" y="{yy:.1}" width="{w:.2}" height="{:.1}" fill="{}"><title>G{} ({:.3} µs, until {})</title></rect>"#,
            LANE - 10.0,
            colour(sl.goid),
            sl.goid,
            sl.dur,
            sl.until
        );
        if w > 24.0 {
            let _ = writeln!(
                s,
                r#"<text x="{:.2}" y="{:.1}">G{}</text>"#,
                x0 + 2.0,
                yy + LANE / 2.0,
                sl.goid
            );
        }
    }
    for st in &t.starts {
        if let Some(en) = t.ends.iter().find(|e| e.id == st.id) {
            let _ = writeln!(
                s,
                r##"<line x1="{:.2}" y1="{:.1}" x2="{:.2}" y2="{:.1}" stroke="#333" stroke-width="0.8" marker-end="url(#arrow)"/>"##,
                x(st.ts),
                y(st.lane) + LANE / 2.0,
                x(en.ts),
                y(en.lane) + LANE / 2.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"displayTimeUnit":"ns","traceEvents":[
{"name":"process_name","ph":"M","pid":1,"tid":0,"args":{"name":"gokernel"}}
,{"name":"thread_name","ph":"M","pid":1,"tid":0,"args":{"name":"P0"}}
,{"name":"thread_name","ph":"M","pid":1,"tid":1,"args":{"name":"no P"}}
,{"name":"wakeup","cat":"wakeup","ph":"s","id":1,"pid":1,"tid":0,"ts":1.000}
,{"name":"G2","cat":"goroutine","ph":"X","pid":1,"tid":0,"ts":0.500,"dur":1.000,"args":{"goid":2,"until":"chan receive"}}
,{"name":"wakeup","cat":"wakeup","ph":"f","bp":"e","id":1,"pid":1,"tid":0,"ts":2.000}
]}
"#;

    #[test]
    fn a_trace_is_drawn_with_a_lane_per_p_a_bar_per_run_and_an_arrow_per_wakeup() {
        let t = parse(SAMPLE).unwrap();
        assert_eq!(t.lanes, [(0, "P0".to_string()), (1, "no P".to_string())]);
        assert_eq!(t.slices.len(), 1);
        assert_eq!(t.slices[0].until, "chan receive");
        let s = svg(&t);
        assert!(s.starts_with("<svg"));
        assert!(s.contains(">P0</text>") && s.contains(">no P</text>"));
        assert!(s.contains("<title>G2 (1.000 µs, until chan receive)</title>"));
        assert_eq!(s.matches("marker-end").count(), 1);
    }

    #[test]
    fn a_long_trace_is_cut_to_its_first_runs() {
        let mut t = parse(SAMPLE).unwrap();
        let one = Slice {
            lane: 0,
            goid: 3,
            ts: 10.0,
            dur: 1.0,
            until: String::new(),
        };
        t.slices.push(one);
        let two = Trace {
            lanes: t.lanes.clone(),
            slices: t
                .slices
                .iter()
                .map(|s| Slice {
                    until: s.until.clone(),
                    ..*s
                })
                .collect(),
            starts: t.starts.iter().map(|f| FlowEnd { ..*f }).collect(),
            ends: t.ends.iter().map(|f| FlowEnd { ..*f }).collect(),
        };
        // The first run ends at 1.5 µs: the wake-up arrow, ending at 2 µs,
        // is outside the window.
        let t = first_runs(t, 1);
        assert_eq!(t.slices.len(), 1);
        assert_eq!(t.slices[0].goid, 2);
        assert_eq!((t.starts.len(), t.ends.len()), (0, 0));
        // Both runs: it is inside.
        let t = first_runs(two, 2);
        assert_eq!((t.slices.len(), t.starts.len(), t.ends.len()), (2, 1, 1));
    }

    #[test]
    fn something_else_is_refused() {
        assert!(parse("[1, 2]").is_err());
    }
}
