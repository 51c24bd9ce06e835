//! `--timers` prints every phase's time over the ranks and `--trace FILE` writes each rank's
//! phases as a Chrome trace (one file per rank process under `--comm tcp`); neither changes a
//! loss.

use std::collections::BTreeMap;

use super::processes::{finish, ranks};
use super::*;

/// The rows of the `--timers` table in `stdout`: phase → its cells.
fn timer_rows(stdout: &str) -> BTreeMap<String, Vec<String>> {
    let at = stdout.find("timers of steps").unwrap_or_else(|| panic!("no timers table:\n{stdout}"));
    let cells = |l: &str| l.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect::<Vec<_>>();
    stdout[at..].lines().skip(3).take_while(|l| l.starts_with("| ")).map(cells).map(|c| (c[0].clone(), c[1..].to_vec())).collect()
}

/// The trace's complete spans per thread name: name → (span name → begin events).
fn trace_spans(path: &Path) -> BTreeMap<String, BTreeMap<String, usize>> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
    let events = v.as_array().or_else(|| v["traceEvents"].as_array()).expect("a list of events");
    let threads: BTreeMap<u64, String> = events
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "thread_name")
        .map(|e| (e["tid"].as_u64().unwrap(), e["args"]["name"].as_str().unwrap().to_string()))
        .collect();
    let mut out: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for e in events.iter().filter(|e| e["ph"] == "B") {
        let thread = threads.get(&e["tid"].as_u64().unwrap()).cloned().unwrap_or_else(|| format!("tid {}", e["tid"]));
        *out.entry(thread).or_default().entry(e["name"].as_str().unwrap().to_string()).or_default() += 1;
    }
    let ends = events.iter().filter(|e| e["ph"] == "E").count();
    assert_eq!(ends, out.values().flat_map(|m| m.values()).sum::<usize>(), "every span ends");
    out
}

#[test]
fn timers_and_a_trace_of_a_pipeline_leave_the_losses_as_they_were() {
    let dir = fresh("timers");
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.json");
    let base = format!("{TINY} --layers 2 --steps 3 --pp 2 --tp 2 --microbatches 2");
    let plain = losses(&base);
    let o = run(&format!("{base} --timers --trace {}", trace.display()));
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(step_lines(&stdout), plain, "timing changes no number");
    let rows = timer_rows(&stdout);
    for (phase, calls) in [("step", "1.0"), ("forward", "2.0"), ("backward", "2.0"), ("grads-reduce", "1.0"), ("optimizer", "1.0")] {
        assert_eq!(rows.get(phase).map(|c| c[0].as_str()), Some(calls), "{phase}: {rows:?}");
    }
    assert!(!rows.contains_key("forward-backward") && !rows.contains_key("checkpoint"), "{rows:?}");
    let spans = trace_spans(&trace);
    assert_eq!(spans.keys().collect::<Vec<_>>(), ["rank-0", "rank-1", "rank-2", "rank-3"]);
    for (thread, names) in &spans {
        assert_eq!((names.get("forward"), names.get("backward"), names.get("step")), (Some(&6), Some(&6), Some(&3)), "{thread}: {names:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn without_a_pipeline_the_gpt_times_each_micro_batch_and_processes_trace_apart() {
    let tiny = TINY.replace("--eval-every 0", "--eval-every 1");
    let o = run(&format!("{tiny} --layers 2 --steps 3 --dp 2 --microbatches 2 --timers"));
    assert!(o.status.success(), "{}", text(&o));
    let rows = timer_rows(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(rows.get("forward-backward").map(|c| c[0].as_str()), Some("2.0"), "{rows:?}");
    assert_eq!(rows.get("eval").map(|c| c[0].as_str()), Some("0.7"), "evaluations after steps 1 and 2 of 3: {rows:?}");
    assert!(!rows.contains_key("forward"), "{rows:?}");
    // One process per rank: each writes its own file.
    let dir = fresh("timers-tcp");
    std::fs::create_dir_all(&dir).unwrap();
    let flags = format!("{TINY} --layers 2 --steps 2 --dp 2 --timers --trace {}", dir.join("t.json").display());
    let outs = finish(ranks(2, &flags));
    for (rank, (status, stdout, stderr)) in outs.iter().enumerate() {
        assert!(status.success(), "rank {rank}: {stderr}");
        assert_eq!(stdout.contains("timers of steps 1-2, 2 ranks"), rank == 0, "rank {rank}: {stdout}");
        let spans = trace_spans(&dir.join(format!("t.rank{rank}.json")));
        let steps: usize = spans.values().filter_map(|m| m.get("step")).sum();
        assert_eq!(steps, 2, "rank {rank}: {spans:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--timers-every N` prints the timers of each N steps (and the rest at the end) and records
/// them in `--metrics`.
#[test]
fn timers_every_n_steps_are_printed_and_recorded() {
    let dir = fresh("timers-every");
    std::fs::create_dir_all(&dir).unwrap();
    let metrics = dir.join("m.jsonl");
    let o = run(&format!("{TINY} --layers 2 --steps 5 --tp 2 --timers-every 2 --metrics {}", metrics.display()));
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let heads: Vec<&str> = stdout.lines().filter(|l| l.starts_with("timers of steps")).collect();
    assert_eq!(heads.len(), 3, "{stdout}");
    for (h, steps) in heads.iter().zip(["1-2, 2 ranks", "3-4, 2 ranks", "5-5, 2 ranks"]) {
        assert!(h.starts_with(&format!("timers of steps {steps}")), "{h}");
    }
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("timers").is_some())
        .collect();
    let covered: Vec<(u64, u64)> = records.iter().map(|r| (r["step"].as_u64().unwrap(), r["steps"].as_u64().unwrap())).collect();
    assert_eq!(covered, [(2, 2), (4, 2), (5, 1)]);
    let step = records[0]["timers"].as_array().unwrap().iter().find(|p| p["phase"] == "step").expect("a step phase");
    assert_eq!(step["calls_per_step"].as_f64(), Some(1.0));
    assert!(step["min_ms"].as_f64().unwrap() > 0.0 && step["min_ms"].as_f64() <= step["max_ms"].as_f64(), "{step}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// On wgpu every timed span waits for the rank's device (`timing::set_device_sync`): the run
/// trains with the plain run's losses and times its phases.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_timers_wait_for_the_device_and_change_no_loss() {
    let base = format!("{TINY} --layers 2 --steps 3 --tp 2 --device wgpu");
    let plain = losses(&base);
    let o = run(&format!("{base} --timers"));
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(step_lines(&stdout), plain);
    let rows = timer_rows(&stdout);
    assert_eq!(rows.get("forward-backward").map(|c| c[0].as_str()), Some("1.0"), "{rows:?}");
}
