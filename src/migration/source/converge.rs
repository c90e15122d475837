//! When pre-copy stops, throttles or gives up: a pure rule over measured
//! figures, so that it can be read and tested apart from sockets and vCPUs.
//!
//! After every pass the source feeds one [`PassSample`] to a [`Tracker`],
//! which keeps a sliding window of recent passes and turns it into
//! [`PassMetrics`]; [`decide`] maps those and a [`Policy`] to a
//! [`Decision`]. Rates come from the window, never from one pass alone: a
//! pass of a few milliseconds may find no dirty page at all although the
//! guest writes hundreds of MiB/s, and one such pass must not count as
//! "the guest is idle". See docs/migration-protocol.md, "Convergence".

use std::collections::VecDeque;
use std::fmt;

/// What a pass measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassSample {
    pub pass: u32,
    /// Seconds since the previous dirty-log sync (or since pre-copy began).
    pub interval_secs: f64,
    /// Seconds the pass spent sending (bandwidth-limit sleeps included,
    /// waits for the storage copy not).
    pub send_secs: f64,
    /// Bytes the pass put on the wire.
    pub wire_bytes: u64,
    /// Dirty bytes the sync after the pass found: what is left to send.
    pub dirty_bytes: u64,
}

/// The figures a decision is taken on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassMetrics {
    pub pass: u32,
    pub remaining_bytes: u64,
    /// What the pass before found left, if there was one.
    pub previous_remaining: Option<u64>,
    /// Bytes/s the link takes while the source sends, over the window.
    pub bandwidth: f64,
    /// Bytes/s the guest dirtied, over the window.
    pub dirty_rate: f64,
    /// Bytes/s pre-copy sent, over the window.
    pub drain_rate: f64,
    /// How long the window spans; rates of a shorter one mean little.
    pub window_secs: f64,
    pub expected_downtime_ms: f64,
    /// Seconds since the expected downtime last improved by a tenth.
    pub since_progress_secs: f64,
    pub throttle_percent: u32,
    /// Seconds since the throttle last changed (or since pre-copy began).
    pub since_throttle_secs: f64,
}

/// The knobs of the rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub max_downtime_ms: f64,
    /// What the final phase costs besides memory: pause, state, handshake.
    pub fixed_downtime_ms: f64,
    /// While passes still shrink the rest, aim for this share of the
    /// allowed downtime...
    pub aim_fraction: f64,
    /// ...but not for more passes than this.
    pub aim_passes: u32,
    /// A bound on the work, whatever the progress.
    pub max_passes: u32,
    pub throttle_step: u32,
    pub throttle_max: u32,
    /// Rates are trusted, and the throttle moves, at most once per window.
    pub window_secs: f64,
    /// With the throttle at its maximum, this long without progress is
    /// failure.
    pub stall_secs: f64,
}

impl Policy {
    pub fn new(max_downtime_ms: u64) -> Policy {
        Policy {
            max_downtime_ms: max_downtime_ms as f64,
            fixed_downtime_ms: FIXED_DOWNTIME_MS,
            aim_fraction: 0.2,
            aim_passes: 12,
            max_passes: MAX_PASSES,
            throttle_step: 20,
            throttle_max: 95,
            window_secs: 0.1,
            stall_secs: 3.0,
        }
    }
}

/// After this many passes without fitting the downtime, give up.
pub const MAX_PASSES: u32 = 40;
/// Estimated cost of the final phase besides memory.
pub const FIXED_DOWNTIME_MS: f64 = 2.0;

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Pause the guest and send the rest.
    StopAndCopy,
    /// Another pass, with the vCPUs held back this much.
    Continue {
        throttle_percent: u32,
    },
    GiveUp {
        reason: GiveUp,
    },
}

/// Why pre-copy gave up.
#[derive(Debug, Clone, PartialEq)]
pub enum GiveUp {
    TooManyPasses { passes: u32 },
    Stalled { secs: f64, throttle_percent: u32 },
}

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GiveUp::TooManyPasses { passes } => write!(f, "{passes} passes is the limit"),
            GiveUp::Stalled {
                secs,
                throttle_percent,
            } => write!(
                f,
                "no progress for {secs:.1} s with the guest throttled to {throttle_percent} %"
            ),
        }
    }
}

