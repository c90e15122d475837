//! Start-up timestamps, step by step, for finding where start-up time goes.
//!
//! With `FERRY_STARTUP_TRACE=1` in its environment, ferry records when each
//! step of building a VM ended (milliseconds since `main` was entered) and
//! prints them on one stderr line once the vCPUs run:
//! `ferry: startup ms: config 0.21 memory 0.25 ... vcpus-started 1.90`.
//! Without it, a step costs one relaxed atomic load.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::util::lock;

const UNKNOWN: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

static ENABLED: AtomicU8 = AtomicU8::new(UNKNOWN);
static STEPS: Mutex<Vec<(&'static str, Duration)>> = Mutex::new(Vec::new());

fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on = std::env::var_os("FERRY_STARTUP_TRACE").is_some_and(|v| v == "1");
            ENABLED.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
    }
}

/// Records that `step` just ended.
pub fn mark(step: &'static str) {
    if enabled() {
        let at = crate::process_start().elapsed();
        lock(&STEPS).push((step, at));
    }
}

/// Prints the steps recorded so far, and forgets them.
pub fn report() {
    if !enabled() {
        return;
    }
    let steps = std::mem::take(&mut *lock(&STEPS));
    let line: Vec<String> = steps
        .iter()
        .map(|(step, at)| format!("{step} {:.3}", at.as_secs_f64() * 1000.0))
        .collect();
    eprintln!("ferry: startup ms: {}", line.join(" "));
}

/// The steps as (name, ms since start), for tests.
#[cfg(test)]
fn recorded() -> Vec<(&'static str, f64)> {
    lock(&STEPS)
        .iter()
        .map(|(s, d)| (*s, d.as_secs_f64() * 1000.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_recorded_in_order_when_enabled() {
        ENABLED.store(ON, Ordering::Relaxed);
        mark("one");
        mark("two");
        let steps = recorded();
        let one = steps.iter().position(|s| s.0 == "one").unwrap();
        let two = steps.iter().position(|s| s.0 == "two").unwrap();
        assert!(one < two);
        assert!(steps[one].1 <= steps[two].1);
        report();
        assert!(recorded().is_empty());
    }
}