/// The rule, in order:
///
/// 1. Stop and copy once the expected downtime fits `max_downtime_ms`,
///    unless another pass is still worth it: the estimate is above
///    `aim_fraction` of the allowance, the last pass shrank the rest by more
///    than a third, and fewer than `aim_passes` passes ran.
/// 2. Give up after `max_passes` passes, or when the throttle is at its
///    maximum and the expected downtime has not improved by a tenth for
///    `stall_secs`: nothing more can make it converge.
/// 3. Otherwise go on, one throttle step harder if the window is complete,
///    the throttle has not moved within the last window, and the guest
///    dirties memory faster than the link takes it or at more than half the
///    rate pre-copy drains it (the rest then no longer shrinks by much).
pub fn decide(m: &PassMetrics, p: &Policy) -> Decision {
    let expected = m.expected_downtime_ms;
    let shrinking = match m.previous_remaining {
        None => true,
        Some(prev) => m.remaining_bytes.saturating_mul(3) < prev.saturating_mul(2),
    };
    if expected <= p.max_downtime_ms
        && (expected <= p.max_downtime_ms * p.aim_fraction || !shrinking || m.pass >= p.aim_passes)
    {
        return Decision::StopAndCopy;
    }
    if m.pass >= p.max_passes {
        return Decision::GiveUp {
            reason: GiveUp::TooManyPasses { passes: m.pass },
        };
    }
    if m.throttle_percent >= p.throttle_max && m.since_progress_secs >= p.stall_secs {
        return Decision::GiveUp {
            reason: GiveUp::Stalled {
                secs: m.since_progress_secs,
                throttle_percent: m.throttle_percent,
            },
        };
    }
    let trusted = m.window_secs >= p.window_secs && m.since_throttle_secs >= p.window_secs;
    let outpaced = m.dirty_rate > m.bandwidth || m.dirty_rate * 2.0 > m.drain_rate;
    let throttle_percent = if expected > p.max_downtime_ms && trusted && outpaced {
        (m.throttle_percent + p.throttle_step).min(p.throttle_max)
    } else {
        m.throttle_percent
    };
    Decision::Continue { throttle_percent }
}

/// The state behind [`PassMetrics`]: a window of recent passes, the
/// bandwidth estimate, the best estimate so far and the throttle.
pub struct Tracker {
    policy: Policy,
    window: VecDeque<PassSample>,
    bandwidth: f64,
    /// Seconds since pre-copy began, as the samples tell.
    now: f64,
    previous_remaining: Option<u64>,
    best_expected_ms: f64,
    progress_at: f64,
    throttle_percent: u32,
    throttle_at: f64,
}

/// A window's bandwidth counts only once it carried this much: the rate of
/// a few frames says more about latency than about the link.
const MIN_BANDWIDTH_SAMPLE: u64 = 1 << 20;

impl Tracker {
    /// `initial_bandwidth`: bytes/s to assume until one is measured.
    pub fn new(policy: Policy, initial_bandwidth: f64) -> Tracker {
        Tracker {
            policy,
            window: VecDeque::new(),
            bandwidth: initial_bandwidth,
            now: 0.0,
            previous_remaining: None,
            best_expected_ms: f64::INFINITY,
            progress_at: 0.0,
            throttle_percent: 0,
            throttle_at: 0.0,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Adds a pass and returns the figures as of its sync.
    pub fn record(&mut self, s: PassSample) -> PassMetrics {
        self.now += s.interval_secs;
        self.window.push_back(s);
        // Drop the oldest passes while the rest still fill a window.
        while self.window.len() > 1
            && self.span() - self.window[0].interval_secs >= self.policy.window_secs
        {
            self.window.pop_front();
        }
        let span = self.span();
        let sent: u64 = self.window.iter().map(|s| s.wire_bytes).sum();
        let send_secs: f64 = self.window.iter().map(|s| s.send_secs).sum();
        let dirtied: u64 = self.window.iter().map(|s| s.dirty_bytes).sum();
        if sent >= MIN_BANDWIDTH_SAMPLE && send_secs > 0.0 {
            self.bandwidth = sent as f64 / send_secs;
        }
        let per_s = |bytes: u64| if span > 0.0 { bytes as f64 / span } else { 0.0 };
        let expected =
            s.dirty_bytes as f64 / self.bandwidth * 1000.0 + self.policy.fixed_downtime_ms;
        if expected < self.best_expected_ms * 0.9 {
            self.best_expected_ms = expected;
            self.progress_at = self.now;
        }
        let m = PassMetrics {
            pass: s.pass,
            remaining_bytes: s.dirty_bytes,
            previous_remaining: self.previous_remaining,
            bandwidth: self.bandwidth,
            dirty_rate: per_s(dirtied),
            drain_rate: per_s(sent),
            window_secs: span,
            expected_downtime_ms: expected,
            since_progress_secs: self.now - self.progress_at,
            throttle_percent: self.throttle_percent,
            since_throttle_secs: self.now - self.throttle_at,
        };
        self.previous_remaining = Some(s.dirty_bytes);
        m
    }

    /// The throttle the caller applied after a decision.
    pub fn set_throttle(&mut self, percent: u32) {
        if percent != self.throttle_percent {
            self.throttle_percent = percent;
            self.throttle_at = self.now;
        }
    }

    fn span(&self) -> f64 {
        self.window.iter().map(|s| s.interval_secs).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    /// 1 GiB/s.
    const LINK: f64 = 1024.0 * MIB as f64;

    /// Runs passes against a model: the guest dirties `dirty_rate` bytes/s
    /// of a working set of `working_set` bytes, scaled down by the throttle;
    /// a pass sends what the previous one left at `LINK`, and lasts at least
    /// `min_pass` seconds. Returns the decisions.
    fn simulate(
        policy: Policy,
        first_pass_bytes: u64,
        dirty_rate: f64,
        working_set: u64,
        min_pass: f64,
        passes: usize,
    ) -> Vec<(PassMetrics, Decision)> {
        let mut t = Tracker::new(policy, LINK);
        let mut to_send = first_pass_bytes;
        let mut out = Vec::new();
        for pass in 1..=passes as u32 {
            let send_secs = to_send as f64 / LINK;
            let interval = send_secs.max(min_pass);
            let run = 1.0 - t.throttle_percent as f64 / 100.0;
            let dirty = ((dirty_rate * run * interval) as u64).min(working_set) / 4096 * 4096;
            let m = t.record(PassSample {
                pass,
                interval_secs: interval,
                send_secs,
                wire_bytes: to_send,
                dirty_bytes: dirty,
            });
            let d = decide(&m, &policy);
            if let Decision::Continue { throttle_percent } = d {
                t.set_throttle(throttle_percent);
            }
            let end = !matches!(d, Decision::Continue { .. });
            out.push((m, d));
            if end {
                break;
            }
            to_send = dirty;
        }
        out
    }

    #[test]
    fn an_idle_guest_stops_after_the_first_pass() {
        // 256 MiB sent in 0.25 s while a few pages changed.
        let runs = simulate(
            Policy::new(50),
            256 * MIB,
            64.0 * 4096.0,
            256 * MIB,
            0.0,
            50,
        );
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].1, Decision::StopAndCopy);
        assert_eq!(runs[0].0.throttle_percent, 0);
    }

    #[test]
    fn a_shrinking_rest_gets_more_passes_then_stops_unthrottled() {
        // The guest dirties a fifth of the link: each pass leaves a fifth
        // of what it sent. After the 1 GiB first pass 200 MiB are left
        // (197 ms expected), then 39 MiB (40 ms: fits, but shrinking and
        // above the 10 ms aim), then 8 MiB (9 ms): stop.
        let runs = simulate(
            Policy::new(50),
            1024 * MIB,
            200.0 * MIB as f64,
            4096 * MIB,
            0.0,
            50,
        );
        let (last, d) = runs.last().unwrap();
        assert_eq!(*d, Decision::StopAndCopy);
        assert!(runs.len() >= 3, "{runs:#?}");
        assert!(last.expected_downtime_ms <= 10.0, "{last:?}");
        assert!(
            runs.iter().all(|(m, _)| m.throttle_percent == 0),
            "{runs:#?}"
        );
    }

    #[test]
    fn a_guest_dirtying_faster_than_the_link_is_throttled_until_it_fits() {
        // 2 GiB/s of writes into a 512 MiB working set on a 1 GiB/s link:
        // without throttling every pass leaves as much as it sent.
        let runs = simulate(
            Policy::new(50),
            1024 * MIB,
            2048.0 * MIB as f64,
            512 * MIB,
            0.02,
            200,
        );
        let (last, d) = runs.last().unwrap();
        assert_eq!(*d, Decision::StopAndCopy, "{runs:#?}");
        assert!(last.throttle_percent >= 60, "{last:?}");
        // The throttle climbs step by step, never more than once a window.
        let steps: Vec<u32> = runs.iter().map(|(m, _)| m.throttle_percent).collect();
        assert!(
            steps.windows(2).all(|w| w[1] >= w[0] && w[1] - w[0] <= 20),
            "{steps:?}"
        );
    }

    #[test]
    fn a_rate_that_reads_zero_for_short_passes_is_not_taken_for_an_idle_guest() {
        let mut policy = Policy::new(1);
        policy.max_passes = u32::MAX;
        let mut t = Tracker::new(policy, LINK);
        // 3 ms passes: the guest dirtied 4 MiB in one, none in the next two.
        let samples = [(1, 64 * MIB, 4 * MIB), (2, 4 * MIB, 0), (3, 0, 0)];
        let mut last = None;
        for (pass, sent, dirty) in samples {
            let m = t.record(PassSample {
                pass,
                interval_secs: 0.003,
                send_secs: 0.003,
                wire_bytes: sent,
                dirty_bytes: dirty,
            });
            // Too short a window to judge: no throttle step yet.
            assert!(m.window_secs < policy.window_secs);
            assert_eq!(
                decide(&m, &policy),
                Decision::Continue {
                    throttle_percent: 0
                }
            );
            last = Some(m);
        }
        // The window keeps the pass that saw the writes: the rate is not 0.
        assert!(last.unwrap().dirty_rate > 0.0);
        // Once passes span a window, the steady writes show and throttle.
        let mut throttled = false;
        for pass in 4..60 {
            let m = t.record(PassSample {
                pass,
                interval_secs: 0.003,
                send_secs: 0.001,
                wire_bytes: if pass % 2 == 0 { 2 * MIB } else { 0 },
                dirty_bytes: if pass % 2 == 0 { 0 } else { 2 * MIB },
            });
            if let Decision::Continue { throttle_percent } = decide(&m, &policy) {
                t.set_throttle(throttle_percent);
                throttled |= throttle_percent > 0;
            }
        }
        assert!(throttled);
    }

    #[test]
    fn an_unreachable_downtime_target_gives_up_on_time_with_the_throttle_at_max() {
        // The guest runs on at 5 % and still dirties 2 MiB per pass: with a
        // 1 ms target that never fits (the hand-over alone is 2 ms).
        let mut policy = Policy::new(1);
        policy.max_passes = u32::MAX;
        let runs = simulate(
            policy,
            128 * MIB,
            800.0 * MIB as f64,
            32 * MIB,
            0.05,
            10_000,
        );
        let (last, d) = runs.last().unwrap();
        match d {
            Decision::GiveUp {
                reason:
                    GiveUp::Stalled {
                        throttle_percent,
                        secs,
                    },
            } => {
                assert_eq!(*throttle_percent, policy.throttle_max);
                assert!(*secs >= policy.stall_secs);
            }
            other => panic!("{other:?} after {runs:#?}"),
        }
        assert!(last.expected_downtime_ms > 1.0);
        // On time, not a pass count: about 5 throttle windows, then 3 s.
        let elapsed: f64 = runs.len() as f64 * 0.05;
        assert!(
            (3.0..6.0).contains(&elapsed),
            "{elapsed} s, {} passes",
            runs.len()
        );
    }

    #[test]
    fn pass_limit_bounds_the_work() {
        let policy = Policy::new(1);
        let runs = simulate(policy, 128 * MIB, 800.0 * MIB as f64, 32 * MIB, 0.02, 1000);
        assert_eq!(runs.len(), MAX_PASSES as usize);
        assert_eq!(
            runs.last().unwrap().1,
            Decision::GiveUp {
                reason: GiveUp::TooManyPasses { passes: MAX_PASSES }
            }
        );
        assert!(runs.last().unwrap().0.throttle_percent > 0);
    }
}
